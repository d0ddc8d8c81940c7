"""Run a search experiment end to end: checks, storage, baseline, the Optuna loop, trial records."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from yoloprune.config import BUILTIN_PREFIX, ExperimentConfig, FinetuneConfig, ModelSource
from yoloprune.data.check import DatasetInfo, inspect_dataset
from yoloprune.device import default_device
from yoloprune.errors import ConfigError, LatencyTargetError
from yoloprune.evaluators.hardware import HardwareEvaluator
from yoloprune.evaluators.proxy import ProxyEvaluator
from yoloprune.log import get_logger
from yoloprune.pruning import prunable_stage_names
from yoloprune.search.methods import get_method
from yoloprune.search.objectives import relative_metrics, reward, violations
from yoloprune.search.optuna_engine import (
    EpochReporter,
    fail_stale,
    finished_count,
    make_pruner,
    open_study,
    recover_interrupted,
    set_constraints,
    set_user_attrs,
)
from yoloprune.search.sensitivity import enqueue_warm_start
from yoloprune.search.targeting import Targeting, prepare_method, session_targeting
from yoloprune.search.targets import uniform_ratio
from yoloprune.search.uniform import enqueue_uniform, uniform_params
from yoloprune.spaces import Candidate
from yoloprune.storage import Store, file_sha256
from yoloprune.ultra.checkpoint import save_checkpoint
from yoloprune.ultra.models import load_detector
from yoloprune.ultra.offline import ultralytics_quiet
from yoloprune.ultra.train import EpochCallback
from yoloprune.ultra.val import check_classes

LOGGER = get_logger(__name__)

MAX_CONSECUTIVE_FAILURES = 5


@dataclass
class Experiment:
    """Everything a search needs, checked before any training starts."""

    config: ExperimentConfig
    data: DatasetInfo
    base: nn.Module
    model_key: str
    device: str
    store: Store
    experiment_id: int

    @property
    def baseline_key(self) -> str:
        return f"{self.model_key}:{self.data.yaml_path}:{self.config.imgsz}"


def prepare(config: ExperimentConfig) -> Experiment:
    """Resolve and check data, model, stages and storage; raises a clear error before any training."""
    device = default_device(config.device)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.storage_url)  # first: cheap, and an unreachable database should fail fast
    data = inspect_dataset(_resolve(config.data, device))
    base, model_key = _load_model(config.model, data, device)
    check_classes(base, data)
    config.space.check_stages(prunable_stage_names(base, opt_in=True))
    experiment_id = store.experiment_id(config.name, config.model_dump(mode="json"))
    return Experiment(config, data, base, model_key, device, store, experiment_id)


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
    if uniform:
        LOGGER.info("queued uniform baseline ratios %s", enqueue_uniform(study, config, uniform))
    if warm_start:
        with ultralytics_quiet(not verbose):
            queued = enqueue_warm_start(study, exp, warm_start)
        if queued:
            LOGGER.info("queued %d sensitivity-guided candidates first (warm start)", len(queued))
    recovered = recover_interrupted(study)
    if recovered:
        LOGGER.info("re-queued trial(s) %s interrupted in a previous run", recovered)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    with ultralytics_quiet(not verbose):
        session = start_session(exp, study)
        evaluator, baseline = session.evaluator, session.baseline
        if config.cost_target is not None:
            targeting = targeting or session_targeting(session)
            prepare_method(session, study, targeting, progress=progress)
        budget = config.budget.trials
        done = finished_count(study)
        remaining = None if budget is None else max(0, budget - done)
        if not get_method(config.engine.sampler).samples:  # uniform, sensitivity: only their queued candidates
            waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
            remaining = waiting if remaining is None else min(remaining, waiting)
        if remaining == 0:
            LOGGER.info("budget of %s finished trials already reached; nothing to do", budget)
            _after_search(study)
            return study
        objective = _Objective(
            exp,
            evaluator,
            baseline,
            EpochReporter(study, make_pruner(config.engine, config.finetune.epochs)),
            progress,
            targeting=targeting,
        )
        bar = tqdm(total=remaining, desc="trials", unit="trial", disable=not progress, dynamic_ncols=True)
        stopper = _Stopper(done + remaining if remaining is not None else None, bar, exp.store, worker)
        state = "interrupted"
        reaper = _Reaper(study, config.engine.heartbeat_s)
        with logging_redirect_tqdm(loggers=[logging.getLogger("yoloprune")]), reaper:
            try:
                study.optimize(
                    objective,
                    n_trials=None,
                    timeout=config.budget.timeout_s,
                    catch=(Exception,),
                    callbacks=[stopper],
                    gc_after_trial=True,
                )
                state = "done"
            finally:
                bar.close()
                exp.store.update_worker(worker, trials=stopper.trials, state=state)
        _after_search(study)
    return study


def _after_search(study: optuna.Study) -> None:
    from yoloprune.search import screening

    records = screening.agreement(study)  # [] when no screened trial finished
    if records:
        LOGGER.info(screening.describe(records))


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

    def __init__(self, budget: int | None, bar: tqdm, store: Store, worker: int) -> None:
        self.budget = budget
        self.bar = bar
        self.store = store
        self.worker = worker
        self.failures = 0
        self.trials = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.trials += 1
        self.store.update_worker(self.worker, trials=self.trials)
        if trial.state == TrialState.FAIL:
            self.failures += 1
            LOGGER.warning("trial %d failed: %s", trial.number, trial.user_attrs.get("error", "see the log above"))
            if self.failures >= MAX_CONSECUTIVE_FAILURES:
                LOGGER.error(
                    "%d trials failed in a row; stopping the search. Fix the cause and re-run to resume.", self.failures
                )
                study.stop()
            return
        self.failures = 0
        self.bar.update(1)
        m = trial.user_attrs.get("metrics", {})
        self.bar.set_postfix_str(
            f"#{trial.number} {trial.state.name.lower()} mAP50-95 {m.get('map50_95', float('nan')):.3f} "
            f"FLOPs -{100 * m.get('flops_reduction', float('nan')):.0f}%"
        )
        if self.budget is not None:
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished_count(study) + running >= self.budget:  # the trials in flight will reach it
                study.stop()


class _Objective:
    """One trial: sample, prune, cost, (skip or) fine-tune, validate, record everything on the trial."""

    def __init__(
        self,
        exp: Experiment,
        evaluator: ProxyEvaluator,
        baseline: dict[str, Any],
        reporter: EpochReporter,
        progress: bool,
        epoch_hook: EpochCallback | None = None,
        targeting: Targeting | None = None,
    ) -> None:
        self.exp = exp
        self.targeting = targeting
        self.epoch_hook = epoch_hook
        self.cfg = exp.config
        self.evaluator = evaluator
        self.baseline = baseline
        self.reporter = reporter
        self.progress = progress
        self.cost_constraints = [c for c in self.cfg.constraints if c.on_cost]

    def __call__(self, trial: optuna.Trial) -> list[float]:
        start = time.perf_counter()
        candidate = self.cfg.space.suggest(trial)
        landed: dict[str, Any] = {}
        if self.targeting is not None:
            candidate, landed = self._land(trial, candidate)
        set_user_attrs(
            trial,
            {
                "candidate": candidate.as_dict(),
                "candidate_key": candidate.key(),
                "worker": {"host": socket.gethostname(), "pid": os.getpid()},
                **landed,
            },
        )
        if landed and not landed["target"]["on_target"]:
            t = landed["target"]
            raise optuna.TrialPruned(
                f"could not land on {t['metric']} {t['value']} +- {t['tolerance']} (closest {t['achieved']:.4f})"
            )
        twin = self._twin(trial, candidate.key())
        if twin is not None:
            return self._copy(trial, twin, start)
        epoch_bar = tqdm(
            total=self.cfg.finetune.epochs,
            desc=f"  trial {trial.number} fine-tune",
            unit="epoch",
            leave=False,
            disable=not self.progress or self.cfg.finetune.epochs == 0,
            dynamic_ncols=True,
        )
        report = self.reporter.callback(trial)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            epoch_bar.update(1)
            epoch_bar.set_postfix_str(f"mAP50-95 {metrics['map50_95']:.3f}")
            if self.epoch_hook is not None:
                self.epoch_hook(epoch, metrics)
            report(epoch, metrics)

        try:
            return self._evaluate(trial, candidate, on_epoch, start)
        except optuna.TrialPruned:
            trial.set_user_attr("timings", {"total": time.perf_counter() - start})
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted by the user")
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            if isinstance(e, LatencyTargetError) and e.stop_search:
                LOGGER.error("%s; stopping the search (on_error: stop)", e)
                trial.set_user_attr("stop_search", True)
                with contextlib.suppress(RuntimeError):  # outside study.optimize (NNI trials) there is no loop to stop
                    trial.study.stop()
            raise
        finally:
            epoch_bar.close()
            _free_memory()

    def _land(self, trial: optuna.Trial, proposal: Candidate) -> tuple[Candidate, dict[str, Any]]:
        """The proposal moved onto the trial's cost-target value along its method's family."""
        assert self.targeting is not None and self.cfg.cost_target is not None
        value = self.targeting.value_of(trial)
        method = str(trial.user_attrs.get("method", self.cfg.engine.sampler))
        landing = self.targeting.land(method, proposal, value)
        candidate = self.targeting.landed(method, proposal, landing)
        attrs: dict[str, Any] = {
            "method": method,
            "proposal": proposal.ratios,
            "target": landing.as_dict(self.cfg.cost_target.metric),
        }
        if method == "uniform":
            attrs["uniform"] = uniform_ratio(self.cfg.space, landing.ratios)
        return candidate, attrs

    def _evaluate(
        self, trial: optuna.Trial, candidate: Candidate, on_epoch: EpochCallback, start: float
    ) -> list[float]:
        result = self.evaluator.evaluate(
            candidate, name=f"trial_{trial.number:04d}", skip=self._skip, on_epoch=on_epoch
        )
        metrics = relative_metrics(result.raw, self.baseline)
        constraint_values = violations(metrics, self.cfg.constraints)
        set_constraints(trial, constraint_values)
        record = {
            "metrics": metrics,
            "per_class": result.per_class,
            "feasible": all(v <= 0 for v in constraint_values),
            "finetuned": result.finetuned,
            "reward": reward(metrics, self.baseline, self.cfg.constraints, self.cfg.reward),
        }
        if result.latency:
            record["latency"] = result.latency
        path = save_checkpoint(
            result.model,
            self.cfg.output_dir / "trials" / f"trial_{trial.number:04d}.pt",
            train_args={"data": str(self.exp.data.yaml_path), "imgsz": self.cfg.imgsz},
            metadata={
                "experiment": self.cfg.name,
                "trial": trial.number,
                "ratios": candidate.ratios,
                "importance": candidate.importance,
                "round_to": candidate.round_to,
                "metrics": metrics,
            },
        )
        self.exp.store.add_artifact(self.exp.experiment_id, "proxy_checkpoint", path, trial.number)
        timings = dict(result.timings)
        timings["total"] = time.perf_counter() - start
        timings["other"] = timings["total"] - sum(result.timings.values())
        set_user_attrs(trial, {**record, "timings": timings})
        return [metrics[o.metric] for o in self.cfg.objectives]

    def _twin(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        """A finished trial of the same candidate; waits while an earlier trial (any worker) evaluates it."""
        study = trial.study
        while True:
            same = [
                t
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
                if t.number != trial.number and t.user_attrs.get("candidate_key") == key
            ]  # fmt: skip
            done = [t for t in same if t.state != TrialState.RUNNING]
            if done:
                return done[0]
            if not any(t.number < trial.number for t in same):
                return None  # nobody else has it: evaluate it here
            LOGGER.info(
                "trial %d: waiting for trial %d, which evaluates the same candidate", trial.number, same[0].number
            )
            time.sleep(self.cfg.engine.heartbeat_s)
            fail_stale(study)  # its worker may have died

    def _copy(self, trial: optuna.Trial, twin: optuna.trial.FrozenTrial, start: float) -> list[float]:
        """Record ``twin``'s results on ``trial`` instead of evaluating the same candidate twice."""
        if twin.state == TrialState.PRUNED:
            trial.set_user_attr("duplicate_of", twin.number)
            raise optuna.TrialPruned(f"same candidate as trial {twin.number}, which was pruned")
        keys = ("metrics", "per_class", "feasible", "finetuned", "latency", "reward", "epochs")
        set_constraints(trial, list(twin.user_attrs.get("constraints", [])))
        set_user_attrs(
            trial,
            {
                **{k: twin.user_attrs[k] for k in keys if k in twin.user_attrs},
                "duplicate_of": twin.number,
                "timings": {"total": time.perf_counter() - start},
            },
        )
        if self.epoch_hook is not None:  # NNI shows the reused curve too
            for epoch, metrics in enumerate(twin.user_attrs.get("epochs", [])):
                self.epoch_hook(epoch, metrics)
        LOGGER.info("trial %d: same candidate as trial %d; its results are reused", trial.number, twin.number)
        return list(twin.values)

    def _skip(self, cost_metrics: dict[str, float]) -> bool:
        if not self.cfg.finetune.skip_infeasible or not self.cost_constraints:
            return False
        metrics = relative_metrics(cost_metrics, self.baseline)
        return any(v > 0 for v in violations(metrics, self.cost_constraints))


@dataclass
class Session:
    """One process's evaluators and the baseline its candidates are compared with."""

    exp: Experiment
    evaluator: ProxyEvaluator
    baseline: dict[str, Any]


def start_session(
    exp: Experiment, study: optuna.Study, *, measure_latency: bool = True, finetune: FinetuneConfig | None = None
) -> Session:
    """Build the evaluators and the baseline: stored accuracy and costs, latency measured now.

    Latency is re-measured in every process (``measure_latency``), so candidates are compared with a
    baseline timed in the same session on the same machine.
    """
    config = exp.config
    hardware = (
        HardwareEvaluator(config.targets, imgsz=config.imgsz, store=exp.store, workdir=config.output_dir / "latency")
        if config.targets
        else None
    )
    evaluator = ProxyEvaluator(
        exp.base,
        exp.data,
        imgsz=config.imgsz,
        device=exp.device,
        finetune=finetune or config.finetune,
        workdir=config.output_dir / "runs",
        hardware=hardware,
    )
    baseline = experiment_baseline(exp, evaluator)
    if hardware is not None and measure_latency:
        measured, details = hardware.measure(exp.base, use_cache=False)
        baseline = {**baseline, **measured, "latency": details}
        study.set_user_attr("baseline_latency", measured)
        LOGGER.info("baseline latency: %s", ", ".join(f"{k} {v:.2f} ms" for k, v in measured.items()))
    LOGGER.info(
        "baseline: mAP50-95 %.4f, mAP50 %.4f, %.3f GFLOPs at %d, %d params",
        baseline["map50_95"],
        baseline["map50"],
        baseline["gflops"],
        config.imgsz,
        baseline["params"],
    )
    return Session(exp, evaluator, baseline)


def experiment_baseline(exp: Experiment, evaluator: ProxyEvaluator) -> dict[str, Any]:
    """The unpruned model's stored metrics, evaluated and stored on first use."""
    stored = exp.store.baseline(exp.experiment_id, exp.baseline_key)
    if stored is not None:
        return stored
    with exp.store.lock(f"baseline:{exp.experiment_id}:{exp.baseline_key}"):  # one worker evaluates it
        stored = exp.store.baseline(exp.experiment_id, exp.baseline_key)
        if stored is not None:
            return stored
        LOGGER.info("evaluating the baseline (once per experiment)")
        metrics = evaluator.baseline()
        exp.store.save_baseline(exp.experiment_id, exp.baseline_key, metrics)
        return metrics


def _resolve(value: str, device: str) -> Path:
    if value.startswith(BUILTIN_PREFIX):
        from yoloprune.demo import resolve_builtin

        return resolve_builtin(value.removeprefix(BUILTIN_PREFIX), device)
    return Path(value)


def _load_model(source: str | ModelSource, data: DatasetInfo, device: str) -> tuple[nn.Module, str]:
    if isinstance(source, ModelSource):
        model = load_detector(source.yaml, nc=data.nc)
        key = hashlib.sha256(source.yaml.encode()).hexdigest()[:16]
        if source.weights:
            weights = load_detector(_resolve(source.weights, device))
            model.load(weights)
            key += ":" + file_sha256(Path(source.weights))[:16]
        return model, key
    path = _resolve(source, device)
    model = load_detector(path)
    key = file_sha256(path)[:16] if path.suffix == ".pt" else hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return model, key


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
