"""How a search is going beyond its front: the hypervolume of the feasible front trial by trial, and which
parameters mattered for each objective.

Both read the judged trial table (:func:`yoloprune.search.results.judged_frame`), so a trial is feasible here
exactly when the front counts it so: on its measured or calibrated final drop where a calibration is usable, on
the stored constraints otherwise. Optuna computes both, through its public API, on a copy of the study in
memory: ``optuna.visualization.plot_hypervolume_history`` on trials whose constraints are the judged verdicts
(the stored study holds the proxy's), and ``optuna.importance.get_param_importances`` (PED-ANOVA) on one
single-objective copy per objective.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import optuna
import pandas as pd

from yoloprune.config import ExperimentConfig
from yoloprune.config.objectives import ACCURACY_METRICS

#: PED-ANOVA's "good" trials: the best quarter. Optuna's default (the best 10%) suits hundreds of trials; a
#: search here runs tens, and Optuna's documentation asks for at least 5 trials in that set (20 trials here).
TARGET_QUANTILE = 0.25
#: Fewer usable trials than this and the best quarter is one or two trials: no importances, and ``n/a`` says why.
MIN_IMPORTANCE_TRIALS = 10


# --- hypervolume ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HypervolumeHistory:
    """The hypervolume the feasible trials so far dominate, after each complete trial.

    Attributes:
        trials: the complete trials' numbers, in order; values: the hypervolume after each (non-decreasing).
        reference: the reference point, one value per objective (the config's order); sources: where each
            reference value comes from (``no accuracy``, ``unpruned``, ``worst trial``).
    """

    trials: list[int]
    values: list[float]
    reference: list[float]
    sources: list[str]

    @property
    def final(self) -> float:
        return self.values[-1] if self.values else 0.0

    @property
    def last_growth(self) -> int | None:
        """The trial after which the hypervolume last grew (None: it never did)."""
        previous, grew = 0.0, None
        for trial, value in zip(self.trials, self.values, strict=True):
            if value > previous:
                grew = trial
            previous = value
        return grew


def reference_point(
    config: ExperimentConfig, base: Mapping[str, float], trials: pd.DataFrame
) -> tuple[list[float], list[str]]:
    """Each objective's hypervolume reference, and where it comes from.

    Fixed by what the metrics mean, not by the trials, so it does not move as trials arrive and two searches on
    the same base compare: no accuracy at all (mAP 0, a drop of 100%) and the unpruned model's cost (its GFLOPs,
    params, size or latency; a reduction of 0, a latency ratio of 1). The hypervolume is then the objective-space
    volume the feasible trials win from "unpruned cost, no accuracy". Where that is unknown (no stored baseline)
    or the config's direction is the unusual one, the worst complete trial's value.
    """
    reference, sources = [], []
    for objective in config.objectives:
        direction, natural, source = _natural_reference(objective.metric, base)
        if direction == objective.direction and natural is not None and math.isfinite(natural):
            reference.append(natural)
            sources.append(source)
            continue
        done = trials.loc[trials["state"] == "complete", objective.metric].astype(float).dropna()
        worst = done.min() if objective.direction == "maximize" else done.max()
        reference.append(float(worst) if len(done) else 0.0)
        sources.append("worst trial")
    return reference, sources


def _natural_reference(metric: str, base: Mapping[str, float]) -> tuple[str, float | None, str]:
    """(the direction a metric is optimised in, its reference value, where that comes from)."""
    if metric in ("map50", "map50_95"):
        return "maximize", 0.0, "no accuracy"
    if metric.endswith("_drop"):
        return "minimize", 1.0, "no accuracy"
    if metric.endswith("_reduction") or metric.startswith("latency_reduction."):
        return "maximize", 0.0, "unpruned"
    if metric.startswith("latency_ratio."):
        return "minimize", 1.0, "unpruned"
    value = base.get(metric)  # a raw cost: params, gflops, size_mb, latency_ms.<target>
    return "minimize", (float(value) if value else None), "unpruned"


def hypervolume_history(
    trials: pd.DataFrame, config: ExperimentConfig, base: Mapping[str, float]
) -> HypervolumeHistory | None:
    """The hypervolume history of a judged trial table; None for a single-objective search (the progress plot's
    best value is its history)."""
    if len(config.objectives) < 2:
        return None
    metrics = [o.metric for o in config.objectives]
    if trials.empty or any(m not in trials for m in metrics):  # nothing measured these objectives yet
        return HypervolumeHistory([], [], [], [])
    reference, sources = reference_point(config, base, trials)
    done = trials[trials["state"] == "complete"].sort_values("trial")
    done = done[done[metrics].astype(float).notna().all(axis=1)]
    numbers = [int(n) for n in done["trial"]]
    feasible = (done["feasible"] == True).to_numpy()  # noqa: E712
    if not feasible.any():
        return HypervolumeHistory(numbers, [0.0] * len(numbers), reference, sources)
    copy = optuna.create_study(directions=[o.direction for o in config.objectives])
    copy.add_trials(
        [
            optuna.trial.create_trial(values=[float(v) for v in row], constraints={"judged": 0.0 if ok else 1.0})
            for row, ok in zip(done[metrics].to_numpy(dtype=float), feasible, strict=True)
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figure = optuna.visualization.plot_hypervolume_history(copy, reference)
    values = [float(v) for v in figure.data[0].y]  # one per trial of the copy: the complete ones, in order
    return HypervolumeHistory(numbers, values, reference, sources)


def describe_hypervolume(history: HypervolumeHistory | None, config: ExperimentConfig) -> str:
    """One line for ``results``: the final hypervolume, its reference, where it stood at each quarter of the
    trials, and when it last grew."""
    if history is None:
        return "hypervolume: n/a (one objective; the best value so far is the search's progress)"
    if not history.values:
        return "hypervolume: n/a (no complete trial yet)"
    reference = ", ".join(
        f"{o.metric} {v:g} ({s})" for o, v, s in zip(config.objectives, history.reference, history.sources, strict=True)
    )
    n = len(history.values)
    quarters = sorted({max(0, math.ceil(n * q) - 1) for q in (0.25, 0.5, 0.75, 1.0)})
    steps = ", ".join(f"{history.values[i]:.4g} after trial {history.trials[i]}" for i in quarters)
    grew = history.last_growth
    last = f"; last grew at trial {grew}" if grew is not None else "; no feasible trial inside the reference yet"
    return f"hypervolume of the feasible front (reference {reference}): {steps}{last}"


# --- parameter importances ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Importances:
    """PED-ANOVA importances per objective.

    Attributes:
        by_objective: ``{metric: {param: importance}}``, each summing to 1.
        counts: the trials each objective's importances were computed on (or would have been).
        skipped: why an objective has none (``{metric: reason}``).
    """

    by_objective: dict[str, dict[str, float]]
    counts: dict[str, int]
    skipped: dict[str, str]


def param_importances(study: optuna.Study, trials: pd.DataFrame, config: ExperimentConfig) -> Importances:
    """Which sampled parameters mattered for each objective: Optuna's PED-ANOVA (its default evaluator, NumPy
    only), on how the best quarter of the trials differ from all of them.

    Counted: complete trials that are not a copy of another (a duplicate would count its candidate twice); for an
    accuracy objective, only fine-tuned ones (a cost-infeasible trial skipped its fine-tune, so its mAP is not
    comparable). The parameters are what the sampler chose (with a cost target, the proposal before landing).
    """
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    by_number = {t.number: t for t in complete if t.params}
    result = Importances({}, {}, {})
    for objective in config.objectives:
        metric = objective.metric
        if trials.empty or metric not in trials:
            result.counts[metric] = 0
            result.skipped[metric] = f"fewer than {MIN_IMPORTANCE_TRIALS} complete trials; 0 so far"
            continue
        done = trials[(trials["state"] == "complete") & trials["duplicate_of"].isna() & trials["trial"].isin(by_number)]
        rows = done[done["finetuned"] != False] if metric in ACCURACY_METRICS else done  # noqa: E712
        values = rows[metric].astype(float)
        rows, values = rows[values.notna()], values[values.notna()]
        result.counts[metric] = len(rows)
        if len(rows) < MIN_IMPORTANCE_TRIALS:
            result.skipped[metric] = f"fewer than {MIN_IMPORTANCE_TRIALS} complete trials; {len(rows)} so far"
            continue
        if values.nunique() < 2:
            result.skipped[metric] = f"every trial has the same {metric}"
            continue
        copy = optuna.create_study(direction=objective.direction)
        copy.add_trials(
            [
                optuna.trial.create_trial(
                    params=by_number[int(n)].params, distributions=by_number[int(n)].distributions, value=float(v)
                )
                for n, v in zip(rows["trial"], values, strict=True)
            ]
        )
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=TARGET_QUANTILE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "importances will be equal" on near-ties: shown as they are
            found = optuna.importance.get_param_importances(copy, evaluator=evaluator)
        result.by_objective[metric] = {k: float(v) for k, v in found.items()}
    return result


def describe_importances(result: Importances, top: int = 5) -> list[str]:
    """Lines for ``results``: each objective's most important parameters, or why it has none."""
    lines = [f"parameter importances (PED-ANOVA: the best {TARGET_QUANTILE:.0%} of the trials against all):"]
    for metric, n in result.counts.items():
        if metric in result.skipped:
            lines.append(f"  for {metric}: n/a ({result.skipped[metric]})")
            continue
        ranked = sorted(result.by_objective[metric].items(), key=lambda kv: kv[1], reverse=True)
        lines.append(f"  for {metric} ({n} trials): " + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:top]))
    return lines


def importance_table(result: Importances) -> pd.DataFrame:
    """One row per parameter, one column per objective (most important first by the first objective)."""
    table = pd.DataFrame(result.by_objective).fillna(0.0)
    if table.empty:
        return table
    return table.sort_values(table.columns[0], ascending=False).round(4)
