"""The FP16 TensorRT engine goes through Ultralytics' exporter, as `yolo export format=engine half=True` does.

TensorRT cannot be installed in this workplace (README, "Notes on the named packages"), so the build itself is
not run here: this checks what yoloprune asks of Ultralytics, and that an export without TensorRT is refused
before any training (tests/test_search_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from yoloprune.convert import onnx as convert_onnx
from yoloprune.errors import EvaluatorError
from yoloprune.ultra.models import load_detector


class _Exporter:
    calls: list[tuple[str, dict]] = []  # noqa: RUF012

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint

    def export(self, **kwargs: object) -> str:
        _Exporter.calls.append((self.checkpoint, kwargs))
        if kwargs.get("device") == "fail":
            raise RuntimeError("no CUDA device")
        out = Path(self.checkpoint).with_suffix(".engine")
        out.write_bytes(b"engine")
        return str(out)


def test_fp16_engine_is_ultralytics_export_at_half_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_onnx, "YOLO", _Exporter)
    model = load_detector("yolov8n.yaml", nc=3)
    path = convert_onnx.export_engine_fp16(model, tmp_path / "out" / "m.fp16.engine", imgsz=64)
    assert path.read_bytes() == b"engine"
    checkpoint, kwargs = _Exporter.calls[-1]
    assert checkpoint.endswith("model.pt")
    assert kwargs == {"format": "engine", "imgsz": 64, "batch": 1, "dynamic": False, "quantize": 16, "device": "0",
                      "verbose": False}  # fmt: skip
    with pytest.raises(EvaluatorError, match=r"TensorRT engine export failed .*no CUDA device"):
        convert_onnx.export_engine_fp16(model, tmp_path / "x.engine", imgsz=64, device="fail")
