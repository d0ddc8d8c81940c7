"""The hand-made baseline every search should beat: one pruning ratio on every searched stage.

Uniform candidates are queued into the experiment's own study (tagged ``uniform``), so they are evaluated
with the same proxy, budget and storage, and appear in ``results`` beside the searched ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import optuna

from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.storage.optuna_adapter import enqueue
from yoloprune.storage.record import TrialRecord


def uniform_params(config: ExperimentConfig, ratio: float) -> dict[str, object]:
    """Trial parameters giving every searched stage ``ratio`` (and the first choice of each other knob)."""
    space = config.space
    params: dict[str, object] = {}
    for name, r in space.searched().items():  # a fixed stage keeps its fixed ratio
        on_grid = r.step is None or math.isclose(
            (ratio - r.low) / r.step, round((ratio - r.low) / r.step), abs_tol=1e-6
        )
        if not (r.low - 1e-9 <= ratio <= r.high + 1e-9) or not on_grid:
            grid = f" on a grid of {r.step} from {r.low}" if r.step else ""
            raise ConfigError(
                f"uniform ratio {ratio} is not in the search space of stage '{name}' ([{r.low}, {r.high}]{grid})."
            )
        params[f"ratio.{name}"] = ratio
    if not params:
        raise ConfigError("the search space has no searched stage ratio to make uniform.")
    if isinstance(space.importance, list):
        params["importance"] = space.importance[0]
    if isinstance(space.round_to, list):
        params["round_to"] = space.round_to[0]
    return params


def enqueue_uniform(study: optuna.Study, config: ExperimentConfig, ratios: Sequence[float]) -> list[float]:
    """Queue one uniform candidate per ratio not queued or run before; returns the ratios queued now."""
    done = {TrialRecord.from_frozen(t).uniform for t in study.get_trials(deepcopy=False)}
    queued = []
    for ratio in ratios:
        params = uniform_params(config, ratio)  # validates every ratio before anything is queued
        if ratio not in done:
            enqueue(study, params, TrialRecord(uniform=ratio))
            queued.append(ratio)
    return queued
