"""The targeting every trial of a cost-targeted search goes through: land a method's proposal on the trial's
target value (:class:`Targeting`), and, before the sampled trials, queue uniform at every value (candidate 0),
the method's own candidates and the screened ones (:func:`yoloprune.search.runner.prepare_method`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import optuna

from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError, InternalError, LatencyTargetError
from yoloprune.log import get_logger
from yoloprune.pruning import prune_candidate
from yoloprune.pruning.widths import CostModel
from yoloprune.search.methods import TARGET_PARAM, MethodContext, get_method
from yoloprune.search.targets import (
    Family,
    Lander,
    Landing,
    LatencyModel,
    land_on_latency,
    uniform_family,
)
from yoloprune.spaces import Candidate
from yoloprune.storage.optuna_adapter import enqueue
from yoloprune.storage.record import TrialRecord

if TYPE_CHECKING:
    from yoloprune.experiment import Session

LOGGER = get_logger(__name__)


class Targeting:
    """Lands each trial's candidate on its cost-target value, with the trial's method's family.

    Args:
        config: the experiment (its ``cost_target`` must be set).
        base: the base model (costed exactly, never modified).
        measure_latency: for a latency metric, the measured reduction of an allocation at a ``round_to``
            (with Torch-Pruning's global ranking when the flag is set).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        base: Any,
        *,
        measure_latency: Callable[[dict[str, float], int, bool], float] | None = None,
    ) -> None:
        if config.cost_target is None:
            raise InternalError("targeting without a cost_target.")
        self.config = config
        self.target = config.cost_target
        self.space = config.space
        self.costs = CostModel(base, config.imgsz)
        self.curves: dict[str, list[tuple[float, float]]] = {}
        self.latency: LatencyModel | None = None
        self._measure = measure_latency
        self._global: dict[tuple[str, int, float], Landing] = {}
        metric = self.target.metric
        if self.target.latency_target is not None:
            if measure_latency is None:
                raise ConfigError(f"cost_target {metric} needs its latency target measured; none is configured.")
            self.latency = LatencyModel()
            model = self.latency

            def reduction(ratios: Mapping[str, float], round_to: int) -> float:
                return 1.0 - model.predict(1.0 - self.costs.cost(ratios, round_to).flops_reduction)

        elif metric == "params_reduction":

            def reduction(ratios: Mapping[str, float], round_to: int) -> float:
                return self.costs.cost(ratios, round_to).params_reduction

        else:

            def reduction(ratios: Mapping[str, float], round_to: int) -> float:
                return self.costs.cost(ratios, round_to).flops_reduction

        self.lander = Lander(config.space, metric, self.target.tolerance, reduction)

    @property
    def values(self) -> list[float]:
        return self.target.values

    def value_of(self, trial: optuna.Trial) -> float:
        """The trial's target value (a categorical parameter when the target lists several)."""
        if len(self.values) == 1:
            return self.values[0]
        return float(trial.suggest_categorical(TARGET_PARAM, self.values))

    def calibrate(self) -> None:
        """For a latency target: measure uniform pruning at the bottom, middle and top of the space."""
        if self.latency is None or self._measure is None:
            return
        family = uniform_family(self.space)
        round_to = self.space.round_tos[0]
        for s in (0.0, 0.5, 1.0):
            self._measured(family(s), round_to)

    def check(self) -> list[Landing]:
        """Before any training: every target value is reachable, and uniform pruning lands on each within
        the tolerance (else the tolerance is finer than the space's cost steps). Returns uniform's landings."""
        for round_to in self.space.round_tos:
            self.lander.check(self.values, round_to)
        round_to = self.space.round_tos[0]
        landings = []
        for v in self.values:
            landing = self._land(uniform_family(self.space), v, round_to)
            if not landing.on_target and self.latency is not None:
                raise ConfigError(
                    f"cost_target {self.target.metric} {v}: uniform pruning measured {landing.achieved:.4f} after "
                    f"{landing.measurements} measurement(s), outside the tolerance {self.target.tolerance}. Latency "
                    "varies by a few percent between runs: raise the tolerance or cost_target.max_measurements."
                )
            if not landing.on_target:
                raise ConfigError(
                    f"cost_target {self.target.metric} {v} with tolerance {self.target.tolerance}: uniform pruning "
                    f"gets no closer than {landing.achieved:.4f}, because round_to {round_to} makes the widths "
                    f"coarse. Raise the tolerance to at least {abs(landing.achieved - v):.4f}, or lower round_to."
                )
            landings.append(landing)
        return landings

    def land(self, method: str, candidate: Candidate, value: float) -> Landing:
        """``candidate`` (a method's proposal) moved onto ``value`` along ``method``'s family."""
        spec = get_method(method)
        ctx = MethodContext(self.space, self.costs, candidate.round_to, self.curves)
        family = spec.family(ctx, candidate.ratios)
        if not spec.global_ranking:
            return self._land(family, value, candidate.round_to)
        key = (candidate.importance, candidate.round_to, value)  # its family ignores the proposal
        if key not in self._global:  # real prunings: land once per process
            self._global[key] = self._land_global(family, value, candidate)
        return self._global[key]

    def landed(self, method: str, proposal: Candidate, landing: Landing) -> Candidate:
        """The candidate a trial evaluates: the proposal's knobs, the landed ratios (fixed stages kept)."""
        return Candidate(
            {**proposal.ratios, **landing.ratios},
            proposal.importance,
            proposal.round_to,
            global_ranking=get_method(method).global_ranking,
        )

    def _land_global(self, family: Family, value: float, proposal: Candidate) -> Landing:
        """Bisect the shared ratio of Torch-Pruning's global pruning on real prunings (its widths depend on the
        weights, so the cost model cannot predict them); for latency, then measure and correct as usual."""
        from yoloprune.pruning import measure_costs, prune_candidate

        cache: dict[float, float] = {}
        metric = self.target.metric

        def reduction(s: float) -> float:
            if s not in cache:
                ratios = {**self.space.fixed(), **family(s)}
                pruned = prune_candidate(
                    self.costs.model, Candidate(ratios, proposal.importance, proposal.round_to, global_ranking=True)
                )
                costs = measure_costs(pruned, self.config.imgsz)
                flops = 1.0 - costs.gflops / self.costs.base_gflops
                if metric == "params_reduction":
                    cache[s] = 1.0 - costs.params / self.costs.base_params
                elif self.latency is not None:
                    cache[s] = 1.0 - self.latency.predict(1.0 - flops)
                else:
                    cache[s] = flops
            return cache[s]

        def bisect(offset: float) -> Landing:
            lo, hi = 0.0, 1.0
            best = min((0.0, 1.0), key=lambda s: abs(reduction(s) + offset - value))
            for _ in range(16):
                if abs(reduction(best) + offset - value) <= self.target.tolerance / 2 or reduction(hi) + offset < value:
                    break
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if reduction(mid) + offset < value else (lo, mid)
                best = min((best, mid), key=lambda s: abs(reduction(s) + offset - value))
            return Landing(family(best), value, reduction(best) + offset, self.target.tolerance, best)

        if self.latency is None:
            return bisect(0.0)
        offset, best = 0.0, None
        for k in range(1, self.target.max_measurements + 1):
            landing = bisect(offset)
            real = self._measured(landing.ratios, proposal.round_to, global_ranking=True)
            measured = Landing(landing.ratios, value, real, self.target.tolerance, landing.position, k)
            if best is None or abs(real - value) < abs(best.achieved - value):
                best = measured
            if measured.on_target:
                break
            offset = real - (landing.achieved - offset)
        if best is None:
            raise InternalError(f"no landing measured (max_measurements {self.target.max_measurements}, must be >= 1).")
        return best

    def _land(self, family: Family, value: float, round_to: int) -> Landing:
        if self.latency is None:
            return self.lander.land(family, value, round_to)
        return land_on_latency(
            self.lander, family, value, round_to, measure=self._measured, max_measurements=self.target.max_measurements
        )

    def _measured(self, ratios: dict[str, float], round_to: int, *, global_ranking: bool = False) -> float:
        if self._measure is None or self.latency is None:
            raise InternalError("a latency landing without a latency measurement or model.")
        full = {**self.space.fixed(), **ratios}
        reduction = self._measure(full, round_to, global_ranking)
        if not global_ranking:  # its widths are not the cost model's: keep it out of the latency model
            flops_ratio = 1.0 - self.costs.cost(full, round_to).flops_reduction
            self.latency.add(flops_ratio, 1.0 - reduction)
        return reduction


def enqueue_at_targets(study: optuna.Study, targeting: Targeting, method: str) -> list[float]:
    """Queue ``method``'s candidate at every target value not queued before (``uniform``, ``sensitivity``:
    one deterministic candidate per value); returns the values queued now.

    The trial's parameters are the landed allocation moved onto the space's grid; the trial lands again
    along ``method``'s family when it runs (tagged by the ``method`` attribute), so it is on its target.
    """
    space = targeting.space
    records = [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False)]
    done = {float(r.target_value) for r in records if r.method == method and r.target_value is not None}
    importance, round_to = space.importances[0], space.round_tos[0]
    middle = {n: (r.low + r.high) / 2 for n, r in space.searched().items()}
    queued = []
    for value in targeting.values:
        if value in done:
            continue
        landing = targeting.land(method, Candidate({**space.fixed(), **middle}, importance, round_to), value)
        params: dict[str, Any] = space.snap(
            {
                **{f"ratio.{n}": v for n, v in landing.ratios.items()},
                "importance": importance,
                "round_to": round_to,
            }
        )
        if len(targeting.values) > 1:
            params[TARGET_PARAM] = value
        enqueue(study, params, TrialRecord(method=method, target_value=value))
        queued.append(value)
    return queued


def session_targeting(session: Session) -> Targeting:
    """The session's targeting; a latency cost target measures on the session's hardware evaluator."""
    config, exp = session.exp.config, session.exp
    target = config.cost_target
    if target is None:
        raise InternalError("session_targeting without a cost_target.")
    name = target.latency_target
    if name is None:
        targeting = Targeting(config, exp.base)
        targeting.check()
        return targeting
    hardware = session.evaluator.hardware
    if hardware is None:
        raise LatencyTargetError(f"cost_target {target.metric} needs latency target '{name}', which is not measured.")
    key = f"latency_ms.{name}"

    def measure(ratios: dict[str, float], round_to: int, global_ranking: bool = False) -> float:
        candidate = Candidate(ratios, config.space.importances[0], round_to, global_ranking=global_ranking)
        measured, _ = hardware.measure(prune_candidate(exp.base, candidate))
        return 1.0 - measured[key] / session.baseline[key]

    targeting = Targeting(config, exp.base, measure_latency=measure)
    targeting.calibrate()
    targeting.check()
    return targeting
