"""Search methods behind one registry (each method's family of allocations; see :mod:`yoloprune.search.targeting`
for how a trial is put on its target with it).

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

from yoloprune.config.schema import SAMPLERS
from yoloprune.errors import ConfigError, did_you_mean
from yoloprune.pruning.widths import CostModel
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
    """One registered search method."""

    name: str
    summary: str
    samples: bool  # an Optuna sampler proposes its allocations
    family: Callable[[MethodContext, Mapping[str, float]], Family]
    global_ranking: bool = False  # prunes with Torch-Pruning's global ranking (the family's shared ratio)


_REGISTRY: dict[str, Method] = {}


def register(
    name: str, summary: str, *, samples: bool, global_ranking: bool = False
) -> Callable[[Callable[..., Family]], Callable[..., Family]]:
    """Register a method's family under ``name``."""

    def wrap(fn: Callable[[MethodContext, Mapping[str, float]], Family]) -> Callable[..., Family]:
        _REGISTRY[name] = Method(name, summary, samples, fn, global_ranking)
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
    "tp_global",
    "Torch-Pruning's global pruning (channels ranked across all searched stages at once), its ratio "
    "bisected to each target value on real prunings: a reference baseline",
    samples=False,
    global_ranking=True,
)
def _tp_global(ctx: MethodContext, proposal: Mapping[str, float]) -> Family:
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
