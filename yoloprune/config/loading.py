"""Reading an experiment config: YAML at the edge, paths resolved, every problem one clear :class:`ConfigError`.

Relative paths inside a config file are resolved against the file's own folder; those of command-line
``key=value`` overrides against the current directory. Unknown keys are errors, with the closest allowed key. See
``experiments/*.yaml`` and the README's config reference.
"""

from __future__ import annotations

import copy
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, ValidationError

from yoloprune.config.schema import BUILTIN_PREFIX, ExperimentConfig
from yoloprune.errors import ConfigError, did_you_mean


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, assignments: Sequence[tuple[str, Any]] = ()
) -> ExperimentConfig:
    """Read, resolve and validate an experiment YAML; every problem is a :class:`ConfigError`.

    Args:
        path: the experiment YAML.
        overrides: merged on top of the file's top-level sections (a mapping merges into the section); relative
            paths in them are resolved like the file's.
        assignments: command-line overrides (:func:`parse_assignments`), applied in order after ``overrides``:
            each sets the value at its dotted path (``finetune.epochs``, ``targets.0.device``), replacing what
            was there; relative paths in them are resolved against the current directory.
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
    raw = copy.deepcopy(_resolve_paths(raw, path.resolve().parent))
    for key, value in assignments:
        _assign(raw, key, _resolve_assigned(key, value, Path.cwd()))
    source = f"{path} with {', '.join(k for k, _ in assignments)}" if assignments else str(path)
    return config_from_dict(raw, source=source)


#: A command-line override's key: a dotted path of names and list indices (``targets.0.device``).
_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def parse_assignments(tokens: Sequence[str]) -> list[tuple[str, Any]]:
    """``["budget.trials=50", "finetune.overrides={lr0: 0.01}"]`` -> ``[("budget.trials", 50), ...]``.

    A value is read as YAML (``50`` is a number, ``random`` a string, ``{lr0: 0.01}`` a mapping, an empty value
    null); a token that is not ``KEY=VALUE`` is a :class:`ConfigError`.
    """
    pairs: list[tuple[str, Any]] = []
    for token in tokens:
        key, sep, text = token.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(
                f"'{token}' is not a KEY=VALUE override: KEY is a dotted path into the config and VALUE is YAML, "
                'e.g. budget.trials=50 engine.sampler=random targets.0.device=cuda "finetune.overrides={lr0: 0.01}" '
                "(overrides go after the config file)."
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).splitlines()[0]
            raise ConfigError(
                f"override '{token}': '{text}' is not a YAML value ({problem}); put a string in YAML's quotes "
                f"(in a shell: {key}=\"'{text}'\")."
            ) from None
        pairs.append((key, value))
    return pairs


def _assign(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the value at ``key``, a dotted path, creating the sections on the way.

    The schema says how the path splits: in a free-form mapping (``space.ratios``, ``finetune.overrides``) a key
    may hold dots (the stage ``backbone.p3``), so ``space.ratios.backbone.p3.high`` is the stage
    ``backbone.p3``'s ``high``. Below an unknown key each dot separates; validation then names the unknown key.
    """
    parts = key.split(".")
    node: Any = raw
    shape: tuple[str, Any] = ("model", [ExperimentConfig])
    done: list[str] = []
    while parts:
        step: str | int
        if isinstance(node, list):
            if not parts[0].isdigit():
                raise ConfigError(f"override '{key}': '{'.'.join(done)}' is a list: give an index, e.g. "
                                  f"{'.'.join([*done, '0', *parts])}.")  # fmt: skip
            step, parts = int(parts[0]), parts[1:]
            if step >= len(node):
                raise ConfigError(f"override '{key}': '{'.'.join(done)}' has {len(node)} item(s), no index {step}.")
            shape = _shape(shape[1]) if shape[0] == "list" else ("model", [])
        elif shape[0] == "dict":
            fields = {f for m in _models_in(shape[1]).values() for f in m.model_fields}
            n = len(parts) - 1 if len(parts) > 1 and parts[-1] in fields else len(parts)
            step, parts = ".".join(parts[:n]), parts[n:]
            shape = _shape(shape[1])
        else:
            step, parts = parts[0], parts[1:]
            found = [m.model_fields[step] for m in shape[1] if step in m.model_fields] if shape[0] == "model" else []
            shape = _shape(found[0].annotation) if found else ("model", [])
        done.append(str(step))
        if not parts:
            node[step] = value
            return
        child = node.get(step) if isinstance(node, dict) else node[step]
        if child is None:
            child = [] if shape[0] == "list" else {}
            node[step] = child
        elif not isinstance(child, (dict, list)):
            raise ConfigError(
                f"override '{key}': '{'.'.join(done)}' is {child!r}, not a section; set it whole instead, "
                f'e.g. "{".".join(done)}={{...}}".'
            )
        node = child


def _shape(annotation: Any) -> tuple[str, Any]:
    """What a field holds, for :func:`_assign`: ``("dict", value type)``, ``("list", item type)`` or
    ``("model", [sections])`` (no sections: a plain value, or unknown)."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    for option in options:
        if get_origin(option) is dict:
            return "dict", get_args(option)[1]
        if get_origin(option) is list:
            return "list", get_args(option)[0]
    return "model", list(_models_in(annotation).values())


def _resolve_assigned(key: str, value: Any, base: Path) -> Any:
    """A command-line value with its relative paths resolved against ``base`` (the current directory)."""
    top, _, sub = key.partition(".")
    if not sub:
        return _resolve_paths({top: value}, base).get(top, value)
    return _resolve_paths({"model": {sub: value}}, base)["model"][sub] if top == "model" else value


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
        if out.get(key) is not None:
            out[key] = (
                str(base / out[key]) if key == "output" and not Path(str(out[key])).is_absolute() else resolve(out[key])
            )
    if isinstance(out.get("targets"), list):  # a remote target's CA certificate, beside the config like the rest
        out["targets"] = [
            {**t, "cafile": resolve(t["cafile"])} if isinstance(t, dict) and isinstance(t.get("cafile"), str) else t
            for t in out["targets"]
        ]
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
