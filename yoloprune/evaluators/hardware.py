"""The hardware evaluator: measured latency of a candidate on every configured target."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from yoloprune.config import LatencyTarget, LocalTarget, RemoteTarget
from yoloprune.errors import LatencyTargetError
from yoloprune.evaluators.latency import LatencySpec, get_backend, measure_latency
from yoloprune.storage import Store


class HardwareEvaluator:
    """Measures ``latency_ms.<target>`` for each target; architectures already measured come from the cache."""

    def __init__(self, targets: list[LatencyTarget], *, imgsz: int, store: Store | None, workdir: Path) -> None:
        self.targets = targets
        self.imgsz = imgsz
        self.store = store
        self.workdir = Path(workdir)
        # Built now, so an unavailable runtime fails before any training.
        self.runners = {t.name: get_backend(t.backend, **_options(t)) for t in targets}

    def spec(self, target: LatencyTarget) -> LatencySpec:
        local = target if isinstance(target, LocalTarget) else None  # a remote agent runs its runtime's defaults
        return LatencySpec(
            imgsz=target.imgsz or self.imgsz, batch=target.batch, device=target.device, precision=target.precision,
            warmup=target.warmup, min_runs=target.min_runs, max_runs=target.max_runs, cv_target=target.cv_target,
            threads=local.threads if local else None, cuda_graph=local.cuda_graph if local else True,
        )  # fmt: skip

    def measure(
        self, model: nn.Module, *, use_cache: bool = True, times: bool = False
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """``({"latency_ms.<target>": median}, {target: full statistics and environment})``; ``times`` adds
        every timed run (``times_ms``, empty for a cached result)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        details: dict[str, Any] = {}
        for t in self.targets:
            try:
                result, cached = measure_latency(
                    model,
                    self.runners[t.name],
                    self.spec(t),
                    store=self.store if use_cache else None,
                    workdir=self.workdir,
                )
            except Exception as e:
                raise LatencyTargetError(
                    f"latency target '{t.name}' ({t.backend}) failed: {e}", stop_search=t.on_error == "stop"
                ) from e
            metrics[f"latency_ms.{t.name}"] = result.median_ms
            details[t.name] = {**result.as_dict(times=times), "cached": cached}
        return metrics, details


def _options(target: LatencyTarget) -> dict[str, Any]:
    if not isinstance(target, RemoteTarget):
        return {}
    return {
        "url": target.url,
        "token": os.environ.get(target.token_env),
        "remote_backend": target.remote_backend,
        "timeout_s": target.timeout_s,
        "cafile": target.cafile,
    }
