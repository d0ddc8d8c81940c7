"""Measure with a cache: an architecture already measured on the same backend, device, precision, batch and
image size is never measured again (the cache lives in the experiment's database)."""

from __future__ import annotations

import hashlib
import platform
import tempfile
from pathlib import Path

from torch import nn

from yoloprune.evaluators.latency.base import LatencyResult, LatencySpec, architecture_signature, get_backend
from yoloprune.storage import Store


def cache_key(model: nn.Module, backend: str, spec: LatencySpec) -> str:
    """Architecture signature + backend + spec + the machine it runs on."""
    device = spec.device
    if device.startswith("cuda"):
        import torch

        device = torch.cuda.get_device_name(torch.device(device))
    raw = "|".join([architecture_signature(model), backend, spec.key(), platform.node(), device])
    return hashlib.sha256(raw.encode()).hexdigest()


def measure_latency(
    model: nn.Module, backend: str, spec: LatencySpec, *, store: Store | None = None, workdir: Path | None = None
) -> tuple[LatencyResult, bool]:
    """``(result, from_cache)`` for ``model`` on ``backend``; a cache hit does no measurement at all."""
    key = cache_key(model, backend, spec) if store is not None else ""
    if store is not None:
        cached = store.latency(key)
        if cached is not None:
            return LatencyResult.from_dict(cached), True
    runner = get_backend(backend)
    with tempfile.TemporaryDirectory(prefix="yoloprune-latency-", dir=workdir) as tmp:
        result = runner.measure(model, spec, Path(tmp))
    if store is not None:
        store.save_latency(key, result.as_dict())
    return result, False
