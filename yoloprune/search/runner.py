"""Run a search experiment end to end: checks, queued candidates, the baseline, and Optuna's loop over
:class:`~yoloprune.search.trial.TrialEvaluation` with a stale-trial reaper and a budget."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from yoloprune.atomic import OutputWriteError
from yoloprune.config import ExperimentConfig
from yoloprune.data.check import held_out_subset
from yoloprune.errors import ConfigError
from yoloprune.experiment import Experiment, Session, prepare, start_session
from yoloprune.log import get_logger
from yoloprune.offline import ultralytics_quiet
from yoloprune.search import screening
from yoloprune.search.database_watch import DatabaseWatch
from yoloprune.search.methods import get_method
from yoloprune.search.optuna_engine import EpochReporter, make_pruner, open_study
from yoloprune.search.sensitivity import enqueue_warm_start, measure_curves
from yoloprune.search.targeting import Targeting, enqueue_at_targets, session_targeting
from yoloprune.search.trial import (
    EpochBars,
    NoDisplay,
    TrialEvaluation,
    TrialTakenOver,
    database_error,
    storage_failed,
)
from yoloprune.search.uniform import enqueue_uniform, uniform_params
from yoloprune.storage import Store
from yoloprune.storage.optuna_adapter import fail_stale, finished_count, record_baseline_latency, recover_interrupted
from yoloprune.storage.record import TrialRecord

LOGGER = get_logger(__name__)

MAX_CONSECUTIVE_FAILURES = 5


def run_search(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    verbose: bool = False,
    uniform: Sequence[float] = (),
    warm_start: int = 0,
) -> optuna.Study:
    """Run (or resume) the experiment until its budget is spent; returns the study.

    Ctrl-C stops after marking the running trial failed; finished trials stay in storage, and the next
    run of the same config queues the interrupted trial's parameters again. ``uniform`` ratios are queued
    first as the uniform-pruning baseline (see :mod:`yoloprune.search.uniform`).
    """
    if uniform and config.cost_target is not None:
        raise ConfigError(
            "--uniform sweeps fixed ratios; with a cost_target, uniform pruning at each target value is already "
            "candidate 0. List the budgets you want in cost_target.value instead."
        )
    for ratio in uniform:
        uniform_params(config, ratio)  # a bad ratio fails before any training
    exp = prepare(config)
    targeting = None
    if config.cost_target is not None and config.cost_target.latency_target is None:
        targeting = Targeting(config, exp.base)
        targeting.check()  # an unreachable target or a too-fine tolerance fails before the baseline and training
    worker = exp.store.register_worker(exp.experiment_id)
    study = open_study(config, worker=worker)  # its own sampler seed: workers started together differ
    _queue_first(study, exp, uniform, warm_start, verbose)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    with ultralytics_quiet(not verbose):
        session = start_session(exp)
        record_baseline_latency(study, session.baseline_latency)
        if config.cost_target is not None:
            targeting = targeting or session_targeting(session)
            prepare_method(session, study, targeting, progress=progress)
        done = finished_count(study)
        remaining = _remaining(study, config, done)
        if remaining == 0:
            LOGGER.info("budget of %s finished trials already reached; nothing to do", config.budget.trials)
        else:
            objective = TrialEvaluation(
                session,
                EpochReporter(study, make_pruner(config.engine, config.finetune.epochs)),
                targeting=targeting,
                display=EpochBars if progress else NoDisplay,
            )
            with DatabaseWatch(config) as watch:
                _optimize(study, objective, exp, worker, done, remaining, progress, watch)
            if objective.stop_error is not None:
                raise OutputWriteError(
                    f"{objective.stop_error} The search stopped; its finished trials are kept in the database. "
                    "Run the same command again to resume."
                ) from objective.stop_error
        _after_search(study)
    return study


def _queue_first(
    study: optuna.Study, exp: Experiment, uniform: Sequence[float], warm_start: int, verbose: bool
) -> None:
    """Queue the uniform baseline ratios and the warm start's candidates, and the trials a stopped run left."""
    if uniform:
        LOGGER.info("queued uniform baseline ratios %s", enqueue_uniform(study, exp.config, uniform))
    if warm_start:
        with ultralytics_quiet(not verbose):
            queued = enqueue_warm_start(study, exp, warm_start)
        if queued:
            LOGGER.info("queued %d sensitivity-guided candidates first (warm start)", len(queued))
    recovered = recover_interrupted(study)
    if recovered:
        LOGGER.info("re-queued trial(s) %s interrupted in a previous run", recovered)


def prepare_method(session: Session, study: optuna.Study, targeting: Targeting, *, progress: bool = True) -> None:
    """Before the sampled trials: uniform at every target value (candidate 0), then the method's own
    candidates (``sensitivity``: its curves, then one candidate per value) and the screened ones."""
    config = session.exp.config
    queued = enqueue_at_targets(study, targeting, "uniform")
    if queued:
        LOGGER.info("queued uniform pruning at %s %s (candidate 0)", config.cost_target.metric, queued)  # type: ignore[union-attr]
    images = config.engine.screen.images if config.engine.screen else 64
    needs_subset = config.engine.sampler == "sensitivity" or config.engine.screen is not None
    bn_images = config.finetune.bn_batches * config.finetune.batch
    folder = config.output_dir / "screen"
    subset = held_out_subset(session.exp.data, images, folder, skip=bn_images) if needs_subset else None
    if subset is not None and config.engine.sampler == "sensitivity":
        targeting.curves = measure_curves(config, session.evaluator, study, subset, progress=progress)
    if not get_method(config.engine.sampler).samples and config.engine.sampler != "uniform":
        enqueue_at_targets(study, targeting, config.engine.sampler)  # one candidate per target value
    if subset is not None and config.engine.screen is not None:
        records = screening.screen(config, targeting, session.evaluator, study, subset, progress=progress)
        kept = screening.enqueue_best(study, config, records)
        if kept:
            LOGGER.info("screened %d candidates; queued the best %d for the proxy fine-tune", len(records), len(kept))


def _remaining(study: optuna.Study, config: ExperimentConfig, done: int) -> int | None:
    """Trials left to run: the budget's, or (uniform, sensitivity) only the queued candidates; None: no limit."""
    budget = config.budget.trials
    remaining = None if budget is None else max(0, budget - done)
    if not get_method(config.engine.sampler).samples:
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        remaining = waiting if remaining is None else min(remaining, waiting)
    return remaining


def _optimize(
    study: optuna.Study,
    objective: TrialEvaluation,
    exp: Experiment,
    worker: int,
    done: int,
    remaining: int | None,
    progress: bool,
    watch: DatabaseWatch,
) -> None:
    """Optuna's loop under a progress bar, with the stale-trial reaper; the worker's state is stored at the end."""
    config = exp.config
    bar = tqdm(total=remaining, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
    stopper = _Stopper(done + remaining if remaining is not None else None, bar, exp.store, worker, watch)
    state = "interrupted"
    reaper = _Reaper(study, config.engine.workers.heartbeat_s)
    with logging_redirect_tqdm(loggers=[logging.getLogger("yoloprune")]), reaper, _NoInterruptTraceback():
        try:
            _optimize_until_done(study, objective, config, stopper)
            state = "done"
        finally:
            bar.close()
            try:
                exp.store.update_worker(worker, trials=stopper.trials, state=state)
            except Exception as e:  # the database itself failed: what failed first is what the user sees
                if not database_error(e):
                    raise
                LOGGER.debug("could not store the worker's state: %s", e)


def _optimize_until_done(
    study: optuna.Study, objective: TrialEvaluation, config: ExperimentConfig, stopper: _Stopper
) -> None:
    """Optuna's loop until the budget or the timeout; a trial another worker took over is dropped, and the
    loop goes on (Optuna's loop cannot: it stops at a trial it cannot store)."""
    timeout = config.budget.timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        try:
            study.optimize(
                objective, n_trials=None, timeout=left, catch=(Exception,), callbacks=[stopper], gc_after_trial=True
            )
            return
        except TrialTakenOver as e:
            LOGGER.warning(
                "trial %d was failed by another worker while this one ran it: this worker sent no heartbeat for "
                "over engine.workers.grace_s (%d s), as when a machine is overloaded or suspended. Its result is "
                "dropped (that worker queued its candidate again, up to engine.workers.max_retries times); "
                "going on. Raise grace_s if this repeats.",
                e.number,
                config.engine.workers.grace_s,
            )
            if stopper.count_failure():
                return


def _after_search(study: optuna.Study) -> None:
    from yoloprune.search import screening

    records = screening.agreement(study)  # [] when no screened trial finished
    if records:
        LOGGER.info(screening.describe(records))


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C or SIGTERM with the interrupt's traceback; keep its one line only
    (on the handlers of Optuna's logger, while the loop runs): an interrupt is the user's doing, not a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True

    def __enter__(self) -> None:
        for handler in logging.getLogger("optuna").handlers:
            handler.addFilter(self)

    def __exit__(self, *exc: object) -> None:
        for handler in logging.getLogger("optuna").handlers:
            handler.removeFilter(self)


class _Reaper(threading.Thread):
    """While this worker runs, fail (and queue again) other workers' trials whose heartbeats stopped."""

    def __init__(self, study: optuna.Study, every_s: float) -> None:
        super().__init__(name="yoloprune-reaper", daemon=True)
        self.study, self.every_s, self.halt = study, every_s, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every_s):
            try:
                stale = fail_stale(self.study)
            except Exception as e:  # the next round tries again; the search itself must not die of this
                LOGGER.debug("stale-trial check failed: %s", e)
                continue
            if stale:
                LOGGER.warning("trial(s) %s: their worker stopped; failed and queued again", stale)

    def __enter__(self) -> _Reaper:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(timeout=5)


class _Stopper:
    """After each trial: fail other workers' dead trials, record this worker's progress, and stop at the
    budget (counting trials other workers are running) or after too many failures in a row."""

    def __init__(self, budget: int | None, bar: tqdm, store: Store, worker: int, watch: DatabaseWatch) -> None:
        self.budget = budget
        self.bar = bar
        self.store = store
        self.worker = worker
        self.watch = watch
        self.failures = 0
        self.trials = 0

    def count_failure(self) -> bool:
        """Count one more failed trial in a row; whether the search must stop (said once, here)."""
        self.failures += 1
        if self.failures < MAX_CONSECUTIVE_FAILURES:
            return False
        LOGGER.error(
            "%d trials failed in a row; stopping the search. Fix the cause and re-run to resume.", self.failures
        )
        return True

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.watch.check()  # before anything else writes to a database file that may be gone
        self.trials += 1
        try:
            self.store.update_worker(self.worker, trials=self.trials)
        except Exception as e:  # a deadlock or a busy file past the retries: only the progress count is late
            if storage_failed(e) or not database_error(e):
                raise
            LOGGER.warning("could not record this worker's progress (%s)", str(e).splitlines()[0][:200])
        if trial.state == TrialState.FAIL:
            LOGGER.warning(
                "trial %d failed: %s", trial.number, TrialRecord.from_frozen(trial).error or "see the log above"
            )
            if self.count_failure():
                study.stop()
            return
        self.failures = 0
        self.bar.update(1)
        record = TrialRecord.from_frozen(trial)
        self.bar.set_postfix_str(
            f"#{trial.number} {trial.state.name.lower()} mAP50-95 {record.metric('map50_95'):.3f} "
            f"FLOPs -{100 * record.metric('flops_reduction'):.0f}%"
        )
        if self.budget is not None:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished_count(study) + running >= self.budget:  # the trials in flight will reach it
                study.stop()
