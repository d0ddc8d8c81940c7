"""Latency backends on the CPU, the measurement cache, and the ONNX export check."""

from __future__ import annotations

import pytest

from yoloprune.convert.onnx import check_onnx, export_onnx
from yoloprune.errors import BackendUnavailableError, ConfigError
from yoloprune.evaluators.latency import (
    LatencySpec,
    architecture_signature,
    get_backend,
    measure_latency,
)
from yoloprune.evaluators.latency.stats import summarize, trimmed_cv
from yoloprune.pruning import prune
from yoloprune.registry import LATENCY_BACKENDS
from yoloprune.storage import Store
from yoloprune.ultra.models import load_detector

SPEC = LatencySpec(imgsz=96, batch=1, warmup=2, min_runs=10, max_runs=30, cv_target=0.5, threads=1)


@pytest.fixture(scope="module")
def models():
    base = load_detector("yolov8n.yaml", nc=6).eval()
    return base, prune(base, {"backbone.p4": 0.5, "backbone.p5": 0.5, "neck": 0.5}, round_to=8)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_backends_time_a_tiny_model(models, backend, tmp_path):
    base, _ = models
    result, cached = measure_latency(base, backend, SPEC, workdir=tmp_path)
    assert not cached and result.backend == backend
    assert 10 <= result.runs <= 30
    assert 0 < result.median_ms <= result.p90_ms <= result.p99_ms
    assert result.model_bytes and result.model_bytes > 1e5
    assert result.env["imgsz"] == 96 and result.env["batch"] == 1 and result.env["precision"] == "fp32"


def test_cache_hit_avoids_a_second_measurement(models, tmp_path, monkeypatch):
    base, pruned = models
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    first, cached = measure_latency(pruned, "torch", SPEC, store=store)
    assert not cached
    backend_cls = type(get_backend("torch"))
    monkeypatch.setattr(backend_cls, "measure", lambda *a, **k: pytest.fail("measured twice"))
    again, cached = measure_latency(pruned, "torch", SPEC, store=store)
    assert cached and again == first
    # Another architecture, or another batch, is a miss.
    monkeypatch.undo()
    _, cached = measure_latency(base, "torch", SPEC, store=store)
    assert not cached
    assert architecture_signature(base) != architecture_signature(pruned)


def test_registry_errors():
    assert {"onnxruntime", "torch"} <= set(LATENCY_BACKENDS.names())
    with pytest.raises(ConfigError, match="Did you mean 'onnxruntime'"):
        get_backend("onnxruntim")


def test_onnxruntime_on_cuda_without_the_gpu_package(models, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        measure_latency(models[0], "onnxruntime", LatencySpec(imgsz=64, device="cuda"), workdir=tmp_path)


def test_pruned_onnx_export_checks_out(models, tmp_path):
    _, pruned = models
    path = export_onnx(pruned, tmp_path / "pruned.onnx", imgsz=96)
    check = check_onnx(path, pruned, imgsz=96)
    assert check.output_shape[:2] == (1, 4 + 6)
    assert check.max_abs_diff <= 1e-3 * check.scale


def test_stats():
    s = summarize([1.0, 1.0, 1.0, 1.0, 10.0])
    assert s["median_ms"] == 1.0 and s["runs"] == 5 and s["p99_ms"] > 9
    assert trimmed_cv([1.0, 1.1, 0.9, 1.0, 50.0]) < 0.2  # one hiccup of a busy machine is ignored


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_tensorrt_backend(models, tmp_path, precision):
    """Runs only where TensorRT and a CUDA GPU exist (never in this project's CI: no TensorRT package can
    be installed in this workplace)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (README: not verified in CI)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    spec = LatencySpec(imgsz=96, device="cuda", precision=precision, warmup=5, min_runs=20, max_runs=50)
    result, _ = measure_latency(models[1], "tensorrt", spec, workdir=tmp_path)
    assert result.median_ms > 0 and result.model_bytes and result.env["tensorrt"]


def test_tensorrt_unavailable_names_the_extra():
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '.\[tensorrt\]'"):
        get_backend("tensorrt")


def test_int8_onnxruntime_times_a_qdq_copy(models, tmp_path):
    from yoloprune.evaluators.latency.measure import cache_key

    base, _ = models
    int8 = LatencySpec(
        imgsz=96, batch=1, warmup=2, min_runs=10, max_runs=30, cv_target=0.5, threads=1, precision="int8"
    )
    fp32, _ = measure_latency(base, "onnxruntime", SPEC, workdir=tmp_path)
    result, _ = measure_latency(base, "onnxruntime", int8, workdir=tmp_path)
    assert result.env["int8_qdq"] and result.env["precision"] == "int8" and result.median_ms > 0
    assert result.model_bytes and fp32.model_bytes and result.model_bytes < fp32.model_bytes / 2.5  # int8 weights
    runner = get_backend("onnxruntime")
    assert cache_key(base, runner, int8) != cache_key(base, runner, SPEC)


def _initializers(model):
    return {i.name: i for i in model.graph.initializer}


def test_quantize_recipes(models, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from yoloprune.convert.quantize import head_decode_nodes, is_quantized, quantize_onnx

    _, pruned = models
    src = export_onnx(pruned, tmp_path / "pruned.onnx", imgsz=96)
    x = np.random.default_rng(1).random((1, 3, 96, 96), dtype=np.float32)
    calibration = [np.random.default_rng(i).random((1, 3, 96, 96), dtype=np.float32) for i in range(3)]
    outputs = {}
    for recipe in ("onnxruntime", "tensorrt"):
        path = quantize_onnx(src, tmp_path / f"{recipe}.onnx", recipe=recipe, calibration=calibration)
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert is_quantized(model) and not is_quantized(src)
        props = {p.key: p.value for p in model.metadata_props}
        assert "names" in props and "stride" in props  # Ultralytics still reads it
        produced_by = {o: n for n in model.graph.node for o in n.output}
        decode = set(head_decode_nodes(model))
        assert any("/dfl/" in name for name in decode) and all(n.op_type != "DequantizeLinear" for n in
                                                               model.graph.node if n.name in decode)  # fmt: skip
        # Box decoding stays in floating point: nothing it computes (pixel coordinates) is quantized.
        requantized = {produced_by[n.input[0]].name for n in model.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] in produced_by}  # fmt: skip
        assert not requantized & decode, requantized & decode
        zero_points = [
            numpy_helper.to_array(_initializers(model)[n.input[2]])
            for n in model.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2
        ]
        if recipe == "tensorrt":  # symmetric INT8 only, on the inputs of the operators TensorRT fuses
            assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
            readers: dict[str, set[str]] = {}
            for n in model.graph.node:
                for i in n.input:
                    readers.setdefault(i, set()).add(n.op_type)
            dequantized = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
            assert dequantized and all(readers[t] & {"Conv", "MaxPool", "Resize"} for t in dequantized)
            assert not any(produced_by[n.input[0]].op_type in ("Conv", "Sigmoid") for n in model.graph.node
                           if n.op_type == "QuantizeLinear" and n.input[0] in produced_by)  # fmt: skip
        else:  # unsigned activations with zero points: what ONNX Runtime's x86 kernels want
            assert any(z.dtype == np.uint8 for z in zero_points)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs[recipe] = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert outputs["onnxruntime"].shape == outputs["tensorrt"].shape == (1, 4 + 6, 189)


def test_quantize_bad_input(models, tmp_path):
    import numpy as np

    from yoloprune.convert.quantize import quantize_onnx
    from yoloprune.errors import EvaluatorError

    base, _ = models
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(EvaluatorError, match="not an ONNX file that can be read"):
        quantize_onnx(garbage, tmp_path / "q.onnx")
    dynamic = export_onnx(base, tmp_path / "dynamic.onnx", imgsz=64, dynamic=True)
    with pytest.raises(EvaluatorError, match="INT8 needs a static NCHW input"):
        quantize_onnx(dynamic, tmp_path / "q.onnx")
    static = export_onnx(base, tmp_path / "static.onnx", imgsz=64)
    with pytest.raises(EvaluatorError, match=r"calibration batch has shape \(1, 3, 32, 32\)"):
        quantize_onnx(static, tmp_path / "q.onnx", calibration=[np.zeros((1, 3, 32, 32), np.float32)])
    done = quantize_onnx(static, tmp_path / "q.onnx")
    with pytest.raises(EvaluatorError, match="already holds Q/DQ nodes"):
        quantize_onnx(done, tmp_path / "qq.onnx")
