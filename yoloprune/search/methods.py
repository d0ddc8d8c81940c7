"""Search methods behind one registry (each method's family of allocations; see :mod:`yoloprune.search.targeting`
for how a trial is put on its target with it).

A method (``engine.sampler`` in the config) decides two things: whether an Optuna sampler proposes the
allocations (``tpe``, ``cmaes``, ``nsga2``, ``random``, ``grid``), and along which one-parameter family of
allocations a candidate is moved onto the cost target (:mod:`yoloprune.search.targets`). ``uniform`` and
``sensitivity`` propose nothing themselves: they place one candidate at each target value. Every search
with a cost target also evaluates uniform pruning at each target value first (candidate 0), so a search's
best is never below uniform on the proxy.

Every method is a :class:`Method` in :data:`yoloprune.registry.SEARCH_METHODS`; to add one, register it::

    def _mine(ctx: MethodContext, proposal: Mapping[str, float]) -> Family: ...

    SEARCH_METHODS.register("mine", Method("mine", "what it does", samples=False, family=_mine))

(a method with ``samples=True`` also needs an Optuna sampler of the same name in
:data:`yoloprune.registry.SAMPLERS`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from yoloprune.errors import ConfigError
from yoloprune.pruning.widths import CostModel
from yoloprune.registry import SEARCH_METHODS
from yoloprune.search.targets import (
    Family,
    bounds_family,
    uniform_family,
)
from yoloprune.spaces import SearchSpace

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
    """One search method (an entry of :data:`yoloprune.registry.SEARCH_METHODS`, under its ``name``)."""

    name: str
    summary: str
    samples: bool  # an Optuna sampler proposes its allocations
    family: Callable[[MethodContext, Mapping[str, float]], Family]
    global_ranking: bool = False  # prunes with Torch-Pruning's global ranking (the family's shared ratio)


def get_method(name: str) -> Method:
    """The search method registered as ``name`` in :data:`~yoloprune.registry.SEARCH_METHODS`; an unknown name
    lists the known ones."""
    method: Method = SEARCH_METHODS.get(name)
    return method


def _proposal_family(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return bounds_family(ctx.space, proposal)


def _sampled(name: str) -> Method:
    return Method(
        name, f"Optuna's {name} sampler over allocations, each pushed onto the target", True, _proposal_family
    )


def _uniform(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return uniform_family(ctx.space)


def _sensitivity(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
    return sensitivity_family(ctx)


TPE = _sampled("tpe")
CMAES = _sampled("cmaes")
NSGA2 = _sampled("nsga2")
RANDOM = _sampled("random")
GRID = _sampled("grid")
UNIFORM = Method(
    "uniform", "one ratio on every searched stage, bisected to each target value", samples=False, family=_uniform
)
TP_GLOBAL = Method(
    "tp_global",
    "Torch-Pruning's global pruning (channels ranked across all searched stages at once), its ratio "
    "bisected to each target value on real prunings: a reference baseline",
    samples=False,
    family=_uniform,
    global_ranking=True,
)
SENSITIVITY = Method(
    "sensitivity",
    "per-stage sensitivity curves after BN re-estimation, then one global trade-off bisected to the target",
    samples=False,
    family=_sensitivity,
)


_OPTIONS = 41  # ratios per stage the sensitivity family chooses from


def sensitivity_family(ctx: MethodContext) -> Family:
    """FastNAS's allocation, as a Lagrangian: at trade-off ``lam`` each stage takes the ratio minimising
    ``drop(r) - lam * saved(r)``, where ``drop`` is the stage's measured relative mAP drop when pruned alone
    (interpolated) and ``saved`` the FLOPs reduction it gives alone. Position 0 is ``lam`` 0 (least pruning),
    1 is infinite ``lam`` (most); the bisection finds the ``lam`` that meets the target."""
    stages = ctx.space.searched()
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
