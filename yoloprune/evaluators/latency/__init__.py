"""Hardware latency: backends behind one interface (registered in :data:`yoloprune.registry.LATENCY_BACKENDS`),
timing discipline, and a cache.

Backends: ``onnxruntime`` (CPU; CUDA with onnxruntime-gpu), ``torch`` (CPU; CUDA fp32/fp16 with CUDA graph
replay), ``tensorrt`` (where TensorRT is installed; not verified here) and ``remote`` (a ``yoloprune agent``
on the target device, see :mod:`.agent`).

The names below load on first use, so that the agent (:mod:`.agent`) imports neither torch nor the
storage layer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yoloprune.evaluators.latency.base import (
        LatencyBackend,
        LatencyResult,
        LatencySpec,
        architecture_signature,
        get_backend,
    )
    from yoloprune.evaluators.latency.measure import measure_latency

_WHERE = {
    "LatencyBackend": "base",
    "LatencyResult": "base",
    "LatencySpec": "base",
    "architecture_signature": "base",
    "get_backend": "base",
    "measure_latency": "measure",
}

__all__ = [
    "LatencyBackend",
    "LatencyResult",
    "LatencySpec",
    "architecture_signature",
    "get_backend",
    "measure_latency",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
