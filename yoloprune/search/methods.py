"""Search methods behind one registry, and the targeting that puts each method's candidates on the cost target.

A method (``engine.sampler`` in the config) decides two things: whether an Optuna sampler proposes the
allocations (``tpe``, ``cmaes``, ``nsga2``, ``random``, ``grid``), and along which one-parameter family of
allocations a candidate is moved onto the cost target (:mod:`yoloprune.search.targets`). ``uniform`` and
``sensitivity`` propose nothing themselves: they place one candidate at each target value. Every search
with a cost target also evaluates uniform pruning at each target value first (candidate 0), so a search's
best is never below uniform on the proxy.

To add a method, register its family::

    @register("mine", "what it does", samples=False)
    def _mine(ctx: MethodContext, proposal: Mapping[str, float]) -> Family: ...
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from yoloprune.config import SAMPLERS, ExperimentConfig
from yoloprune.errors import ConfigError, did_you_mean
from yoloprune.pruning.widths import CostModel
from yoloprune.search.targets import (
    Family,
    Lander,
    Landing,
    LatencyModel,
    bounds_family,
    fixed,
    land_on_latency,
    searched,
    uniform_family,
)
from yoloprune.spaces import Candidate, SearchSpace

#: The Optuna parameter holding a trial's target value, when the cost target lists several.
TARGET_PARAM = "cost_target"


@dataclass
class MethodContext:
    """What a method's family may use: the space, exact costs and (for ``sensitivity``) the stage curves."""

    space: SearchSpace
    costs: CostModel
    round_to: int
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # stage -> [(ratio, drop)]


@dataclass(frozen=True)
class Method:
    """One registered search method."""

    name: str
    summary: str
    samples: bool  # an Optuna sampler proposes its allocations
    family: Callable[[MethodContext, Mapping[str, float]], Family]


_REGISTRY: dict[str, Method] = {}


def register(name: str, summary: str, *, samples: bool) -> Callable[[Callable[..., Family]], Callable[..., Family]]:
    """Register a method's family under ``name``."""

    def wrap(fn: Callable[[MethodContext, Mapping[str, float]], Family]) -> Callable[..., Family]:
        _REGISTRY[name] = Method(name, summary, samples, fn)
        return fn

    return wrap


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name lists the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown search method '{name}'.{did_you_mean(name, _REGISTRY)} Known: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


def _proposal_family(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return bounds_family(ctx.space, proposal)


for _name in SAMPLERS:
    register(_name, f"Optuna's {_name} sampler over allocations, each pushed onto the target", samples=True)(
        _proposal_family
    )


@register("uniform", "one ratio on every searched stage, bisected to each target value", samples=False)
def _uniform(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return uniform_family(ctx.space)


@register(
    "sensitivity",
    "per-stage sensitivity curves after BN re-estimation, then one global trade-off bisected to the target",
    samples=False,
)
def _sensitivity(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return sensitivity_family(ctx)


_OPTIONS = 41  # ratios per stage the sensitivity family chooses from


def sensitivity_family(ctx: MethodContext) -> Family:
    """FastNAS's allocation, as a Lagrangian: at trade-off ``lam`` each stage takes the ratio minimising
    ``drop(r) - lam * saved(r)``, where ``drop`` is the stage's measured relative mAP drop when pruned alone
    (interpolated) and ``saved`` the FLOPs reduction it gives alone. Position 0 is ``lam`` 0 (least pruning),
    1 is infinite ``lam`` (most); the bisection finds the ``lam`` that meets the target."""
    stages = searched(ctx.space)
    missing = sorted(set(stages) - set(ctx.curves))
    if missing:
        raise ConfigError(f"the sensitivity curves lack stage(s) {', '.join(missing)}; they are measured first.")
    options: dict[str, list[tuple[float, float, float]]] = {}
    for name, r in stages.items():
        points = sorted([(0.0, 0.0), *ctx.curves[name]])
        rows = []
        for k in range(_OPTIONS):
            ratio = round(r.low + (r.high - r.low) * k / (_OPTIONS - 1), 6)
            saved = ctx.costs.cost({name: ratio}, ctx.round_to).flops_reduction
            rows.append((ratio, _interpolate(points, ratio), saved))
        options[name] = rows
    slopes = sorted(
        (rows[-1][1] - rows[0][1]) / (rows[-1][2] - rows[0][2]) for rows in options.values() if rows[-1][2] > rows[0][2]
    )
    scale = max(slopes[len(slopes) // 2], 1e-3) if slopes else 1.0

    def at(s: float) -> dict[str, float]:
        if s >= 1.0:
            return {name: rows[-1][0] for name, rows in options.items()}
        lam = scale * s / (1.0 - s)
        return {name: min(rows, key=lambda o: (o[1] - lam * o[2], o[0]))[0] for name, rows in options.items()}

    return at


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) * (x - x1) / max(x1 - x0, 1e-9)


class Targeting:
    """Lands each trial's candidate on its cost-target value, with the trial's method's family.

    Args:
        config: the experiment (its ``cost_target`` must be set).
        base: the base model (costed exactly, never modified).
        measure_latency: for a latency metric, the measured reduction of an allocation at a ``round_to``.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        base: Any,
        *,
        measure_latency: Callable[[dict[str, float], int], float] | None = None,
    ) -> None:
        if config.cost_target is None:
            raise ConfigError("internal error: targeting without a cost_target.")
        self.config = config
        self.target = config.cost_target
        self.space = config.space
        self.costs = CostModel(base, config.imgsz)
        self.curves: dict[str, list[tuple[float, float]]] = {}
        self.latency: LatencyModel | None = None
        self._measure = measure_latency
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

    def round_to_choices(self) -> list[int]:
        rt = self.space.round_to
        return [rt] if isinstance(rt, int) else list(rt)

    def calibrate(self) -> None:
        """For a latency target: measure uniform pruning at the bottom, middle and top of the space."""
        if self.latency is None or self._measure is None:
            return
        family = uniform_family(self.space)
        round_to = self.round_to_choices()[0]
        for s in (0.0, 0.5, 1.0):
            self._measured(family(s), round_to)

    def check(self) -> list[Landing]:
        """Before any training: every target value is reachable, and uniform pruning lands on each within
        the tolerance (else the tolerance is finer than the space's cost steps). Returns uniform's landings."""
        for round_to in self.round_to_choices():
            self.lander.check(self.values, round_to)
        round_to = self.round_to_choices()[0]
        landings = []
        for v in self.values:
            landing = self._land(uniform_family(self.space), v, round_to)
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
        ctx = MethodContext(self.space, self.costs, candidate.round_to, self.curves)
        family = get_method(method).family(ctx, candidate.ratios)
        return self._land(family, value, candidate.round_to)

    def full_ratios(self, candidate: Candidate, landing: Landing) -> dict[str, float]:
        """The candidate's ratios with the landed ones in place of the proposal's."""
        return {**candidate.ratios, **landing.ratios}

    def _land(self, family: Family, value: float, round_to: int) -> Landing:
        if self.latency is None:
            return self.lander.land(family, value, round_to)
        return land_on_latency(
            self.lander, family, value, round_to, measure=self._measured, max_measurements=self.target.max_measurements
        )

    def _measured(self, ratios: dict[str, float], round_to: int) -> float:
        assert self._measure is not None and self.latency is not None
        full = {**fixed(self.space), **ratios}
        reduction = self._measure(full, round_to)
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
    done = {
        float(t.user_attrs["target_value"])
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("method") == method and "target_value" in t.user_attrs
    }
    round_to = targeting.round_to_choices()[0]
    middle = {n: (r.low + r.high) / 2 for n, r in searched(space).items()}
    queued = []
    for value in targeting.values:
        if value in done:
            continue
        importance = space.importance if isinstance(space.importance, str) else space.importance[0]
        landing = targeting.land(method, Candidate({**fixed(space), **middle}, importance, round_to), value)
        params: dict[str, Any] = space.snap(
            {
                **{f"ratio.{n}": v for n, v in landing.ratios.items()},
                "importance": importance,
                "round_to": round_to,
            }
        )
        if len(targeting.values) > 1:
            params[TARGET_PARAM] = value
        study.enqueue_trial(params, user_attrs={"method": method, "target_value": value}, skip_if_exists=False)
        queued.append(value)
    return queued
