"""The Optuna engine: a multi-objective study with constraints over the experiment's storage URL."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from yoloprune.config import EngineConfig, ExperimentConfig
from yoloprune.errors import ConfigError, StorageError
from yoloprune.log import get_logger
from yoloprune.spaces import SearchSpace
from yoloprune.storage.db import normalize_url

LOGGER = get_logger(__name__)

#: Finished trials: they count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _constraints(trial: FrozenTrial) -> list[float]:
    # Written by the objective before it returns; absent on a failed trial.
    return list(trial.user_attrs.get("constraints", []))


def make_sampler(engine: EngineConfig, space: SearchSpace, n_constraints: int) -> optuna.samplers.BaseSampler:
    """The sampler named in the config. TPE and NSGA-II see the constraints; random and grid do not need to."""
    constraints_func = _constraints if n_constraints else None
    if engine.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=engine.seed,
            n_startup_trials=engine.startup_trials,
            constraints_func=constraints_func,
            multivariate=True,
        )
    if engine.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=engine.seed, constraints_func=constraints_func, population_size=8)
    if engine.sampler == "random":
        return optuna.samplers.RandomSampler(seed=engine.seed)
    grid = space.grid()
    if not grid:
        raise ConfigError("engine.sampler 'grid' needs at least one searched (not fixed) parameter.")
    return optuna.samplers.GridSampler(grid, seed=engine.seed)


def make_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """The pruner that stops hopeless trials on their per-epoch mAP50-95 (None: off)."""
    if engine.pruner == "none" or epochs < 2:
        return None
    if engine.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=engine.startup_trials, n_warmup_steps=0)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def open_study(config: ExperimentConfig, *, create: bool = True) -> optuna.Study:
    """Create or load the experiment's study (same name as the experiment) in its storage."""
    url = config.storage_url
    if not create and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise ConfigError(
            f"no search named '{config.name}': {url} does not exist. Run `yoloprune search CONFIG` first."
        )
    storage = rdb_storage(url)
    directions = [o.direction for o in config.objectives]
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"no search named '{config.name}' in {config.storage_url}. Run `yoloprune search CONFIG` first."
            ) from None
    sampler = make_sampler(config.engine, config.space, len(config.constraints))
    study = optuna.create_study(
        study_name=config.name, storage=storage, sampler=sampler, directions=directions, load_if_exists=True
    )
    stored = ["maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    if stored != directions:
        raise ConfigError(
            f"experiment '{config.name}' was started with objective directions {stored}, the config now says "
            f"{directions}. Keep the objectives, or give the experiment a new name."
        )
    return study


def rdb_storage(url: str) -> RDBStorage:
    try:
        return RDBStorage(normalize_url(url), engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # Optuna wraps driver errors in several types
        raise StorageError(f"cannot open Optuna storage '{url}': {e}") from e


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials a stopped process left behind and queue their parameters again.

    A trial still RUNNING at start-up belongs to a killed process (one process per study; issue #7 adds
    heartbeats for several workers); a FAILED trial marked ``interrupted`` was stopped by Ctrl-C. Each is
    queued once (its retry carries ``retry_of``).
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    recovered = []
    for t in trials:
        if t.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (the search process stopped)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")) or t.number in retried:
            continue
        if t.params and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        recovered.append(t.number)
    return recovered


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


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
            storage = self._study._storage
            frozen = storage.get_trial(trial._trial_id)
            storage.set_trial_user_attr(trial._trial_id, "epochs", [*frozen.user_attrs.get("epochs", []), metrics])
            if self._pruner is None:
                return
            view = _MapView(self._study)
            if self._pruner.prune(view, _with_curve(storage.get_trial(trial._trial_id))):  # type: ignore[arg-type]
                raise optuna.TrialPruned(f"mAP50-95 {metrics['map50_95']:.4f} after epoch {epoch + 1}")

        return report


def _with_curve(trial: FrozenTrial) -> FrozenTrial:
    """A copy of ``trial`` whose intermediate values are its per-epoch mAP50-95 (step = epoch number)."""
    out = copy.deepcopy(trial)
    out.intermediate_values = {i + 1: float(e["map50_95"]) for i, e in enumerate(trial.user_attrs.get("epochs", []))}
    return out


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
