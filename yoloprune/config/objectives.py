"""Trial metrics, objectives, constraints, the scalar reward, and the Pareto front.

Metric names a config may use (``*_drop`` and ``*_reduction`` are relative to the baseline)::

    map50, map50_95, map50_drop, map50_95_drop        accuracy (after the proxy fine-tune)
    params, gflops, size_mb                           cost
    params_reduction, flops_reduction, size_reduction cost, as 1 - candidate / baseline
    latency_ms.<target>                               median latency measured on a configured target
    latency_ratio.<target>, latency_reduction.<target> candidate / baseline, and 1 - that
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator

ACCURACY_METRICS = ("map50", "map50_95", "map50_drop", "map50_95_drop")
COST_METRICS = ("params", "gflops", "size_mb", "params_reduction", "flops_reduction", "size_reduction")
METRICS = ACCURACY_METRICS + COST_METRICS
LATENCY_PREFIXES = ("latency_ms.", "latency_ratio.", "latency_reduction.")


def check_metric_name(name: str) -> str:
    """Return ``name`` if it is a known metric (latency metrics name a target), else raise ValueError."""
    if name in METRICS or (name.startswith(LATENCY_PREFIXES) and name.split(".", 1)[1]):
        return name
    from yoloprune.errors import did_you_mean

    raise ValueError(
        f"unknown metric '{name}'.{did_you_mean(name, METRICS)} Known: {', '.join(METRICS)}, and "
        "latency_ms.<target>, latency_ratio.<target>, latency_reduction.<target> for each latency target"
    )


MetricName = Annotated[str, AfterValidator(check_metric_name)]


def is_cost_metric(name: str) -> bool:
    """Known right after pruning, before any fine-tune (FLOPs, params, size, latency)."""
    return name in COST_METRICS or name.startswith(LATENCY_PREFIXES)


def latency_target_of(name: str) -> str | None:
    """The target a latency metric refers to (None for other metrics)."""
    return name.split(".", 1)[1] if name.startswith(LATENCY_PREFIXES) else None


class Objective(BaseModel):
    """One objective of the multi-objective search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    direction: Literal["maximize", "minimize"]


class Constraint(BaseModel):
    """A hard limit on one metric: ``{metric: map50_95_drop, max: 0.02}`` or ``{metric: flops_reduction, min: 0.5}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: MetricName
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        if (self.max is None) == (self.min is None):
            raise ValueError(f"constraint on '{self.metric}' needs exactly one of max or min")
        return self

    @property
    def on_cost(self) -> bool:
        """True when it can be checked right after pruning, before any fine-tune."""
        return is_cost_metric(self.metric)

    def violation(self, metrics: Mapping[str, float]) -> float:
        """How far ``metrics`` are outside the bound: <= 0 when satisfied (Optuna's convention)."""
        value = float(metrics[self.metric])
        return value - self.max if self.max is not None else float(self.min) - value  # type: ignore[arg-type]

    def describe(self) -> str:
        return f"{self.metric} <= {self.max}" if self.max is not None else f"{self.metric} >= {self.min}"


class RewardConfig(BaseModel):
    """``reward = (acc / acc_base) * (cost / cost_base) ** -weight - penalty * sum(violations)``.

    One scalar per trial, used to rank trials and as NNI's ``default`` metric. With the default weight
    0.3, halving FLOPs is worth a 19% relative accuracy loss; every unit of constraint violation costs
    ``penalty``, so an infeasible trial ranks below any feasible one with the same accuracy and cost.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    accuracy: Literal["map50", "map50_95"] = "map50_95"
    cost: MetricName = "gflops"  # or params, size_mb, latency_ms.<target>
    weight: float = 0.3
    penalty: float = 1.0


_RELATIVE = {
    "map50_drop": "map50",
    "map50_95_drop": "map50_95",
    "params_reduction": "params",
    "flops_reduction": "gflops",
    "size_reduction": "size_mb",
}


def relative_metrics(raw: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """Add the ``*_drop`` and ``*_reduction`` metrics (``1 - raw / baseline``) to ``raw``.

    A baseline of 0 (an untrained model) has nothing to lose: its drops and reductions are 0.
    """
    out = dict(raw)
    for name, key in _RELATIVE.items():
        if key in raw:
            base = float(baseline.get(key) or 0.0)
            out[name] = 1.0 - raw[key] / base if base > 0 else 0.0
    for key in [k for k in raw if k.startswith("latency_ms.")]:
        target, base = key.removeprefix("latency_ms."), float(baseline.get(key) or 0.0)
        ratio = raw[key] / base if base > 0 else 1.0
        out[f"latency_ratio.{target}"] = ratio
        out[f"latency_reduction.{target}"] = 1.0 - ratio
    return out


def violations(metrics: Mapping[str, float], constraints: Sequence[Constraint]) -> list[float]:
    """Each constraint's violation (<= 0: satisfied)."""
    return [c.violation(metrics) for c in constraints]


def reward(
    metrics: Mapping[str, float], baseline: Mapping[str, float], constraints: Sequence[Constraint], cfg: RewardConfig
) -> float:
    """The scalar reward of one trial (see :class:`RewardConfig`)."""
    base_acc, base_cost = baseline.get(cfg.accuracy) or 0.0, baseline.get(cfg.cost) or 0.0
    acc = metrics[cfg.accuracy] / base_acc if base_acc > 0 else metrics[cfg.accuracy]
    cost = metrics[cfg.cost] / base_cost if base_cost > 0 else 1.0
    value = acc * max(cost, 1e-9) ** -cfg.weight
    return float(value - cfg.penalty * sum(max(0.0, v) for v in violations(metrics, constraints)))


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values`` (n_trials x n_objectives)."""
    if len(values) == 0:
        return np.zeros(0, dtype=bool)
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    v = values * signs  # all objectives minimised
    mask = np.ones(len(v), dtype=bool)
    for i in range(len(v)):
        dominated = np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1)
        mask[i] = not dominated.any()
    return mask
