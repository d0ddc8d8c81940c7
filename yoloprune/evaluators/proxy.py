"""The proxy evaluator: prune a candidate, measure its cost, re-estimate BN, fine-tune briefly, validate.

Every phase is timed, so a benchmark can tell the framework's own overhead from the real work.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from yoloprune.config import FinetuneConfig
from yoloprune.data.check import DatasetInfo
from yoloprune.errors import EvaluatorError
from yoloprune.evaluators.hardware import HardwareEvaluator
from yoloprune.log import progress
from yoloprune.pruning import measure_costs, prune_candidate, prune_like
from yoloprune.spaces import Candidate
from yoloprune.ultra.train import EpochCallback, finetune
from yoloprune.ultra.val import ValResult, recalibrate_bn, validate

PHASES = ("prune", "bn", "finetune", "validation", "latency")


@dataclass
class ProxyResult:
    """What one evaluation measured.

    Attributes:
        raw: absolute metrics (``map50``, ``map50_95``, ``params``, ``gflops``, ``size_mb``).
        per_class: per-class AP50-95 by class name.
        timings: seconds per phase (see :data:`PHASES`).
        finetuned: False when the fine-tune was skipped (cost constraint already violated).
        model: the evaluated model (fine-tuned when ``finetuned``).
    """

    raw: dict[str, float]
    per_class: dict[str, float]
    timings: dict[str, float]
    finetuned: bool
    model: nn.Module
    epochs: list[dict[str, float]] = field(default_factory=list)
    latency: dict[str, Any] = field(default_factory=dict)


class ProxyEvaluator:
    """Evaluates candidates against one base model and dataset."""

    def __init__(
        self,
        base: nn.Module,
        data: DatasetInfo,
        *,
        imgsz: int,
        device: str,
        finetune: FinetuneConfig,
        workdir: Path,
        hardware: HardwareEvaluator | None = None,
    ) -> None:
        self.base = base
        self.data = data
        self.imgsz = imgsz
        self.device = device
        self.cfg = finetune
        self.workdir = Path(workdir)
        self.hardware = hardware

    def baseline(self) -> dict[str, Any]:
        """The unpruned model's metrics (no fine-tune)."""
        timings: dict[str, float] = {}
        batches = math.ceil(self.data.n_val / self.cfg.batch)
        with _timed(timings, "validation"), progress(batches, "baseline validation", unit="batch") as bar:
            val = validate(
                self.base, self.data, imgsz=self.imgsz, batch=self.cfg.batch, device=self.device, on_batch=bar.update
            )
        costs = measure_costs(self.base, self.imgsz)
        return {
            **raw_metrics(val, costs),
            "per_class": _per_class(val),
            "seconds": timings["validation"],
        }

    def evaluate(
        self,
        candidate: Candidate,
        *,
        name: str,
        skip: Callable[[dict[str, float]], bool] | None = None,
        on_epoch: EpochCallback | None = None,
    ) -> ProxyResult:
        """Prune, cost, (BN re-estimate, fine-tune,) validate one candidate.

        Args:
            name: run name (the fine-tune's folder under the work dir; removed afterwards).
            skip: given the cost metrics, True means "infeasible: do not fine-tune".
            on_epoch: per-epoch callback, may raise to stop the trial.
        """
        timings = dict.fromkeys(PHASES, 0.0)
        with _timed(timings, "prune"):
            model: nn.Module = prune_candidate(self.base, candidate)
            costs = measure_costs(model, self.imgsz)
        cost_metrics = {"params": float(costs.params), "gflops": costs.gflops, "size_mb": costs.size_mb}
        latency: dict[str, Any] = {}
        if self.hardware is not None:  # the architecture is final now: latency needs no fine-tuned weights
            with _timed(timings, "latency"):
                measured, latency = self.hardware.measure(model)
            cost_metrics.update(measured)
        finetuned = self.cfg.epochs > 0 and not (skip is not None and skip(cost_metrics))
        if not (finetuned and self.cfg.rounds > 1):  # progressive rounds re-estimate BN on their own models
            self._recalibrate_bn(model, timings)
        epochs: list[dict[str, float]] = []
        val: ValResult | None = None
        if finetuned:
            model, val, epochs = self._finetune(model, candidate, name, on_epoch, timings)
        if val is None:
            with _timed(timings, "validation"):
                val = validate(model, self.data, imgsz=self.imgsz, batch=self.cfg.batch, device=self.device)
        raw = {**raw_metrics(val, costs), **{k: v for k, v in cost_metrics.items() if k.startswith("latency_ms.")}}
        return ProxyResult(raw, _per_class(val), timings, finetuned, model, epochs, latency)

    def screen_score(self, candidate: Candidate, subset: DatasetInfo) -> tuple[float, float]:
        """EagleEye's cheap score of a candidate: prune, re-estimate BN, validate on ``subset`` (a few held-out images).

        Returns (mAP50-95 on the subset, seconds). No fine-tune and no latency: it ranks candidates that
        already sit on the same cost.
        """
        start = time.perf_counter()
        model: nn.Module = prune_candidate(self.base, candidate)
        self._recalibrate_bn(model, {})
        val = validate(model, subset, imgsz=self.imgsz, batch=self.cfg.batch, device=self.device)
        return val.map50_95, time.perf_counter() - start

    def _recalibrate_bn(self, model: nn.Module, timings: dict[str, float]) -> None:
        """Re-estimate BN statistics of a freshly pruned ``model`` in place (``finetune.bn_batches``; 0: off)."""
        if self.cfg.bn_batches > 0:
            with _timed(timings, "bn"):
                recalibrate_bn(
                    model,
                    self.data,
                    imgsz=self.imgsz,
                    batches=self.cfg.bn_batches,
                    batch=self.cfg.batch,
                    device=self.device,
                )

    def _finetune(
        self,
        pruned: nn.Module,
        candidate: Candidate,
        name: str,
        on_epoch: EpochCallback | None,
        timings: dict[str, float],
    ) -> tuple[nn.Module, ValResult | None, list[dict[str, float]]]:
        """Fine-tune ``pruned``; with ``rounds`` > 1, reach it progressively from the base instead.

        Round k of n prunes to ratios x k/n (the last round to exactly ``pruned``'s widths, choosing channels
        by the fine-tuned weights), re-estimates BN and fine-tunes its share of the epochs. ``on_epoch`` sees
        the epochs of all rounds numbered in one sequence.
        """
        rounds = self.cfg.rounds
        history: list[dict[str, float]] = []
        model, val = pruned, None
        for k, epochs in enumerate(split_epochs(self.cfg.epochs, rounds), start=1):
            if rounds > 1:
                with _timed(timings, "prune"):
                    scaled = {s: r * k / rounds for s, r in candidate.ratios.items()}
                    if k == 1:
                        model = prune_candidate(self.base, candidate, scaled)
                    else:
                        target = pruned if k == rounds else prune_candidate(self.base, candidate, scaled)
                        model = prune_like(model, target, importance=candidate.importance)
                self._recalibrate_bn(model, timings)
            done = len(history)
            with _timed(timings, "finetune"):
                result = finetune(
                    model,
                    self.data,
                    epochs=epochs,
                    imgsz=self.imgsz,
                    batch=self.cfg.batch,
                    device=self.device,
                    workers=self.cfg.workers,
                    project=self.workdir,
                    name=name if rounds == 1 else f"{name}-round{k}",
                    on_epoch=None if on_epoch is None else _shifted(on_epoch, done),
                    keep_run=False,
                    teacher=self.base if self.cfg.distill > 0 else None,
                    distill=self.cfg.distill,
                    **self.cfg.overrides,
                )
            timings["finetune"] -= result.val_seconds
            timings["validation"] += result.val_seconds
            model, val = result.model, result.val
            history.extend(result.epochs)
        return model, val, history


def _shifted(on_epoch: EpochCallback, done: int) -> EpochCallback:
    """``on_epoch`` for a later round: its epochs continue the numbering of the rounds before."""
    return lambda epoch, metrics: on_epoch(done + epoch, metrics)


def split_epochs(epochs: int, rounds: int) -> list[int]:
    """Epochs per progressive round: an equal share each, the remainder in the last (the target) round."""
    if rounds < 1 or epochs < rounds:
        raise EvaluatorError(f"{rounds} pruning rounds need at least {rounds} fine-tune epochs, got {epochs}.")
    share = epochs // rounds
    return [share] * (rounds - 1) + [epochs - share * (rounds - 1)]


def raw_metrics(val: ValResult, costs: Any) -> dict[str, float]:
    """Absolute accuracy and cost metrics of one validated, costed model."""
    return {
        "map50": val.map50,
        "map50_95": val.map50_95,
        "params": float(costs.params),
        "gflops": costs.gflops,
        "size_mb": costs.size_mb,
    }


def _per_class(val: ValResult) -> dict[str, float]:
    return {c.name: c.ap50_95 for c in val.per_class.values()}


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start
