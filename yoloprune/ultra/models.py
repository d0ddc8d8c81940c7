"""Load Ultralytics detection models from a checkpoint, a model YAML, or a module, and check them.

A model YAML name such as ``yolov8n.yaml`` builds an untrained network from the Ultralytics package's own
configs (no download); a ``.pt`` path must exist on disk: nothing is ever fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from yoloprune.errors import ModelError
from yoloprune.offline import configure_offline

configure_offline()

from ultralytics.engine.model import Model  # noqa: E402
from ultralytics.nn.modules import Detect  # noqa: E402
from ultralytics.nn.tasks import (  # noqa: E402
    DetectionModel,
    guess_model_task,
    load_checkpoint,
)

__all__ = [
    "Detect",
    "DetectionModel",
    "check_detector",
    "detect_head",
    "load_checkpoint_dict",
    "load_detector",
]

_YAML_SUFFIXES = (".yaml", ".yml")


def load_detector(source: str | Path | nn.Module | Model, *, nc: int | None = None) -> DetectionModel:
    """Return a detection model: from a path, in float32 with gradients enabled; from memory, as it is.

    Args:
        source: a ``.pt`` checkpoint path, a model YAML (a path, or a name Ultralytics ships such as
            ``yolov8n.yaml``), an ``ultralytics.YOLO`` object (its ``DetectionModel``, not a copy), or a
            ``DetectionModel`` already in memory.
        nc: number of classes when building from a YAML (ignored for checkpoints, which keep theirs).

    Raises:
        ModelError: the path does not exist, is not a YOLO checkpoint, or the model is not a detector.
    """
    if isinstance(source, Model):
        return _unwrap_yolo(source)
    if isinstance(source, nn.Module):
        return check_detector(source)
    text = str(source)
    if text.lower().endswith(_YAML_SUFFIXES):
        model = _build_from_yaml(text, nc)
    elif text.lower().endswith(".pt"):
        model = _load_pt(Path(text))
    else:
        raise ModelError(
            f"model '{text}' is neither a .pt checkpoint nor a model YAML. Pass a trained checkpoint "
            "(e.g. runs/detect/train/weights/best.pt) or an Ultralytics model YAML (e.g. yolov8n.yaml)."
        )
    model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        return check_detector(model)
    except ModelError as e:
        raise ModelError(f"'{text}': {e}") from e


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """Return the raw checkpoint dict of a ``.pt`` file (pickled modules: trusted files only)."""
    path = Path(path)
    _check_pt_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise ModelError(_unreadable(path, e)) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
        raise ModelError(_not_a_checkpoint(path, ckpt))
    return ckpt


def _unreadable(path: Path, error: Exception) -> str:
    """The message for a ``.pt`` that ``torch.load`` cannot read: truncated, foreign classes, or not PyTorch."""
    first = str(error).split(". ")[0].splitlines()[0] if str(error).strip() else ""  # torch's advice runs long
    text = f"{type(error).__name__}: {first}"
    if isinstance(error, EOFError) or any(m in str(error) for m in ("PytorchStreamReader", "truncated")):
        return (
            f"checkpoint '{path}' is truncated or corrupt ({path.stat().st_size:,} bytes; torch.load: {text}). Copy "
            "or download it again and compare its size with the original (a .pt is a zip archive; this one is cut "
            "short or damaged)."
        )
    if isinstance(error, ModuleNotFoundError | AttributeError):
        return (
            f"checkpoint '{path}' pickles a class this environment cannot import ({text}): it was written by other "
            "code or another Ultralytics version (installed: ultralytics "
            f"{_ultralytics_version()}). Load it where it was made and re-save it, or install that version."
        )
    return (
        f"'{path}' is not a YOLO checkpoint, nor any PyTorch file (torch.load: {text}). Pass the .pt the "
        "Ultralytics trainer wrote (runs/detect/train/weights/best.pt)."
    )


def _not_a_checkpoint(path: Path, ckpt: object) -> str:
    """The message for a ``.pt`` that loads but holds no model module (a state_dict, a tensor, other data)."""
    if isinstance(ckpt, dict):
        inner = ckpt.get("ema") or ckpt.get("model")
        what = f"a dict with keys {sorted(map(str, ckpt))[:8]}"
        if isinstance(inner, dict):
            what = "a dict whose 'model' is a state_dict (weights without the architecture)"
    else:
        what = f"a {type(ckpt).__name__}"
    return (
        f"'{path}' is not a YOLO checkpoint: it holds {what}, and yoloprune needs a dict holding the 'model' or "
        "'ema' module. Pass the .pt the Ultralytics trainer wrote (runs/detect/train/weights/best.pt) or one "
        "written by yoloprune."
    )


def _ultralytics_version() -> str:
    import ultralytics

    return str(ultralytics.__version__)


def check_detector(model: nn.Module) -> DetectionModel:
    """Return ``model`` if it is an Ultralytics detection model with a ``Detect`` head, else raise."""
    if not isinstance(model, DetectionModel):
        raise ModelError(
            f"expected an Ultralytics DetectionModel, got {type(model).__name__}. yoloprune prunes object "
            "detectors (YOLOv5u, YOLOv8, YOLO11 and relatives); classification models are not supported."
        )
    task = getattr(model, "task", None) or guess_model_task(model)
    if task != "detect" or not isinstance(detect_head(model), Detect):
        raise ModelError(
            f"the model is a '{task}' model ({type(model).__name__}, head {type(detect_head(model)).__name__}); "
            "yoloprune supports detection models only (task 'detect')."
        )
    return model


def layers(model: nn.Module) -> nn.Sequential:
    """The model's layer list (``model.model``), typed."""
    return cast(nn.Sequential, model.model)


def detect_head(model: nn.Module) -> nn.Module:
    """The model's last layer (its ``Detect`` head)."""
    return layers(model)[-1]


def _unwrap_yolo(yolo: Model) -> DetectionModel:
    """The ``DetectionModel`` inside an ``ultralytics.YOLO`` object (the wrapper is not itself a detector)."""
    inner = yolo.model
    if not isinstance(inner, nn.Module):
        raise ModelError(
            f"this YOLO object wraps an exported model ({inner!r}), not a PyTorch one; pass the .pt it was "
            "exported from, or YOLO('best.pt')."
        )
    task = getattr(yolo, "task", None) or guess_model_task(inner)
    if task != "detect":
        raise ModelError(
            f"this YOLO object holds a '{task}' model ({type(inner).__name__}); yoloprune supports detection "
            "models only (task 'detect'), e.g. YOLO('yolov8n.pt') or your trained detector's best.pt."
        )
    return check_detector(inner)


def _check_pt_path(path: Path) -> None:
    if not path.exists():
        raise ModelError(
            f"checkpoint '{path}' does not exist. Give the path to a trained .pt file; yoloprune never downloads "
            "weights. To start from an untrained architecture pass a model YAML such as yolov8n.yaml."
        )
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' is not a file.")


def _load_pt(path: Path) -> DetectionModel:
    _check_pt_path(path)
    load_checkpoint_dict(path)  # clear errors for files that are not YOLO checkpoints
    try:
        model, _ = load_checkpoint(str(path))
    except Exception as e:
        raise ModelError(f"'{path}' could not be loaded as a YOLO checkpoint ({type(e).__name__}: {e}).") from e
    return model


def _build_from_yaml(cfg: str, nc: int | None) -> DetectionModel:
    from ultralytics.nn.tasks import yaml_model_load

    try:
        spec = yaml_model_load(cfg)
    except FileNotFoundError as e:
        raise ModelError(
            f"model YAML '{cfg}' was found neither on disk nor among the Ultralytics configs. Use a path to your "
            "YAML or a shipped name such as yolov8n.yaml, yolo11s.yaml, yolov5nu.yaml."
        ) from e
    head = spec.get("head") or []
    last = str(head[-1][2]) if head else "?"
    if last not in {"Detect", "v10Detect"}:
        raise ModelError(
            f"model YAML '{cfg}' ends in a '{last}' head; yoloprune supports detection models only (Detect head)."
        )
    try:
        return DetectionModel(spec, nc=nc, verbose=False)
    except Exception as e:
        raise ModelError(f"model YAML '{cfg}' could not be built ({type(e).__name__}: {e}).") from e
