"""ONNX Runtime: the CPU execution provider, and CUDA / TensorRT providers where onnxruntime-gpu has them.

``precision: int8`` times a Q/DQ copy of the model quantized with the ``onnxruntime`` recipe of
:mod:`yoloprune.convert.quantize` (a file that already holds Q/DQ nodes is timed as it is).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from yoloprune.errors import BackendUnavailableError, EvaluatorError
from yoloprune.evaluators.latency.base import (
    LatencyBackend,
    LatencyResult,
    LatencySpec,
    importable,
)
from yoloprune.evaluators.latency.stats import time_until_stable

if TYPE_CHECKING:
    from torch import nn


class OnnxRuntimeBackend(LatencyBackend):
    name = "onnxruntime"
    requires = "onnxruntime (installed with yoloprune; onnxruntime-gpu for CUDA)"

    @classmethod
    def available(cls) -> bool:
        return importable("onnxruntime")

    def measure(self, model: nn.Module, spec: LatencySpec, workdir: Path) -> LatencyResult:
        from yoloprune.convert.onnx import export_onnx

        half = spec.precision == "fp16" and spec.device.startswith("cuda")
        path = export_onnx(
            model, Path(workdir) / "latency.onnx", imgsz=spec.imgsz, batch=spec.batch, half=half,
            device="0" if half else "cpu",
        )  # fmt: skip
        return self.measure_file(path, spec)

    def measure_file(self, path: Path, spec: LatencySpec) -> LatencyResult:
        """Time an ONNX file (also what the remote agent runs)."""
        import onnxruntime as ort

        from yoloprune.convert.quantize import ensure_int8

        if spec.precision == "int8":
            path = ensure_int8(path, recipe="onnxruntime")
        elif spec.precision == "fp16" and not spec.device.startswith("cuda"):
            raise EvaluatorError("onnxruntime fp16 is timed on CUDA only; on the CPU use fp32 or int8.")
        options = ort.SessionOptions()
        if spec.threads:
            options.intra_op_num_threads = spec.threads
        session = ort.InferenceSession(str(path), options, providers=self._providers(spec, ort))
        declared = session.get_inputs()[0].shape
        # A static ONNX input decides the shape; a dynamic one takes the spec's batch and image size.
        shape = [d if isinstance(d, int) else s for d, s in zip(declared, (spec.batch, 3, spec.imgsz, spec.imgsz))]
        feed = {session.get_inputs()[0].name: np.zeros(shape, dtype=np.float32)}

        def run_once() -> float:
            start = time.perf_counter()
            session.run(None, feed)
            return (time.perf_counter() - start) * 1000

        times = time_until_stable(run_once, spec)
        env = {**self.environment(spec), "onnxruntime": ort.__version__, "providers": session.get_providers(),
               "input_shape": shape, "int8_qdq": spec.precision == "int8"}  # fmt: skip
        return LatencyResult.from_times(
            self.name, times, peak_memory_mb=None, model_bytes=Path(path).stat().st_size, env=env
        )

    @staticmethod
    def _providers(spec: LatencySpec, ort: object) -> list[str]:
        available = ort.get_available_providers()  # type: ignore[attr-defined]
        if spec.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise BackendUnavailableError(
                    "onnxruntime on CUDA needs onnxruntime-gpu (pip install onnxruntime-gpu); only "
                    f"{available} are installed."
                )
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
