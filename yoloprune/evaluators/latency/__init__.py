"""Hardware latency: backends behind one interface and a name registry, timing discipline, and a cache.

Backends: ``onnxruntime`` (CPU; CUDA with onnxruntime-gpu), ``torch`` (CPU; CUDA fp32/fp16 with CUDA graph
replay) and ``remote`` (a ``yoloprune agent`` on the target device, see :mod:`.agent`).
"""

from yoloprune.evaluators.latency import onnxruntime_backend, remote, torch_backend  # noqa: F401  (register)
from yoloprune.evaluators.latency.base import (
    LatencyBackend,
    LatencyResult,
    LatencySpec,
    architecture_signature,
    backend_names,
    get_backend,
    register_backend,
)
from yoloprune.evaluators.latency.measure import measure_latency

__all__ = [
    "LatencyBackend",
    "LatencyResult",
    "LatencySpec",
    "architecture_signature",
    "backend_names",
    "get_backend",
    "measure_latency",
    "register_backend",
]
