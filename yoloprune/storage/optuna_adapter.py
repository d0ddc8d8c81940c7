"""Optuna behind one adapter: the study's storage, trial records, constraints, and stale or failed trials.

This module and :mod:`.optuna_storage` are the only ones that touch Optuna's internals (``tests/test_adapter_contract.py`` checks each one
against the pinned Optuna, so an upgrade that moves them fails there, not silently in a distributed search):

* :func:`rdb_storage`: the study's storage, a :class:`~yoloprune.storage.optuna_storage.RetryingRDBStorage`
  (retried without writing anything twice, batched attribute writes), with heartbeats for workers;
* :func:`write_record`: a trial's :class:`~yoloprune.storage.record.TrialRecord` and its constraint
  violations, where TPE and NSGA-II read them (what the public ``Trial.set_constraint`` writes);
* :func:`fail_stale` (Optuna's public ``fail_stale_trials``), :func:`fail_trial` and
  :func:`recover_interrupted`: trials a stopped worker left behind are failed with the reason and queued again.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Literal, NoReturn

import optuna
from optuna.storages import RDBStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from yoloprune.config import ExperimentConfig
from yoloprune.config.schema import WorkersConfig
from yoloprune.errors import ConfigError, InternalError, StorageError
from yoloprune.log import get_logger
from yoloprune.storage.db import hide_password, normalize_url
from yoloprune.storage.optuna_storage import RetryingRDBStorage
from yoloprune.storage.record import BASELINE_LATENCY, TrialRecord

LOGGER = get_logger(__name__)

#: Finished trials: they count towards the trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

STALE_ERROR = "interrupted: its worker stopped sending heartbeats (killed or disconnected)"

# --- the storage ----------------------------------------------------------------------------------------


def rdb_storage(
    url: str, workers: WorkersConfig | None = None, *, kind: type[RetryingRDBStorage] = RetryingRDBStorage
) -> RetryingRDBStorage:
    """Optuna's storage on ``url``, retrying transient errors; with ``workers``, trials send heartbeats.

    A trial whose worker stops sending heartbeats for ``workers.grace_s`` is failed by the next worker
    that looks (:func:`fail_stale`) and queued again, up to ``workers.max_retries`` times.
    """
    heartbeat: dict[str, Any] = {}
    if workers is not None:
        heartbeat = {
            "heartbeat_interval": workers.heartbeat_s,
            "grace_period": workers.grace_s,
            "heartbeat_stale_trial_callback": RetryStale(workers.max_retries),
        }
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return kind(normalize_url(url), engine_kwargs={"pool_pre_ping": True}, **heartbeat)
        except Exception as e:
            racing = "alembic_version" in str(e) or "already exists" in str(e)
            if not racing or attempt == 5:
                _storage_error(url, e)
            time.sleep(0.2 * (attempt + 1))  # another process is creating Optuna's tables right now
    raise InternalError("opening the Optuna storage neither returned nor raised after its last attempt.")


def _storage_error(url: str, e: Exception) -> NoReturn:
    """Optuna wraps driver errors in several types: one StorageError, with the fix where there is one."""
    message = str(e)
    shown = hide_password(url)
    if "optuna storage upgrade" in message or "no longer compatible" in message:
        password = (
            " (the password for ***, or the URL in $YOLOPRUNE_STORAGE and no --storage)" if "***" in shown else ""
        )
        message += f" Fix: yoloprune db upgrade --storage '{shown}'{password}"
    raise StorageError(f"cannot open Optuna storage '{shown}': {message}") from e


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


def _backend(study: optuna.Study) -> Any:
    """The study's storage under Optuna's cache (``_CachedStorage`` wraps RDB storages)."""
    return getattr(study._storage, "_backend", study._storage)


# --- studies --------------------------------------------------------------------------------------------


def directions_of(config: ExperimentConfig) -> list[Literal["minimize", "maximize"]]:
    return [o.direction for o in config.objectives]


def load_study(
    config: ExperimentConfig, *, sampler: optuna.samplers.BaseSampler | None = None, heartbeats: bool = True
) -> optuna.Study:
    """The experiment's existing study; a clear error when there is none."""
    url = config.storage_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise ConfigError(
            f"no search named '{config.name}': {hide_password(url)} does not exist. Run `yoloprune search CONFIG` first."
        )
    storage = rdb_storage(url, config.engine.workers if heartbeats else None)
    try:
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=sampler)
    except KeyError:
        raise ConfigError(
            f"no search named '{config.name}' in {hide_password(url)}. Run `yoloprune search CONFIG` first."
        ) from None
    name_metrics(study, config)  # a study created before its metrics were named
    return study


def create_study(config: ExperimentConfig, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the experiment's study, or load it: several workers may call this at once on a shared database."""
    storage = rdb_storage(config.storage_url, config.engine.workers)
    directions = directions_of(config)
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
    name_metrics(study, config)
    return study


def name_metrics(study: optuna.Study, config: ExperimentConfig) -> None:
    """Name the study's objectives after the config's metrics, where they have no names yet (Optuna's plots and
    optuna-dashboard show "Objective 0" otherwise); names that differ from the config's are kept, with a warning."""
    names = [o.metric for o in config.objectives]
    stored = study.metric_names
    if stored is None and len(names) == len(study.directions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    elif stored is not None and list(stored) != names:
        LOGGER.warning("study '%s' names its objectives %s; the config says %s", config.name, stored, names)


def new_trial(study: optuna.Study) -> optuna.Trial:
    """A new running trial, never one of the study's queued trials (which ``study.ask()`` would pop)."""
    return optuna.Trial(study, study._storage.create_new_trial(study._study_id))


def record_baseline_latency(study: optuna.Study, latency_ms: dict[str, float] | None) -> None:
    """Keep the base's latency per target, as this process measured it, on the study (None: not measured)."""
    if latency_ms is not None:
        study.set_user_attr(BASELINE_LATENCY, latency_ms)


def baseline_latency(study: optuna.Study) -> dict[str, float]:
    """The base's latency per target last recorded on the study (``{}``: none)."""
    return dict(study.user_attrs.get(BASELINE_LATENCY, {}))


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# --- trial records and constraints ----------------------------------------------------------------------


def read_record(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> TrialRecord:
    """The stored record of ``trial``, read now from the storage (not the trial's cached copy)."""
    return TrialRecord.from_frozen(study._storage.get_trial(trial._trial_id))


def write_record(trial: optuna.Trial, record: TrialRecord, constraints: list[float] | None = None) -> None:
    """Store the set fields of ``record`` on a running trial, and its constraint violations (<= 0: satisfied),
    in one transaction where the storage allows.

    The violations are also kept as the record's ``constraints``, for tables and older readers.
    """
    attrs = record.to_attrs()
    system: dict[str, Any] = {}
    if constraints is not None:
        attrs["constraints"] = list(constraints)
        # What Trial.set_constraint writes (NaN, which it refuses: no metric, infeasible), in the same transaction.
        system = {_constraint_key(f"c{i}"): v if math.isfinite(v) else 1e6 for i, v in enumerate(constraints)}
    backend = getattr(trial.storage, "_backend", trial.storage)
    if isinstance(backend, RetryingRDBStorage):
        backend.set_trial_attrs(trial._trial_id, attrs, system)
        return
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    for key, value in system.items():
        trial.set_constraint(key.rsplit(":", 1)[1], value)


def _constraint_key(name: str) -> str:
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    return f"{_CONSTRAINTS_KEY}:{name}"


def note_finished(study: optuna.Study, trial: FrozenTrial, record: TrialRecord) -> None:
    """Add ``record``'s set fields to a trial that is already finished."""
    backend = _backend(study)
    for key, value in record.to_attrs().items():
        if isinstance(backend, RetryingRDBStorage):
            backend.note_on_finished_trial(trial._trial_id, key, value)
        else:
            study._storage.set_trial_user_attr(trial._trial_id, key, value)


def enqueue(study: optuna.Study, params: dict[str, Any], record: TrialRecord) -> None:
    """Queue ``params`` as a trial carrying ``record`` (always a new trial, even for known parameters)."""
    study.enqueue_trial(params, user_attrs=record.to_attrs(), skip_if_exists=False)


def fail_trial(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, error: str, *, interrupted: bool = False
) -> bool:
    """Fail a running trial with the reason (``interrupted``: the user stopped it; queued again on resume).

    Returns False when another worker finished or failed it first.
    """
    record = TrialRecord(error=error[:2000], interrupted=True if interrupted else None)
    try:
        for key, value in record.to_attrs().items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
        return bool(study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def finished_elsewhere(trial: optuna.Trial) -> bool:
    """Whether ``trial``, still running in this process, is finished in the database (by another worker)."""
    try:
        return trial.study._storage.get_trial(trial._trial_id).state.is_finished()
    except Exception:  # the database cannot say: the trial's own error is what the user sees
        return False


def record_error(study: optuna.Study, trial: optuna.Trial, error: str) -> None:
    """Note why a running trial failed, unless an earlier step already did."""
    if read_record(study, trial).error is None:
        for key, value in TrialRecord(error=error[:2000]).to_attrs().items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)


# --- stale and interrupted trials -----------------------------------------------------------------------


class RetryStale:
    """Queue a stale (killed worker's) trial's parameters again, at most ``max_retries`` times in a chain.

    Optuna calls it for each trial it fails as stale; :attr:`failed` lists their numbers.
    """

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries
        self.failed: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:
            self.failed.append(trial.number)
        if TrialRecord.from_frozen(trial).error is None:
            note_finished(study, trial, TrialRecord(error=STALE_ERROR))
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        depth, current = 0, trial
        while (previous := TrialRecord.from_frozen(current).retry_of) is not None and previous in by_number:
            depth, current = depth + 1, by_number[previous]
        if not trial.params or depth >= self.max_retries:
            LOGGER.warning("trial %d was interrupted; not retried (%d retries already)", trial.number, depth)
            return
        enqueue(study, trial.params, TrialRecord(retry_of=trial.number))
        LOGGER.warning("trial %d was interrupted (no heartbeat); queued again", trial.number)


def heartbeats_on(study: optuna.Study) -> bool:
    """The study's trials send heartbeats (an RDB storage opened with a workers config)."""
    backend = _backend(study)
    return isinstance(backend, RDBStorage) and backend.get_heartbeat_interval() is not None


def fail_stale(study: optuna.Study) -> list[int]:
    """Fail the running trials whose worker stopped sending heartbeats, with the reason, and retry them
    (Optuna's ``fail_stale_trials``, whose callback is :class:`RetryStale`); returns their numbers."""
    if not heartbeats_on(study):
        return []
    callback = _backend(study).get_heartbeat_stale_trial_callback()
    seen = len(callback.failed) if isinstance(callback, RetryStale) else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return list(callback.failed[seen:]) if isinstance(callback, RetryStale) else []


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials a stopped process left behind and queue their parameters again.

    With heartbeats (RDB storage), a RUNNING trial is failed only once its worker has been silent for
    the grace period: other workers may be running it. Without them (one process per study), every
    RUNNING trial at start-up belongs to a killed process. A FAILED trial marked ``interrupted`` was
    stopped by Ctrl-C. Each is queued once (its retry carries ``retry_of``).
    """
    recovered = fail_stale(study)
    heartbeats = heartbeats_on(study)
    trials = study.get_trials(deepcopy=False)
    retried = {TrialRecord.from_frozen(t).retry_of for t in trials}
    for t in trials:
        if t.state == TrialState.RUNNING and not heartbeats:
            fail_trial(study, t, "interrupted (the search process stopped)")
        elif not (t.state == TrialState.FAIL and TrialRecord.from_frozen(t).interrupted) or t.number in retried:
            continue
        if t.params and t.number not in retried:
            enqueue(study, t.params, TrialRecord(retry_of=t.number))
        recovered.append(t.number)
    return recovered


def append_epoch(study: optuna.Study, trial: optuna.Trial, metrics: dict[str, float]) -> FrozenTrial:
    """Add one fine-tune epoch's metrics to the running trial's ``epochs``; returns the trial as now stored."""
    epochs = [*(read_record(study, trial).epochs or []), metrics]
    for key, value in TrialRecord(epochs=epochs).to_attrs().items():
        study._storage.set_trial_user_attr(trial._trial_id, key, value)
    return study._storage.get_trial(trial._trial_id)


# --- what optuna-dashboard reads ------------------------------------------------------------------------


class DashboardStorage(RetryingRDBStorage):
    """The storage as optuna-dashboard reads it: each trial's named constraints (``constraints:c0``, what
    :func:`write_record` and ``Trial.set_constraint`` write) also as the list Optuna's ``constraints_func`` writes,
    the only form optuna-dashboard 0.21 reads (without it, every trial is drawn feasible). Nothing is written."""

    def get_trial(self, *args: Any, **kwargs: Any) -> Any:
        return _with_constraint_list(super().get_trial(*args, **kwargs))

    def get_all_trials(self, *args: Any, **kwargs: Any) -> Any:
        return [_with_constraint_list(t) for t in super().get_all_trials(*args, **kwargs)]


def dashboard_storage(url: str) -> DashboardStorage:
    """:class:`DashboardStorage` on ``url`` (no heartbeats: it runs no trial)."""
    storage = rdb_storage(url, kind=DashboardStorage)
    if not isinstance(storage, DashboardStorage):
        raise InternalError("rdb_storage ignored the storage class it was given.")
    return storage


def _with_constraint_list(trial: FrozenTrial) -> FrozenTrial:
    prefix = _constraint_key("")
    named = {k.removeprefix(prefix): v for k, v in trial.system_attrs.items() if k.startswith(prefix)}
    if not named or prefix.rstrip(":") in trial.system_attrs:
        return trial
    order = sorted(named, key=lambda n: (0, int(n[1:]), n) if n[:1] == "c" and n[1:].isdigit() else (1, 0, n))
    system = {k: v for k, v in trial.system_attrs.items() if not k.startswith(prefix)}
    system[prefix.rstrip(":")] = [named[n] for n in order]
    trial.system_attrs = system  # a copy the storage built for this read: the stored trial is unchanged
    return trial
