"""Put every candidate on its cost target before it is evaluated, so that a search compares like with like.

A method proposes an allocation (per-stage ratios); :class:`Lander` moves it along a one-parameter family of
allocations (``position`` 0: every searched stage at the bottom of its range, 1: at the top) until its cost
reduction lands within the target's tolerance. The family keeps the method's intent: a sampled proposal is
pushed towards its stages' bounds in proportion (:func:`bounds_family`), uniform pruning keeps one shared
ratio (:func:`uniform_family`), the sensitivity method moves one global trade-off. Costs are counted
exactly by :class:`~yoloprune.pruning.widths.CostModel` (channel rounding included), so the family is a
step function of its position; when a global bisection straddles the target with a step larger than the
tolerance, the stages are moved one at a time between the two sides, which gives finer steps.

For latency targets the position is bisected on a latency model fitted from measured candidates
(:class:`LatencyModel`, piecewise linear in the FLOPs ratio, as ModelOpt fits it), then confirmed with a real
measurement and corrected by the measured residual, up to ``max_measurements`` times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yoloprune.errors import ConfigError, InternalError
from yoloprune.spaces import SearchSpace

#: An allocation of the searched stages as a function of position in [0, 1] (more pruning as it grows).
Family = Callable[[float], dict[str, float]]
#: The cost reduction (0: as the base, 1: nothing left) of an allocation at a ``round_to``.
Reduction = Callable[[Mapping[str, float], int], float]

_BISECTIONS = 40
_DIGITS = 6  # ratios are stored rounded, so the family rounds before it is costed


def bounds_family(space: SearchSpace, proposal: Mapping[str, float]) -> Family:
    """``proposal`` at position 0.5; below, each stage moves towards its ``low`` in proportion, above towards its ``high``."""
    stages = space.searched()

    def at(s: float) -> dict[str, float]:
        out = {}
        for name, r in stages.items():
            p = min(max(float(proposal[name]), r.low), r.high)
            v = r.low + (p - r.low) * 2 * s if s <= 0.5 else p + (r.high - p) * (2 * s - 1)
            out[name] = round(v, _DIGITS)
        return out

    return at


def uniform_family(space: SearchSpace) -> Family:
    """One ratio ``u`` on every searched stage (clipped to each stage's range), ``u`` from the lowest ``low``
    at position 0 to the highest ``high`` at 1."""
    stages = space.searched()
    lo, hi = min(r.low for r in stages.values()), max(r.high for r in stages.values())

    def at(s: float) -> dict[str, float]:
        u = lo + (hi - lo) * s
        return {name: round(min(max(u, r.low), r.high), _DIGITS) for name, r in stages.items()}

    return at


def uniform_ratio(space: SearchSpace, ratios: Mapping[str, float]) -> float:
    """The shared ratio of a uniform allocation (the largest one: stages clipped by their range hold less)."""
    return max(float(ratios[n]) for n in space.searched())


@dataclass(frozen=True)
class Landing:
    """Where one candidate landed.

    Attributes:
        ratios: the searched stages' ratios (fixed stages not included).
        target: the reduction asked for.
        achieved: the reduction this allocation has (exact for FLOPs and params; measured for latency).
        tolerance: how far ``achieved`` may lie from ``target``.
        position: where on its family it landed.
        measurements: real latency measurements it took (0 for FLOPs and params).
    """

    ratios: dict[str, float]
    target: float
    achieved: float
    tolerance: float
    position: float
    measurements: int = 0

    @property
    def on_target(self) -> bool:
        return abs(self.achieved - self.target) <= self.tolerance + 1e-9

    def as_dict(self, metric: str) -> dict[str, object]:
        return {
            "metric": metric, "value": self.target, "achieved": self.achieved, "tolerance": self.tolerance,
            "on_target": self.on_target, "position": self.position, "measurements": self.measurements,
        }  # fmt: skip


class Lander:
    """Lands allocations of ``space`` on reductions of one cost metric.

    Args:
        space: the search space (its searched stages are moved, its fixed stages kept).
        metric: the cost metric's name (for messages).
        tolerance: the target's tolerance.
        reduction: the reduction of a full allocation (searched and fixed stages) at a ``round_to``.
    """

    def __init__(self, space: SearchSpace, metric: str, tolerance: float, reduction: Reduction) -> None:
        self.space = space
        self.metric = metric
        self.tolerance = tolerance
        self._reduction = reduction
        self._fixed = space.fixed()
        self._stages = list(space.searched())
        if not self._stages:
            raise ConfigError("cost_target needs at least one searched stage (a ratio range with low < high).")

    def reduction(self, ratios: Mapping[str, float], round_to: int) -> float:
        return self._reduction({**self._fixed, **ratios}, round_to)

    def reachable(self, round_to: int) -> tuple[float, float]:
        """The smallest and largest reduction the space reaches (every searched stage at low, at high)."""
        family = uniform_family(self.space)
        return self.reduction(family(0.0), round_to), self.reduction(family(1.0), round_to)

    def check(self, values: list[float], round_to: int) -> None:
        """Raise :class:`ConfigError` for a target the space cannot reach, naming the reachable range."""
        lo, hi = self.reachable(round_to)
        for v in values:
            if not lo - self.tolerance <= v <= hi + self.tolerance:
                raise ConfigError(
                    f"cost_target {self.metric} {v} is out of reach: this space reaches {lo:.3f} (every searched "
                    f"stage at its low) to {hi:.3f} (at its high) with round_to {round_to}. Choose a value in that "
                    "range, or widen the stages' ranges."
                )

    def land(self, family: Family, target: float, round_to: int, *, offset: float = 0.0) -> Landing:
        """The allocation of ``family`` (then of single stages) whose reduction is closest to ``target``.

        ``offset`` is added to every reduction (the latency model's measured residual).
        """

        def cost(ratios: Mapping[str, float]) -> float:
            return self.reduction(ratios, round_to) + offset

        best: Landing | None = None

        def consider(ratios: dict[str, float], achieved: float, s: float) -> None:
            nonlocal best
            if best is None or abs(achieved - target) < abs(best.achieved - target):
                best = Landing(dict(ratios), target, achieved, self.tolerance, s)

        lo_s, hi_s = 0.0, 1.0
        for s in (lo_s, hi_s):
            consider(family(s), cost(family(s)), s)
        if cost(family(hi_s)) < target or cost(family(lo_s)) >= target:
            if best is None:  # consider() keeps the first landing it is given
                raise InternalError("landing considered no allocation.")
            return best  # the family cannot cross the target: the closest end
        for _ in range(_BISECTIONS):
            mid = (lo_s + hi_s) / 2
            ratios = family(mid)
            achieved = cost(ratios)
            consider(ratios, achieved, mid)
            if achieved < target:
                lo_s = mid
            else:
                hi_s = mid
        if best is None:
            raise InternalError("landing considered no allocation.")
        if best.on_target:
            return best
        position = (lo_s + hi_s) / 2
        self._refine(family(lo_s), family(hi_s), target, cost, lambda r, a: consider(r, a, position))
        for _ in range(2):  # still off: move one stage at a time over its whole range, from the closest so far
            if best.on_target:
                break
            start = dict(best.ratios)
            for name in self._stages:
                self._bisect_stage(start, name, target, cost, lambda r, a: consider(r, a, position))
        return best

    def _refine(
        self,
        below: dict[str, float],
        above: dict[str, float],
        target: float,
        cost: Callable[[Mapping[str, float]], float],
        consider: Callable[[dict[str, float], float], None],
    ) -> None:
        """Move the stages from ``below`` to ``above`` one at a time; bisect the one that crosses the target."""
        current = dict(below)
        for name in self._stages:
            if above[name] == below[name]:
                continue
            step = {**current, name: above[name]}
            achieved = cost(step)
            consider(step, achieved)
            if achieved < target:
                current = step
                continue
            self._bisect_stage(current, name, target, cost, consider, below[name], above[name])
            return

    def _bisect_stage(
        self,
        ratios: dict[str, float],
        name: str,
        target: float,
        cost: Callable[[Mapping[str, float]], float],
        consider: Callable[[dict[str, float], float], None],
        a: float | None = None,
        b: float | None = None,
    ) -> None:
        """Bisect stage ``name`` alone (the others as in ``ratios``) between ``a`` and ``b`` (default: its range)."""
        r = self.space.searched()[name]
        a = r.low if a is None else a
        b = r.high if b is None else b
        for _ in range(_BISECTIONS):
            mid = round((a + b) / 2, _DIGITS)
            if mid in (a, b):
                break
            trial = {**ratios, name: mid}
            achieved = cost(trial)
            consider(trial, achieved)
            a, b = (mid, b) if achieved < target else (a, mid)


@dataclass
class LatencyModel:
    """Latency ratio (candidate / base) as a piecewise-linear function of the FLOPs ratio, fitted on
    measured candidates (the base is the point (1, 1)). With no measurement yet, latency follows FLOPs."""

    points: dict[float, list[float]] = field(default_factory=dict)

    def add(self, flops_ratio: float, latency_ratio: float) -> None:
        self.points.setdefault(round(flops_ratio, 3), []).append(latency_ratio)

    def predict(self, flops_ratio: float) -> float:
        xs = sorted({1.0, *self.points})
        ys = [1.0 if x == 1.0 and x not in self.points else sum(self.points[x]) / len(self.points[x]) for x in xs]
        if len(xs) == 1:
            return flops_ratio
        i = next((k for k in range(1, len(xs)) if xs[k] >= flops_ratio), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (flops_ratio - x0) / (x1 - x0)


def land_on_latency(
    lander: Lander,
    family: Family,
    target: float,
    round_to: int,
    *,
    measure: Callable[[dict[str, float], int], float],
    max_measurements: int,
) -> Landing:
    """Land on a latency reduction: bisect on ``lander``'s (model-based) reduction, measure the result with
    ``measure`` (the real reduction), correct the model by the residual, and again, at most ``max_measurements``
    times. Returns the measured landing closest to ``target``."""
    offset = 0.0
    best: Landing | None = None
    for k in range(1, max_measurements + 1):
        landing = lander.land(family, target, round_to, offset=offset)
        predicted = landing.achieved - offset
        real = measure(landing.ratios, round_to)
        measured = Landing(landing.ratios, target, real, lander.tolerance, landing.position, k)
        if best is None or abs(real - target) < abs(best.achieved - target):
            best = measured
        if measured.on_target:
            break
        offset = real - predicted  # the model is off by this much around here
    if best is None:
        raise InternalError(f"landing on latency measured nothing (max_measurements {max_measurements}, must be >= 1).")
    return best
