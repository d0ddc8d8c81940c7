"""One trial's evaluation: propose, land on the cost target, prune, (skip or) fine-tune, validate, record.

:class:`TrialEvaluation` is the objective both engines run: Optuna calls it in ``study.optimize``
(:mod:`.runner`), and each NNI trial process calls it on the trial NNI proposed (:mod:`.nni_engine`). What
differs between them is pluggable: how a candidate another trial already evaluates is handled
(:class:`WaitForTwin` or :class:`EvaluateEvery`), how the fine-tune's epochs are shown
(:class:`EpochBars` or :class:`NoDisplay`) and who else hears of each epoch (``epoch_hook``: NNI's intermediate results).
Everything a trial stores goes through its :class:`~yoloprune.storage.record.TrialRecord`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from yoloprune.atomic import OutputWriteError, is_disk_full, write_error
from yoloprune.config.objectives import relative_metrics, reward, violations
from yoloprune.errors import InternalError, LatencyTargetError, StorageError, YoloPruneError
from yoloprune.experiment import OUTPUT_FIX, Session
from yoloprune.log import get_logger
from yoloprune.search.optuna_engine import EpochReporter
from yoloprune.search.targeting import Targeting
from yoloprune.search.targets import uniform_ratio
from yoloprune.spaces import Candidate
from yoloprune.storage.optuna_adapter import fail_stale, finished_elsewhere, write_record
from yoloprune.storage.record import TrialRecord
from yoloprune.storage.retry import database_lost
from yoloprune.ultra.checkpoint import save_checkpoint
from yoloprune.ultra.train import EpochCallback

LOGGER = get_logger(__name__)


class DuplicatePolicy(Protocol):
    """Finds a trial whose results a new trial of the same candidate reuses (None: evaluate it here)."""

    def twin(self, trial: optuna.Trial, key: str) -> FrozenTrial | None: ...


class EvaluateEvery:
    """Evaluate every trial, even a candidate another trial has (NNI's own trials, benchmarks)."""

    def twin(self, trial: optuna.Trial, key: str) -> FrozenTrial | None:
        return None


class WaitForTwin:
    """Reuse a finished trial of the same candidate; wait while an earlier trial (any worker) evaluates it."""

    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s

    def twin(self, trial: optuna.Trial, key: str) -> FrozenTrial | None:
        study = trial.study
        while True:
            same = [
                t
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
                if t.number != trial.number and TrialRecord.from_frozen(t).candidate_key == key
            ]  # fmt: skip
            done = [t for t in same if t.state != TrialState.RUNNING]
            if done:
                return done[0]
            if not any(t.number < trial.number for t in same):
                return None  # nobody else has it: evaluate it here
            LOGGER.info(
                "trial %d: waiting for trial %d, which evaluates the same candidate", trial.number, same[0].number
            )
            time.sleep(self.poll_s)
            fail_stale(study)  # its worker may have died


class EpochDisplay(Protocol):
    """Shows one trial's fine-tune epochs."""

    def update(self, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class EpochBars:
    """A progress bar per trial's fine-tune (tqdm, cleared when the trial ends)."""

    def __init__(self, trial_number: int, epochs: int) -> None:
        self.bar = tqdm(
            total=epochs,
            desc=f"  trial {trial_number} fine-tune",
            unit="epoch",
            leave=False,
            disable=epochs == 0,
            dynamic_ncols=True,
        )

    def update(self, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"mAP50-95 {metrics['map50_95']:.3f}")

    def close(self) -> None:
        self.bar.close()


class NoDisplay:
    """Shows nothing (NNI trials, ``--no-progress``)."""

    def __init__(self, trial_number: int, epochs: int) -> None:
        pass

    def update(self, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TrialEvaluation:
    """One trial: sample, land on the cost target, reuse a twin or prune, (skip or) fine-tune, validate, and
    record everything on the trial. Call it with the trial; returns the objective values."""

    def __init__(
        self,
        session: Session,
        reporter: EpochReporter,
        *,
        targeting: Targeting | None = None,
        duplicates: DuplicatePolicy | None = None,
        display: Callable[[int, int], EpochDisplay] = EpochBars,
        epoch_hook: EpochCallback | None = None,
    ) -> None:
        self.session = session
        self.cfg = session.exp.config
        self.reporter = reporter
        self.targeting = targeting
        self.duplicates = duplicates or WaitForTwin(self.cfg.engine.workers.heartbeat_s)
        self.display = display
        self.epoch_hook = epoch_hook
        self.cost_constraints = [c for c in self.cfg.constraints if c.on_cost]
        #: Why the search must stop after the current trial (a full or read-only output folder); the runner raises it.
        self.stop_error: YoloPruneError | None = None

    def __call__(self, trial: optuna.Trial) -> list[float]:
        try:
            return self._run(trial)
        except Exception as e:
            if finished_elsewhere(trial):
                raise TrialTakenOver(trial.number) from e
            raise

    def _run(self, trial: optuna.Trial) -> list[float]:
        start = time.perf_counter()
        candidate = self._propose(trial)
        twin = self.duplicates.twin(trial, candidate.key())
        if twin is not None:
            return self._copy(trial, twin, start)
        display = self.display(trial.number, self.cfg.finetune.epochs)
        report = self.reporter.callback(trial)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            display.update(metrics)
            if self.epoch_hook is not None:
                self.epoch_hook(epoch, metrics)
            report(epoch, metrics)

        try:
            return self._evaluate(trial, candidate, on_epoch, start)
        except optuna.TrialPruned:
            write_record(trial, TrialRecord(timings={"total": time.perf_counter() - start}))
            raise
        except KeyboardInterrupt:
            _record_interruption(trial)
            raise
        except Exception as e:
            if storage_failed(e):
                raise StorageLost(e) from e
            self._record_failure(trial, e)
            raise
        finally:
            display.close()
            _free_memory()

    def _propose(self, trial: optuna.Trial) -> Candidate:
        """The trial's candidate, landed on its cost target, recorded; pruned when it cannot land."""
        candidate = self.cfg.space.suggest(trial)
        landed = TrialRecord()
        if self.targeting is not None:
            candidate, landed = self._land(trial, candidate)
        landed.candidate, landed.candidate_key = candidate.as_dict(), candidate.key()
        landed.worker = {"host": socket.gethostname(), "pid": os.getpid()}
        write_record(trial, landed)
        if landed.target is not None and not landed.target_on:
            t = landed.target
            raise optuna.TrialPruned(
                f"could not land on {t['metric']} {t['value']} +- {t['tolerance']} (closest {t['achieved']:.4f})"
            )
        return candidate

    def _land(self, trial: optuna.Trial, proposal: Candidate) -> tuple[Candidate, TrialRecord]:
        """The proposal moved onto the trial's cost-target value along its method's family."""
        if self.targeting is None or self.cfg.cost_target is None:
            raise InternalError("a trial is landed on a cost target without targeting or a cost_target.")
        value = self.targeting.value_of(trial)
        method = TrialRecord.from_frozen(trial).method or self.cfg.engine.sampler
        landing = self.targeting.land(method, proposal, value)
        candidate = self.targeting.landed(method, proposal, landing)
        record = TrialRecord(
            method=method, proposal=proposal.ratios, target=landing.as_dict(self.cfg.cost_target.metric)
        )
        if method == "uniform":
            record.uniform = uniform_ratio(self.cfg.space, landing.ratios)
        return candidate, record

    def _evaluate(
        self, trial: optuna.Trial, candidate: Candidate, on_epoch: EpochCallback, start: float
    ) -> list[float]:
        baseline = self.session.baseline
        result = self.session.evaluator.evaluate(
            candidate, name=f"trial_{trial.number:04d}", skip=self._skip, on_epoch=on_epoch
        )
        metrics = relative_metrics(result.raw, baseline)
        constraint_values = violations(metrics, self.cfg.constraints)
        timings = dict(result.timings)
        timings["total"] = time.perf_counter() - start
        timings["other"] = timings["total"] - sum(result.timings.values())
        record = TrialRecord(
            metrics=metrics,
            per_class=result.per_class,
            feasible=all(v <= 0 for v in constraint_values),
            finetuned=result.finetuned,
            reward=reward(metrics, baseline, self.cfg.constraints, self.cfg.reward),
            latency=result.latency or None,
            timings=timings,
        )
        write_record(trial, record, constraint_values)  # first: nothing after this can lose the finished trial
        try:
            self._save(trial, result.model, candidate, metrics)
        except OutputWriteError as e:  # the trial still counts; the next ones would fail the same way
            self._stop_search(trial, e)
        return [metrics[o.metric] for o in self.cfg.objectives]

    def _save(self, trial: optuna.Trial, model: Any, candidate: Candidate, metrics: dict[str, float]) -> None:
        """The trial's pruned, fine-tuned checkpoint, registered as an artifact of the experiment."""
        exp = self.session.exp
        path = save_checkpoint(
            model,
            self.cfg.output_dir / "trials" / f"trial_{trial.number:04d}.pt",
            train_args={"data": str(exp.data.yaml_path), "imgsz": self.cfg.imgsz},
            metadata={
                "experiment": self.cfg.name,
                "trial": trial.number,
                **candidate.as_dict(),
                "metrics": metrics,
            },
            fix=OUTPUT_FIX,
        )
        exp.store.add_artifact(exp.experiment_id, "proxy_checkpoint", path, trial.number)

    def _record_failure(self, trial: optuna.Trial, e: Exception) -> None:
        """Record why the trial failed; a latency target's ``on_error: stop`` also stops the search."""
        record = TrialRecord(error=f"{type(e).__name__}: {e}"[:2000])
        stop = isinstance(e, LatencyTargetError) and e.stop_search
        if stop:
            LOGGER.error("%s; stopping the search (on_error: stop)", e)
            record.stop_search = True
        write_record(trial, record)
        if stop:
            with contextlib.suppress(RuntimeError):  # outside study.optimize (NNI trials) there is no loop to stop
                trial.study.stop()
        elif is_disk_full(e, self.cfg.output_dir):  # every next trial would fail the same way
            error = write_error(self.cfg.output_dir, e, fix=OUTPUT_FIX, folder=self.cfg.output_dir)
            if error is not None:
                self._stop_search(trial, error)

    def _stop_search(self, trial: optuna.Trial, error: YoloPruneError) -> None:
        """Stop the search after this trial, which ends as it would have (a trial whose results are stored stays
        COMPLETE); its caller then raises :attr:`stop_error`: the runner after Optuna's loop, an NNI trial (where
        there is no loop to stop) once its result is told."""
        self.stop_error = error
        with contextlib.suppress(RuntimeError):  # outside study.optimize (NNI trials) there is no loop to stop
            trial.study.stop()

    def _copy(self, trial: optuna.Trial, twin: FrozenTrial, start: float) -> list[float]:
        """Record ``twin``'s results on ``trial`` instead of evaluating the same candidate twice."""
        if twin.state == TrialState.PRUNED:
            write_record(trial, TrialRecord(duplicate_of=twin.number))
            raise optuna.TrialPruned(f"same candidate as trial {twin.number}, which was pruned")
        stored = TrialRecord.from_frozen(twin)
        record = stored.results()
        record.duplicate_of, record.timings = twin.number, {"total": time.perf_counter() - start}
        write_record(trial, record, list(stored.constraints or []))
        if self.epoch_hook is not None:  # NNI shows the reused curve too
            for epoch, metrics in enumerate(stored.epochs or []):
                self.epoch_hook(epoch, metrics)
        LOGGER.info("trial %d: same candidate as trial %d; its results are reused", trial.number, twin.number)
        return list(twin.values)

    def _skip(self, cost_metrics: dict[str, float]) -> bool:
        if not self.cfg.finetune.skip_infeasible or not self.cost_constraints:
            return False
        metrics = relative_metrics(cost_metrics, self.session.baseline)
        return any(v > 0 for v in violations(metrics, self.cost_constraints))


class StorageLost(BaseException):
    """The database failed under a running trial (deleted, full, unreachable past the retries): the search stops.

    A BaseException, as KeyboardInterrupt is, so that Optuna's loop does not catch it and try to store the
    trial's FAIL state in the same failing database (which fails again, logs a traceback and hides the cause).
    The trial stays RUNNING in the database, and the next run queues it again (``recover_interrupted``).
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
        self.cause = cause


class TrialTakenOver(BaseException):
    """Another worker failed this worker's running trial as stale and queued its candidate again: this worker's
    heartbeat was silent for longer than ``engine.workers.grace_s`` (a machine overloaded, or suspended). The
    trial can no longer be stored; the runner drops it and this worker goes on with the next one.

    A BaseException, as :class:`StorageLost` is, so that Optuna's loop does not try to store the finished trial's
    state (it would stop the worker with "Cannot tell a FAIL trial").
    """

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


def storage_failed(error: BaseException | None) -> bool:
    """Whether ``error`` (past its retries) means the database itself failed, so that the search must stop: a
    lost connection, a full disk, a deleted, replaced or unreadable database file
    (:func:`~yoloprune.storage.retry.database_lost`). A deadlock, a serialization failure, a statement timeout or
    a busy SQLite file fails the trial alone, as a constraint violation does."""
    return database_lost(error)


def database_error(error: BaseException | None) -> bool:
    """Whether ``error`` (or one in its ``__cause__`` chain) comes from the database at all: an operational
    error of the driver, or yoloprune's own StorageError. Not a reason to stop by itself (see
    :func:`storage_failed`)."""
    from sqlalchemy.exc import OperationalError

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, (OperationalError, sqlite3.OperationalError, StorageError)):
            return True
        error, seen = error.__cause__, seen + 1
    return False


def _record_interruption(trial: optuna.Trial) -> None:
    """Mark the trial interrupted (queued again on resume); if the database cannot take it, resume still finds the
    trial RUNNING and queues it again."""
    try:
        write_record(trial, TrialRecord(error="interrupted by the user", interrupted=True))
    except Exception as e:
        LOGGER.warning("trial %d: could not record the interruption (%s)", trial.number, str(e).splitlines()[0])


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
