"""The Optuna engine: the config's sampler and pruner on the experiment's study, and per-epoch reports.

The study's storage, trial records and stale trials are the adapter's (:mod:`yoloprune.storage.optuna_adapter`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from yoloprune.config import EngineConfig, ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.log import get_logger
from yoloprune.registry import PRUNERS, SAMPLERS
from yoloprune.spaces import SearchSpace
from yoloprune.storage.optuna_adapter import append_epoch, create_study, load_study
from yoloprune.storage.record import TrialRecord

LOGGER = get_logger(__name__)


#: What a :data:`yoloprune.registry.SAMPLERS` entry is: ``(engine, space, seed, target_values) -> sampler``.
SamplerFactory = Callable[[EngineConfig, SearchSpace, int | None, list[float] | None], optuna.samplers.BaseSampler]
#: What a :data:`yoloprune.registry.PRUNERS` entry is: ``(engine, epochs) -> pruner`` (None: off).
PrunerFactory = Callable[[EngineConfig, int], optuna.pruners.BasePruner | None]


def make_sampler(
    engine: EngineConfig, space: SearchSpace, worker: int = 0, target_values: list[float] | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler of the config's search method, from :data:`yoloprune.registry.SAMPLERS`. TPE and NSGA-II
    see the constraints (:func:`yoloprune.storage.optuna_adapter.write_record`).

    ``uniform``, ``sensitivity`` and ``tp_global`` (methods with no sampler of their name) queue all their
    candidates: a random sampler only answers parameters a queued trial does not fix. ``target_values``: the
    cost target's values when it lists several (a categorical parameter of every trial).

    ``worker`` (a worker id, unique in the database) shifts the seed, so workers sharing a study do not
    all propose the same candidates; a fresh database gives the same ids, hence the same seeds.
    """
    seed = None if engine.seed is None else engine.seed + 7919 * worker
    factory: SamplerFactory = SAMPLERS.get(engine.sampler if engine.sampler in SAMPLERS else "random")
    return factory(engine, space, seed, target_values)


def tpe_sampler(
    engine: EngineConfig, space: SearchSpace, seed: int | None, target_values: list[float] | None
) -> optuna.samplers.BaseSampler:
    """Multivariate TPE, after ``engine.startup_trials`` random trials."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=engine.startup_trials, multivariate=True)


def nsga2_sampler(
    engine: EngineConfig, space: SearchSpace, seed: int | None, target_values: list[float] | None
) -> optuna.samplers.BaseSampler:
    """NSGA-II with populations of 8."""
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)


def cmaes_sampler(
    engine: EngineConfig, space: SearchSpace, seed: int | None, target_values: list[float] | None
) -> optuna.samplers.BaseSampler:
    """CMA-ES, after ``engine.startup_trials`` random trials (Optuna's experimental warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=engine.startup_trials)


def random_sampler(
    engine: EngineConfig, space: SearchSpace, seed: int | None, target_values: list[float] | None
) -> optuna.samplers.BaseSampler:
    """Uniformly random allocations (and the answer to whatever a queued trial does not fix)."""
    return optuna.samplers.RandomSampler(seed=seed)


def grid_sampler(
    engine: EngineConfig, space: SearchSpace, seed: int | None, target_values: list[float] | None
) -> optuna.samplers.BaseSampler:
    """Every point of the space's grid (times each target value, when the cost target lists several)."""
    grid: dict[str, list[Any]] = space.grid()
    if target_values and len(target_values) > 1:
        from yoloprune.search.methods import TARGET_PARAM

        grid[TARGET_PARAM] = list(target_values)
    if not grid:
        raise ConfigError("engine.sampler 'grid' needs at least one searched (not fixed) parameter.")
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """The pruner (:data:`yoloprune.registry.PRUNERS`) that stops hopeless trials on their per-epoch
    mAP50-95 (None: off, and always off below two epochs)."""
    if epochs < 2:
        return None
    factory: PrunerFactory = PRUNERS.get(engine.pruner)
    return factory(engine, epochs)


def no_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """Every trial runs all its epochs."""
    return None


def median_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """Stop a trial whose mAP is below the median of earlier trials' at the same epoch."""
    return optuna.pruners.MedianPruner(n_startup_trials=engine.startup_trials, n_warmup_steps=0)


def successive_halving_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """Asynchronous successive halving (keep the best half at each rung)."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def hyperband_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """Hyperband over the fine-tune's epochs (:class:`_Hyperband`)."""
    return _Hyperband(max_resource=epochs, reduction_factor=3)


def open_study(config: ExperimentConfig, *, create: bool = True, worker: int = 0) -> optuna.Study:
    """Create or load the experiment's study (same name as the experiment) in its storage, with the config's
    sampler; ``create=False``: an existing study only (a clear error when there is none).

    Several workers may call this at once on a shared database: one creates the study, the others load it.
    """
    if not create:
        return load_study(config)
    sampler = make_sampler(
        config.engine, config.space, worker, config.cost_target.values if config.cost_target else None
    )
    return create_study(config, sampler)


class EpochReporter:
    """Records each fine-tune epoch's metrics on the trial and lets a pruner stop hopeless trials.

    Optuna's ``Trial.report`` refuses multi-objective studies, and TPE breaks on a pruned trial that has
    intermediate values in such a study. So the per-epoch metrics live in the trial's ``epochs`` user
    attribute, and the pruner gets a single-objective view of the study ("maximise mAP50-95") whose trials
    carry those values as their intermediate values.
    """

    def __init__(self, study: optuna.Study, pruner: optuna.pruners.BasePruner | None) -> None:
        self._study = study
        self._pruner = pruner

    def callback(self, trial: optuna.Trial) -> Callable[[int, dict[str, float]], None]:
        def report(epoch: int, metrics: dict[str, float]) -> None:
            stored = append_epoch(self._study, trial, metrics)
            if self._pruner is None:
                return
            view = _MapView(self._study)
            if self._pruner.prune(view, _with_curve(stored)):  # type: ignore[arg-type]
                raise optuna.TrialPruned(f"mAP50-95 {metrics['map50_95']:.4f} after epoch {epoch + 1}")

        return report


def _with_curve(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` whose intermediate values are its per-epoch mAP50-95 (step = epoch number)."""
    out = copy.deepcopy(trial)
    epochs = TrialRecord.from_frozen(trial).epochs or []
    out.intermediate_values = {i + 1: float(e["map50_95"]) for i, e in enumerate(epochs)}
    return out


class _Hyperband(optuna.pruners.BasePruner):
    """Hyperband as brackets of successive halving, each with its own early-stopping rate.

    Optuna's HyperbandPruner reads trials through its own study class, which bypasses the per-epoch
    view below (and refuses multi-objective studies); this one filters the view by bracket instead. A
    trial's bracket comes from its number, so every worker agrees on it.
    """

    def __init__(self, max_resource: int, reduction_factor: int = 3) -> None:
        n = max(1, math.floor(math.log(max(max_resource, 1), reduction_factor)) + 1)
        self.brackets = [
            optuna.pruners.SuccessiveHalvingPruner(
                min_resource=1, reduction_factor=reduction_factor, min_early_stopping_rate=i
            )
            for i in range(n)
        ]

    def bracket(self, trial_number: int) -> int:
        return trial_number % len(self.brackets)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        b = self.bracket(trial.number)
        return self.brackets[b].prune(_BracketView(study, self, b), trial)  # type: ignore[arg-type]


class _BracketView:
    """The trials of one Hyperband bracket, through another view."""

    def __init__(self, study: Any, pruner: _Hyperband, bracket: int) -> None:
        self._study, self._pruner, self._bracket = study, pruner, bracket

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if self._pruner.bracket(t.number) == self._bracket]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class _MapView:
    """A single-objective (maximise per-epoch mAP50-95) view of a study, for Optuna's pruners."""

    direction = StudyDirection.MAXIMIZE
    directions = [StudyDirection.MAXIMIZE]  # noqa: RUF012

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def _is_multi_objective(self) -> bool:
        return False

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [_with_curve(t) for t in self._study.get_trials(deepcopy=False, states=states)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)
