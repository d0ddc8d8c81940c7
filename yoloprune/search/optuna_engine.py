"""The Optuna engine: a multi-objective study with constraints over the experiment's storage URL."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.study import StudyDirection
from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
from optuna.trial import FrozenTrial, TrialState

from yoloprune.config import EngineConfig, ExperimentConfig
from yoloprune.errors import ConfigError, StorageError
from yoloprune.log import get_logger
from yoloprune.spaces import SearchSpace
from yoloprune.storage.db import normalize_url, retry_transient

LOGGER = get_logger(__name__)

#: Finished trials: they count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def set_constraints(trial: optuna.Trial, values: list[float]) -> None:
    """Record a trial's constraint violations (<= 0: satisfied) where TPE and NSGA-II read them.

    Also kept as the ``constraints`` user attribute, for tables and older readers.
    """
    set_user_attrs(
        trial,
        {"constraints": values},
        # What Trial.set_constraint writes (Optuna 5), in the same transaction. NaN: no metric, infeasible.
        {f"{_CONSTRAINTS_KEY}:c{i}": v if math.isfinite(v) else 1e6 for i, v in enumerate(values)},
    )


def make_sampler(
    engine: EngineConfig, space: SearchSpace, worker: int = 0, target_values: list[float] | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler named in the config. TPE and NSGA-II see the constraints (:func:`set_constraints`).

    ``uniform``, ``sensitivity`` and ``tp_global`` queue all their candidates: a random sampler only answers parameters
    a queued trial does not fix. ``target_values``: the cost target's values when it lists several (a
    categorical parameter of every trial).

    ``worker`` (a worker id, unique in the database) shifts the seed, so workers sharing a study do not
    all propose the same candidates; a fresh database gives the same ids, hence the same seeds.
    """
    seed = None if engine.seed is None else engine.seed + 7919 * worker
    if engine.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=engine.startup_trials,
            multivariate=True,
        )
    if engine.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if engine.sampler == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=engine.startup_trials)
    if engine.sampler != "grid":  # random, and the methods that queue their candidates
        return optuna.samplers.RandomSampler(seed=seed)
    grid: dict[str, list[Any]] = space.grid()
    if target_values and len(target_values) > 1:
        from yoloprune.search.methods import TARGET_PARAM

        grid[TARGET_PARAM] = list(target_values)
    if not grid:
        raise ConfigError("engine.sampler 'grid' needs at least one searched (not fixed) parameter.")
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(engine: EngineConfig, epochs: int) -> optuna.pruners.BasePruner | None:
    """The pruner that stops hopeless trials on their per-epoch mAP50-95 (None: off)."""
    if engine.pruner == "none" or epochs < 2:
        return None
    if engine.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=engine.startup_trials, n_warmup_steps=0)
    if engine.pruner == "hyperband":
        return _Hyperband(max_resource=epochs, reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def open_study(config: ExperimentConfig, *, create: bool = True, worker: int = 0) -> optuna.Study:
    """Create or load the experiment's study (same name as the experiment) in its storage.

    Several workers may call this at once on a shared database: one creates the study, the others load it.
    """
    url = config.storage_url
    if not create and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise ConfigError(
            f"no search named '{config.name}': {url} does not exist. Run `yoloprune search CONFIG` first."
        )
    storage = rdb_storage(url, config.engine)
    directions = [o.direction for o in config.objectives]
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage)
        except KeyError:
            raise ConfigError(
                f"no search named '{config.name}' in {config.storage_url}. Run `yoloprune search CONFIG` first."
            ) from None
    sampler = make_sampler(
        config.engine, config.space, worker, config.cost_target.values if config.cost_target else None
    )
    try:
        study = optuna.create_study(
            study_name=config.name, storage=storage, sampler=sampler, directions=directions, load_if_exists=True
        )
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it between the check and the insert
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=sampler)
    stored = ["maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    if stored != directions:
        raise ConfigError(
            f"experiment '{config.name}' was started with objective directions {stored}, the config now says "
            f"{directions}. Keep the objectives, or give the experiment a new name."
        )
    return study


def rdb_storage(url: str, engine: EngineConfig | None = None) -> RDBStorage:
    """Optuna's storage on ``url``, retrying transient errors; with ``engine``, trials send heartbeats.

    A trial whose worker stops sending heartbeats for ``engine.grace_s`` is failed by the next worker
    that looks (:func:`fail_stale`) and queued again, up to ``engine.max_retries`` times.
    """
    heartbeat: dict[str, Any] = {}
    if engine is not None:
        heartbeat = {
            "heartbeat_interval": engine.heartbeat_s,
            "grace_period": engine.grace_s,
            "heartbeat_stale_trial_callback": _RetryStale(engine.max_retries),
        }
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return _RetryingRDBStorage(normalize_url(url), engine_kwargs={"pool_pre_ping": True}, **heartbeat)
        except Exception as e:
            racing = "alembic_version" in str(e) or "already exists" in str(e)
            if not racing or attempt == 5:
                _storage_error(url, e)
            time.sleep(0.2 * (attempt + 1))  # another process is creating Optuna's tables right now
    raise AssertionError("unreachable")


def _storage_error(url: str, e: Exception) -> NoReturn:
    """Optuna wraps driver errors in several types: one StorageError, with the fix where there is one."""
    message = str(e)
    if "optuna storage upgrade" in message or "no longer compatible" in message:
        message += f" Fix: yoloprune db upgrade --storage '{url}'"
    raise StorageError(f"cannot open Optuna storage '{url}': {message}") from e


def upgrade_optuna_schema(url: str) -> None:
    """Bring Optuna's own tables to this Optuna's schema (what ``optuna storage upgrade`` does)."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(normalize_url(url))
    try:
        if "version_info" not in inspect(engine).get_table_names():
            return  # no Optuna tables yet: they are created at the current version on first use
    finally:
        engine.dispose()
    storage = RDBStorage(normalize_url(url), skip_compatibility_check=True, skip_table_creation=True)
    storage.upgrade()


class _RetryingRDBStorage(RDBStorage):
    """RDBStorage whose calls survive a database restart or a dropped connection (retried with backoff),
    and that writes several attributes of a trial in one transaction."""

    @retry_transient
    def note_on_finished_trial(self, trial_id: int, key: str, value: Any) -> None:
        """Set a user attribute of a trial that is already finished (Optuna forbids it through its API)."""
        import json

        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key=key).delete()
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))

    @retry_transient
    def set_trial_attrs(self, trial_id: int, user: dict[str, Any], system: dict[str, Any]) -> None:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            for key, value in user.items():
                self._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
            for key, value in system.items():
                self._set_trial_attr_without_commit(session, models.TrialSystemAttributeModel, trial_id, key, value)


def set_user_attrs(trial: optuna.Trial, attrs: dict[str, Any], system: dict[str, Any] | None = None) -> None:
    """Set several user (and system) attributes of a running trial, in one transaction where the storage allows.

    One round trip instead of one per attribute: most of a trial's storage time on PostgreSQL otherwise.
    """
    backend = getattr(trial.storage, "_backend", trial.storage)
    if isinstance(backend, _RetryingRDBStorage):
        backend.set_trial_attrs(trial._trial_id, attrs, system or {})
        return
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    for key, value in (system or {}).items():
        trial.storage.set_trial_system_attr(trial._trial_id, key, value)


for _name in (
    "create_new_study", "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr", "set_study_system_attr",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_id_from_study_id_trial_number",
    "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial", "get_all_trials", "get_best_trial", "record_heartbeat", "_get_stale_trial_ids",
):  # fmt: skip
    setattr(_RetryingRDBStorage, _name, retry_transient(getattr(RDBStorage, _name)))


STALE_ERROR = "interrupted: its worker stopped sending heartbeats (killed or disconnected)"


class _RetryStale:
    """Queue a stale (killed worker's) trial's parameters again, at most ``max_retries`` times in a chain."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        backend = getattr(study._storage, "_backend", study._storage)
        if "error" not in trial.user_attrs and isinstance(backend, _RetryingRDBStorage):
            # Failed by Optuna's own stale check (at another worker's trial start), not by fail_stale.
            backend.note_on_finished_trial(trial._trial_id, "error", STALE_ERROR)
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        depth, current = 0, trial
        while (previous := current.user_attrs.get("retry_of")) is not None and previous in by_number:
            depth, current = depth + 1, by_number[previous]
        if not trial.params or depth >= self.max_retries:
            LOGGER.warning("trial %d was interrupted; not retried (%d retries already)", trial.number, depth)
            return
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        LOGGER.warning("trial %d was interrupted (no heartbeat); queued again", trial.number)


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the running trials whose worker stopped sending heartbeats, with the reason, and retry them."""
    storage = study._storage
    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        return []
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "error", STALE_ERROR)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
    callback = storage.get_heartbeat_stale_trial_callback()
    numbers = []
    for trial_id in failed:
        frozen = storage.get_trial(trial_id)
        numbers.append(frozen.number)
        if callback is not None:
            callback(study, frozen)
    return numbers


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials a stopped process left behind and queue their parameters again.

    With heartbeats (RDB storage), a RUNNING trial is failed only once its worker has been silent for
    the grace period: other workers may be running it. Without them (one process per study), every
    RUNNING trial at start-up belongs to a killed process. A FAILED trial marked ``interrupted`` was
    stopped by Ctrl-C. Each is queued once (its retry carries ``retry_of``).
    """
    recovered = fail_stale(study)
    heartbeats = isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.RUNNING and not heartbeats:
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
