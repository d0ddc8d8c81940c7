"""Latency backends on the CPU, the measurement cache, and the ONNX export check."""

from __future__ import annotations

import pytest

from yoloprune.deploy.onnx import check_onnx, export_onnx
from yoloprune.errors import BackendUnavailableError, ConfigError
from yoloprune.evaluators.latency import (
    LatencySpec,
    architecture_signature,
    backend_names,
    get_backend,
    measure_latency,
)
from yoloprune.evaluators.latency.stats import summarize, trimmed_cv
from yoloprune.pruning import prune
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
    assert {"onnxruntime", "torch"} <= set(backend_names())
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


def test_tensorrt_backend(models, tmp_path):
    """Runs only where TensorRT and a CUDA GPU exist (never in this project's CI: no TensorRT package can
    be installed in this workplace)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (README: not verified in CI)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    spec = LatencySpec(imgsz=96, device="cuda", precision="fp16", warmup=5, min_runs=20, max_runs=50)
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
