"""Validate a detection model with Ultralytics' DetectionValidator; re-estimate BN statistics cheaply."""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from yoloprune.data.check import DatasetInfo, inspect_dataset, split_images
from yoloprune.errors import DatasetError, EvaluatorError
from yoloprune.offline import configure_offline
from yoloprune.ultra.models import detect_head

configure_offline()

from ultralytics.data.augment import LetterBox  # noqa: E402
from ultralytics.models.yolo.detect import DetectionValidator  # noqa: E402


@dataclass(frozen=True)
class ClassAP:
    """Average precision of one class."""

    name: str
    instances: int
    ap50: float
    ap50_95: float


@dataclass(frozen=True)
class ValResult:
    """Validation metrics of one model on one dataset."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: dict[int, ClassAP] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """Plain dict, JSON-ready."""
        return {
            "map50": self.map50,
            "map50_95": self.map50_95,
            "precision": self.precision,
            "recall": self.recall,
            "per_class": {str(k): vars(v) for k, v in self.per_class.items()},
        }


def check_classes(model: nn.Module, info: DatasetInfo) -> None:
    """Raise if the model's number of classes differs from the dataset's."""
    nc = int(getattr(model, "nc", 0) or getattr(detect_head(model), "nc", 0))
    if nc != info.nc:
        raise DatasetError(
            f"the model predicts {nc} classes but dataset '{info.yaml_path}' has {info.nc} ({list(info.names.values())}). "
            "Use the dataset the model was trained on, or build the model from a YAML with this dataset."
        )


def validate(
    model: nn.Module | str | Path,
    data: str | Path | DatasetInfo,
    *,
    imgsz: int,
    batch: int = 16,
    device: str = "cpu",
    workers: int = 0,
    half: bool = False,
    on_batch: Callable[[], None] | None = None,
) -> ValResult:
    """mAP50, mAP50-95, precision, recall and per-class AP of ``model`` on the dataset's val split.

    ``model`` may also be an exported file Ultralytics runs (an ONNX, INT8 Q/DQ included); a static-batch file
    is validated at its own batch size. A module is copied first: Ultralytics fuses Conv and BN in place.
    ``on_batch`` is called after each validation batch (a progress bar).
    """
    info = data if isinstance(data, DatasetInfo) else inspect_dataset(data)
    if isinstance(model, (str, Path)):
        _check_file_classes(Path(model), info)
    else:
        check_classes(model, info)
    with tempfile.TemporaryDirectory(prefix="yoloprune-val-") as tmp:
        args = {
            "data": str(info.write_resolved(Path(tmp))),
            "imgsz": imgsz,
            "batch": batch,
            "device": device,
            "workers": workers,
            **({"quantize": 16} if half else {}),
            "plots": False,
            "verbose": False,
            "save_json": False,
            "project": tmp,
            "name": "val",
        }
        validator = DetectionValidator(args=args)
        if on_batch is not None:
            validator.add_callback("on_val_batch_end", lambda _validator: on_batch())
        try:
            validator(model=str(model) if isinstance(model, (str, Path)) else copy.deepcopy(model).float().eval())
        except Exception as e:
            raise EvaluatorError(f"validation failed ({type(e).__name__}: {e}).") from e
    return validator_result(validator, info)


def _check_file_classes(path: Path, info: DatasetInfo) -> None:
    """Raise if the exported file's class names (Ultralytics' ONNX metadata) disagree with the dataset's."""
    import ast

    import onnx

    if path.suffix != ".onnx":
        raise EvaluatorError(f"'{path}': only .onnx files (or modules) can be validated here.")
    try:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as e:
        raise EvaluatorError(f"'{path}' is not an ONNX file that can be read ({e}).") from e
    if "names" not in props:
        raise EvaluatorError(f"'{path}' has no Ultralytics metadata (class names); export it with yoloprune or yolo.")
    names = ast.literal_eval(props["names"])
    if len(names) != info.nc:
        raise DatasetError(
            f"'{path}' predicts {len(names)} classes but dataset '{info.yaml_path}' has {info.nc}; "
            "use the dataset the model was trained on."
        )


def validator_result(validator: DetectionValidator, info: DatasetInfo) -> ValResult:
    """Metrics of the last run of an Ultralytics DetectionValidator, with per-class AP by class index."""
    box = validator.metrics.box
    counts = np.asarray(validator.metrics.nt_per_class)
    per_class: dict[int, ClassAP] = {}
    for j, c in enumerate(validator.metrics.ap_class_index):
        c = int(c)
        per_class[c] = ClassAP(info.names.get(c, str(c)), int(counts[c]), float(box.ap50[j]), float(box.ap[j]))
    for c, name in info.names.items():  # classes absent from the val split
        per_class.setdefault(c, ClassAP(name, int(counts[c]) if c < len(counts) else 0, math.nan, math.nan))
    return ValResult(float(box.map50), float(box.map), float(box.mp), float(box.mr), dict(sorted(per_class.items())))


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: str | Path | DatasetInfo,
    *,
    imgsz: int,
    batches: int = 10,
    batch: int = 16,
    device: str = "cpu",
) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on a few training batches (in place).

    Pruning removes channels whose statistics the next layers were tuned to; fresh statistics recover
    much of the accuracy at the cost of ``batches`` forward passes and no gradient step.
    """
    info = data if isinstance(data, DatasetInfo) else inspect_dataset(data)
    files = train_images(info)[: batches * batch]
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not files:
        return model
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval().to(device)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
        bn.train()
    try:
        for x in image_batches(files, imgsz=imgsz, batch=batch):
            model(torch.from_numpy(x).to(device))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return model


def image_batches(files: list[Path], *, imgsz: int, batch: int) -> Iterator[np.ndarray]:
    """``files`` as Ultralytics' predictor sees them: letterboxed to ``imgsz``, RGB, NCHW float32 in [0, 1],
    ``batch`` at a time (the last batch may be smaller)."""
    letterbox = LetterBox(new_shape=(imgsz, imgsz), auto=False)
    for start in range(0, len(files), batch):
        images = [np.asarray(letterbox(image=cv2.imread(str(f)))) for f in files[start : start + batch]]
        yield np.ascontiguousarray(np.stack(images)[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32) / 255


def train_images(info: DatasetInfo) -> list[Path]:
    """Every image file of the dataset's train split, sorted."""
    return split_images(info, "train")
