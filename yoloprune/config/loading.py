"""Reading an experiment config: YAML at the edge, paths resolved, every problem one clear :class:`ConfigError`.

Relative paths inside a config file are resolved against the file's own folder. Unknown keys are errors, with
the closest allowed key. See ``experiments/*.yaml`` and the README's config reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, ValidationError

from yoloprune.config.schema import BUILTIN_PREFIX, ExperimentConfig
from yoloprune.errors import ConfigError, did_you_mean


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read, resolve and validate an experiment YAML; every problem is a :class:`ConfigError`.

    ``overrides`` are merged on top of the file's top-level sections (used by the CLI and the demo).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config '{path}' does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections.")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(_resolve_paths(raw, path.resolve().parent), source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a config mapping (paths already resolved)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid experiment config:\n" + _explain(e)) from None


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(raw)

    def resolve(value: Any) -> Any:
        if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX) or "://" in value:
            return value
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        # A bare Ultralytics YAML name (yolov8n.yaml) is looked up in its package, not beside the config.
        return str(base / p) if (base / p).exists() or "/" in value or value.endswith(".pt") else value

    if isinstance(out.get("model"), dict):
        out["model"] = {k: resolve(v) for k, v in out["model"].items()}
    elif "model" in out:
        out["model"] = resolve(out["model"])
    for key in ("data", "output"):
        if key in out:
            out[key] = (
                str(base / out[key]) if key == "output" and not Path(str(out[key])).is_absolute() else resolve(out[key])
            )
    storage = out.get("storage")
    if isinstance(storage, str) and storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        rel = storage.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            out["storage"] = f"sqlite:///{base / rel}"
    return out


def _explain(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        model, _ = _walk(err["loc"][:-1])
        loc = ".".join(_walk(err["loc"])[1])
        if err["type"] == "extra_forbidden":
            allowed = list(getattr(model, "model_fields", {}))
            hint = did_you_mean(str(err["loc"][-1]), allowed)
            lines.append(f"  - unknown key '{loc}'.{hint} Allowed here: {', '.join(allowed)}.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  - {loc or '(top level)'}: {msg}{shown}")
    return "\n".join(lines)


def _walk(loc: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """The config section at ``loc``, and ``loc`` as the user wrote it (without pydantic's union tags)."""
    model: Any = ExperimentConfig
    shown: list[str] = []
    choices: dict[str, Any] = {}
    for part in loc:
        if isinstance(part, str) and part in choices:  # a tagged union's tag: not in the user's YAML
            model, choices = choices[part], {}
            continue
        shown.append(str(part))
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            continue  # a list index: the section stays the same
        found = _models_in(field.annotation)
        if not found:
            break
        model, choices = next(iter(found.values())), found if len(found) > 1 else {}
    return model, shown


def _models_in(annotation: Any) -> dict[str, Any]:
    """The config sections an annotation holds (through lists, unions and ``Annotated``), by union tag or name."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {annotation.__name__: annotation}
    out: dict[str, Any] = {}
    args = get_args(annotation)
    tags = [m.tag for m in args[1:] if isinstance(m, Tag)] if get_origin(annotation) is Annotated else []
    for arg in args[:1] if get_origin(annotation) is Annotated else args:
        for name, model in _models_in(arg).items():
            out[tags[0] if tags else name] = model
    return out
