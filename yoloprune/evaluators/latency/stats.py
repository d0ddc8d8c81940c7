"""Timing discipline: warm up, then time until the coefficient of variation is low enough or a cap is hit."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from yoloprune.evaluators.latency.base import LatencySpec


def time_until_stable(run_once: Callable[[], float], spec: LatencySpec) -> list[float]:
    """Call ``run_once`` (returns one run's milliseconds) ``warmup`` times untimed, then at least
    ``min_runs`` times and until the CV of the fastest 90% drops below ``cv_target`` or ``max_runs``."""
    for _ in range(spec.warmup):
        run_once()
    times: list[float] = []
    while len(times) < spec.max_runs:
        times.append(run_once())
        if len(times) >= spec.min_runs and len(times) % 5 == 0 and trimmed_cv(times) <= spec.cv_target:
            break
    return times


def trimmed_cv(times: list[float]) -> float:
    """Coefficient of variation of the fastest 90% of runs (one-off hiccups of a busy machine excluded)."""
    arr = np.sort(np.asarray(times, dtype=float))
    arr = arr[: max(2, int(0.9 * len(arr)))]
    mean = float(arr.mean())
    return float(arr.std(ddof=1) / mean) if mean > 0 and len(arr) > 1 else float("inf")


def summarize(times: list[float]) -> dict[str, float]:
    """median, p90, p99, mean (ms) and the trimmed coefficient of variation."""
    arr = np.asarray(times, dtype=float)
    return {
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "cv": trimmed_cv(times),
        "runs": len(times),
    }
