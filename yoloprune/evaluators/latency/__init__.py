"""Hardware latency: backends behind one interface (registered in :data:`yoloprune.registry.LATENCY_BACKENDS`),
timing discipline, and a cache.

Backends: ``onnxruntime`` (CPU; CUDA with onnxruntime-gpu), ``torch`` (CPU; CUDA fp32/fp16 with CUDA graph
replay), ``tensorrt`` (where TensorRT is installed; not verified here) and ``remote`` (a ``yoloprune agent``
on the target device, see :mod:`.agent`).
"""

from yoloprune.evaluators.latency.base import (
    LatencyBackend,
    LatencyResult,
    LatencySpec,
    architecture_signature,
    get_backend,
)
from yoloprune.evaluators.latency.measure import measure_latency

__all__ = [
    "LatencyBackend",
    "LatencyResult",
    "LatencySpec",
    "architecture_signature",
    "get_backend",
    "measure_latency",
]
