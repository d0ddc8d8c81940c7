"""Which trial to export or report: a number, or ``best`` by a policy, judged on the calibrated final drop."""

from __future__ import annotations

from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.storage.record import TrialRecord

Policy = Literal["fastest", "most_accurate"]


def select_trial(
    study: optuna.Study,
    config: ExperimentConfig,
    which: str = "best",
    *,
    policy: Policy = "fastest",
    latency_budget_ms: float | None = None,
) -> FrozenTrial:
    """The trial to export: a number, or ``best`` by ``policy``.

    ``fastest``: the feasible complete trial with the lowest cost (the first latency objective, else GFLOPs);
    with a cost target, the most accurate feasible trial at the largest target value any feasible trial reached.
    ``most_accurate``: the feasible complete trial with the highest mAP50-95 whose latency (first target)
    is within ``latency_budget_ms``.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"experiment '{config.name}' has no finished trial yet; run `yoloprune search` first.")
    if which != "best":
        if not which.isdigit() or int(which) >= len(trials):
            raise ConfigError(f"trial '{which}' does not exist; trials are numbered 0-{len(trials) - 1}.")
        trial = trials[int(which)]
        if trial.state != TrialState.COMPLETE:
            done = ", ".join(str(t.number) for t in complete)
            raise ConfigError(f"trial {which} is {trial.state.name.lower()}, not complete; complete trials: {done}.")
        return trial
    from yoloprune.search.calibration import verdicts

    judged = verdicts(study, config)  # on the calibrated final drop when the study has a usable calibration
    feasible = [t for t in complete if t.number in judged and judged[t.number].feasible]
    if not feasible:
        raise ConfigError(
            f"no feasible trial to call 'best' (constraints: {', '.join(c.describe() for c in config.constraints)}); "
            f"complete trials: {', '.join(str(t.number) for t in complete)}. Export one with --trial N."
        )
    latency = f"latency_ms.{config.targets[0].name}" if config.targets else None
    cost = next((o.metric for o in config.objectives if o.metric.startswith("latency_ms.")), latency or "gflops")
    if policy == "fastest" and config.cost_target is not None:
        # Candidates at one target value share its cost: the most aggressive value reached, then accuracy.
        landed = [t for t in feasible if _record(t).target_on] or feasible
        top = max(_target_value(t) for t in landed)
        at = [t for t in landed if _target_value(t) == top]
        return max(at, key=lambda t: _record(t).metric("map50_95"))
    if policy == "fastest":
        return min(feasible, key=lambda t: _record(t).metric(cost))
    if latency is None or latency_budget_ms is None:
        raise ConfigError("policy 'most_accurate' needs a latency target in the config and --latency-budget-ms.")
    within = [t for t in feasible if _record(t).metric(latency) <= latency_budget_ms]
    if not within:
        fastest = min(_record(t).metric(latency) for t in feasible)
        raise ConfigError(
            f"no feasible trial runs within {latency_budget_ms} ms on '{latency}'; the fastest takes {fastest:.2f} ms."
        )
    return max(within, key=lambda t: _record(t).metric("map50_95"))


def _record(trial: FrozenTrial) -> TrialRecord:
    return TrialRecord.from_frozen(trial)


def _target_value(trial: FrozenTrial) -> float:
    return float((_record(trial).target or {}).get("value", 0.0))
