"""TensorRT: ONNX -> engine with the TensorRT Python API, I/O through torch CUDA tensors (no pycuda: torch
already owns CUDA memory and streams), timed with CUDA events on a non-default stream.

Written against the TensorRT 10 and 11 Python API documentation; NOT verified in this project's CI or
workplace, where no TensorRT package can be installed (README). TensorRT 10 builds FP16 with
``BuilderFlag.FP16`` (weak typing); TensorRT 11 removed the precision flags and builds strongly typed
networks, so FP16 there needs an FP16 ONNX. INT8 on both is explicit quantization: a Q/DQ ONNX (the
``tensorrt`` recipe of :mod:`yoloprune.convert.quantize`: symmetric, zero points 0) parsed into a strongly
typed network with no precision flags, as TensorRT's documentation recommends; the deprecated calibrator API
is not used. Layers left unquantized (the box decoding) run in the ONNX's float type, fp32.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoloprune.errors import EvaluatorError
from yoloprune.evaluators.latency.base import (
    LatencyBackend,
    LatencyResult,
    LatencySpec,
    importable,
)
from yoloprune.evaluators.latency.stats import time_until_stable

if TYPE_CHECKING:
    from torch import nn

WORKSPACE_BYTES = 1 << 30


class TensorRTBackend(LatencyBackend):
    name = "tensorrt"
    requires = "TensorRT (pip install -e '.[tensorrt]' on the target, with a CUDA GPU)"

    @classmethod
    def available(cls) -> bool:
        if not importable("tensorrt"):
            return False
        import torch

        return bool(torch.cuda.is_available())

    def measure(self, model: nn.Module, spec: LatencySpec, workdir: Path) -> LatencyResult:
        from yoloprune.convert.onnx import export_onnx

        half = spec.precision == "fp16" and _trt_major() >= 11  # strongly typed: the ONNX carries the dtype
        path = export_onnx(
            model,
            Path(workdir) / "trt.onnx",
            imgsz=spec.imgsz,
            batch=spec.batch,
            half=half,
            device="0" if half else "cpu",
        )
        return self.measure_file(path, spec)

    def build_engine(self, path: Path, spec: LatencySpec, timing_cache: Path | None = None) -> bytes:
        """Serialized engine (plan) for the ONNX file at ``path``."""
        import tensorrt as trt

        from yoloprune.convert.quantize import is_quantized

        int8 = spec.precision == "int8"
        if int8 and not is_quantized(path):
            raise EvaluatorError(
                f"TensorRT INT8 builds from a Q/DQ ONNX and '{path}' has no Q/DQ nodes; quantize it first "
                "(yoloprune.convert.quantize.quantize_onnx with recipe='tensorrt', or `yoloprune export --int8`)."
            )
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        major = _trt_major()
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if int8 and strongly_typed is None:
            raise EvaluatorError(f"TensorRT {trt.__version__} has no strongly typed networks; INT8 needs TensorRT 10+.")
        flags = 1 << int(strongly_typed) if (major >= 11 or int8) and strongly_typed is not None else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EvaluatorError(f"TensorRT could not parse '{path}': {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if spec.precision == "fp16" and major < 11:
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EvaluatorError(f"TensorRT failed to build an engine from '{path}' (see the TensorRT log above).")
        if timing_cache is not None:
            timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(plan))

    def measure_file(self, path: Path, spec: LatencySpec) -> LatencyResult:
        import tensorrt as trt
        import torch

        from yoloprune.convert.quantize import ensure_int8

        if spec.precision == "int8":
            path = ensure_int8(path, recipe="tensorrt")
        plan = self.build_engine(Path(path), spec, timing_cache=Path(path).with_name("timing.cache"))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan)
        context = engine.create_execution_context()
        device = torch.device(spec.device if spec.device.startswith("cuda") else "cuda")
        buffers: dict[str, Any] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(context.get_tensor_shape(name))
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            buffers[name] = torch.zeros(shape, dtype=dtype, device=device)
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.Stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_once() -> float:
            start.record(stream)
            context.execute_async_v3(stream_handle=stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            return float(start.elapsed_time(end))

        torch.cuda.reset_peak_memory_stats(device)
        times = time_until_stable(run_once, spec)
        device_memory = getattr(engine, "device_memory_size_v2", None) or getattr(engine, "device_memory_size", 0)
        peak = (torch.cuda.max_memory_allocated(device) + int(device_memory or 0)) / 1e6
        env = {**self.environment(spec), "tensorrt": trt.__version__, "device_name": torch.cuda.get_device_name(device),
               "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        return LatencyResult.from_times(self.name, times, peak_memory_mb=peak, model_bytes=len(plan), env=env)


def _trt_major() -> int:
    import tensorrt as trt

    return int(str(trt.__version__).split(".")[0])


def _torch_dtype(trt_dtype: Any) -> Any:
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}  # fmt: skip
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if trt_dtype not in table:
        raise EvaluatorError(f"TensorRT tensor dtype {trt_dtype} has no torch equivalent here.")
    return table[trt_dtype]
