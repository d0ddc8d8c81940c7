"""Measure with a cache: an architecture already measured on the same backend, device, precision, batch and
image size is never measured again (the cache lives in the experiment's database)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from torch import nn

from yoloprune.evaluators.latency.base import (
    LatencyBackend,
    LatencyResult,
    LatencySpec,
    architecture_signature,
    get_backend,
)
from yoloprune.storage import Store


def cache_key(model: nn.Module, runner: LatencyBackend, spec: LatencySpec) -> str:
    """Architecture signature + backend + spec + the machine and device it runs on."""
    raw = "|".join([architecture_signature(model), runner.name, spec.key(), runner.identity(spec)])
    return hashlib.sha256(raw.encode()).hexdigest()


def measure_latency(
    model: nn.Module,
    backend: str | LatencyBackend,
    spec: LatencySpec,
    *,
    store: Store | None = None,
    workdir: Path | None = None,
) -> tuple[LatencyResult, bool]:
    """``(result, from_cache)`` for ``model`` on ``backend``; a cache hit does no measurement at all."""
    runner = get_backend(backend) if isinstance(backend, str) else backend
    key = cache_key(model, runner, spec) if store is not None else ""
    if store is not None:
        cached = store.latency(key)
        if cached is not None:
            return LatencyResult.from_dict(cached), True
    with tempfile.TemporaryDirectory(prefix="yoloprune-latency-", dir=workdir) as tmp:
        result = runner.measure(model, spec, Path(tmp))
    if store is not None:
        store.save_latency(key, result.as_dict(times=False))
    return result, False
