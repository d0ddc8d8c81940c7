"""ONNX and FP16 TensorRT export of (pruned) detectors through Ultralytics' own exporter, and a check of the ONNX."""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from yoloprune.errors import EvaluatorError
from yoloprune.offline import configure_offline, ultralytics_quiet
from yoloprune.ultra.checkpoint import save_checkpoint

configure_offline()

from ultralytics import YOLO  # noqa: E402


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    imgsz: int,
    batch: int = 1,
    dynamic: bool = False,
    simplify: bool = True,
    half: bool = False,
    device: str = "cpu",
) -> Path:
    """Export ``model`` to ``path`` exactly as ``yolo export format=onnx`` would (static or dynamic batch)."""
    half_args = {"quantize": 16} if half else {}
    return _export(
        model, path, "ONNX export", format="onnx", imgsz=imgsz, batch=batch, dynamic=dynamic, simplify=simplify,
        **half_args, device=device,
    )  # fmt: skip


def export_engine_fp16(model: nn.Module, path: str | Path, *, imgsz: int, device: str = "0") -> Path:
    """An FP16 TensorRT engine (static batch 1) exactly as ``yolo export format=engine half=True`` writes it:
    Ultralytics' exporter, with its metadata header, so ``YOLO(path)`` loads and runs it. Needs TensorRT and a GPU."""
    return _export(
        model, path, "TensorRT engine export", format="engine", imgsz=imgsz, batch=1, dynamic=False, quantize=16,
        device=device,
    )  # fmt: skip


def _export(model: nn.Module, path: str | Path, what: str, **args: object) -> Path:
    """``model`` saved as an Ultralytics checkpoint, exported by Ultralytics' exporter with ``args``, moved to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="yoloprune-export-") as tmp:
        ckpt = save_checkpoint(model, Path(tmp) / "model.pt")
        try:
            with ultralytics_quiet():
                out = YOLO(str(ckpt)).export(**args, verbose=False)
        except Exception as e:
            raise EvaluatorError(f"{what} failed ({type(e).__name__}: {e}).") from e
        shutil.move(str(out), path)
    return path


@dataclass(frozen=True)
class OnnxCheck:
    """Outcome of :func:`check_onnx`."""

    max_abs_diff: float
    scale: float
    output_shape: tuple[int, ...]


def check_onnx(path: str | Path, model: nn.Module, *, imgsz: int, batch: int = 1, rtol: float = 1e-3) -> OnnxCheck:
    """The ONNX checker passes, ONNX Runtime loads the file, and its first output matches torch's.

    The tolerance is ``rtol`` times the largest magnitude of the torch output (boxes are in pixels).
    Raises :class:`EvaluatorError` naming what failed.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise EvaluatorError(f"'{path}' fails the ONNX checker: {e}") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 3, imgsz, imgsz), dtype=np.float32)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    reference = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        out = reference(torch.from_numpy(x))
    ref = (out[0] if isinstance(out, (list, tuple)) else out).numpy()
    if ref.shape != got.shape:
        raise EvaluatorError(f"ONNX output shape {got.shape} differs from torch's {ref.shape}.")
    diff, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max()) or 1.0
    if diff > rtol * scale:
        raise EvaluatorError(f"ONNX output differs from torch by {diff:.4g} (scale {scale:.4g}, rtol {rtol}).")
    return OnnxCheck(diff, scale, tuple(got.shape))
