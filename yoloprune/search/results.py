"""Read a finished (or running) search back from storage: the trial table and the feasible Pareto front."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pandas as pd

from yoloprune.config import ExperimentConfig
from yoloprune.config.objectives import pareto_mask
from yoloprune.storage.optuna_adapter import baseline_latency
from yoloprune.storage.record import TrialRecord
from yoloprune.tables import format_table

METRIC_COLUMNS = (
    "map50", "map50_95", "map50_95_drop", "gflops", "flops_reduction", "params", "params_reduction", "size_mb",
)  # fmt: skip


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, feasibility, reward, metrics, the candidate's ratios and knobs, errors."""
    rows: list[dict[str, Any]] = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.from_frozen(t)
        cand = rec.candidate or {}
        target = rec.target or {}
        row: dict[str, Any] = {
            "trial": t.number,
            "state": t.state.name.lower(),
            "feasible": rec.feasible,
            "finetuned": rec.finetuned,
            "reward": rec.reward,
            "uniform": rec.uniform,
            "method": rec.method,
            "cost_target": target.get("value"),
            "achieved": target.get("achieved"),
            "on_target": target.get("on_target"),
            "screen_rank": rec.screen_rank,
            "screen_score": rec.screen_score,
            "warm_start": rec.warm_start,
            "duplicate_of": rec.duplicate_of,
            "retry_of": rec.retry_of,
        }
        metrics = rec.metrics or {}
        row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
        row.update({k: v for k, v in metrics.items() if k.startswith(("latency_ms.", "latency_ratio."))})
        row.update({f"ratio.{k}": v for k, v in cand.get("ratios", {}).items()})
        row["importance"] = cand.get("importance")
        row["round_to"] = cand.get("round_to")
        row["seconds"] = (rec.timings or {}).get("total")
        row["error"] = rec.error
        rows.append(row)
    return pd.DataFrame(rows)


def judged_frame(study: optuna.Study, config: ExperimentConfig) -> pd.DataFrame:
    """:func:`trials_frame` with ``feasible`` judged as ``export best`` judges it: on the calibration's predicted
    final drop when the study has a usable one (``predicted_drop``; the proxy's verdict stays in ``feasible_proxy``)."""
    from yoloprune.search.calibration import verdicts

    trials = trials_frame(study)
    if trials.empty:
        return trials
    judged = verdicts(study, config)
    trials["feasible_proxy"] = trials["feasible"]
    trials["predicted_drop"] = [judged[t].predicted_drop if t in judged else None for t in trials["trial"]]
    trials["feasible"] = [judged[t].feasible if t in judged else f for t, f in zip(trials["trial"], trials["feasible"])]
    return trials


def pareto_front(trials: pd.DataFrame, config: ExperimentConfig, study: optuna.Study | None = None) -> pd.DataFrame:
    """Feasible complete trials not dominated on the config's objectives, best reward first.

    Which front: where the stored constraints decide (``study`` given, and every complete trial's feasibility and
    objective values in ``trials`` are the ones Optuna stored: no calibration judged it otherwise), Optuna's own
    ``study.best_trials``, which keeps the trials whose stored violations are all <= 0 and drops the dominated.
    Otherwise the stored constraints are not what decides (a calibration judges accuracy constraints on the
    measured or predicted final drop; an older study stored feasibility without Optuna constraints), and Optuna's
    front would keep trials the verdicts reject and miss ones they accept: the front is then the same
    non-domination rule (:func:`~yoloprune.config.objectives.pareto_mask`) over the judged-feasible trials.
    Either way the front is that of the feasibility ``results``, the report and ``export best`` show.
    """
    if trials.empty:
        return trials
    ok = trials[(trials["state"] == "complete") & (trials["feasible"] == True)]  # noqa: E712
    if ok.empty:
        return ok
    best = optuna_front(study, trials, config) if study is not None else None
    if best is not None and set(best) <= set(ok["trial"]):
        front = ok[ok["trial"].isin(best)]
    else:  # judged otherwise, or a trial finished after ``trials`` was read
        values = ok[[o.metric for o in config.objectives]].to_numpy(dtype=float)
        front = ok[pareto_mask(values, [o.direction for o in config.objectives])]
    return front.sort_values("reward", ascending=False)


def optuna_front(study: optuna.Study, trials: pd.DataFrame, config: ExperimentConfig) -> list[int] | None:
    """The numbers of ``study.best_trials`` when the stored constraints and values are those ``trials`` judges
    on (see :func:`pareto_front`); None when they are not."""
    best = [t.number for t in study.best_trials]  # read first: a trial finishing later shows in the check below
    by_number = trials.set_index("trial")
    metrics = [o.metric for o in config.objectives]
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number not in by_number.index or by_number.at[t.number, "state"] != "complete":
            return None
        row = by_number.loc[t.number]
        stored_feasible = all(v <= 0 for v in t.constraints.values())
        values = row[metrics].to_numpy(dtype=float)
        if stored_feasible != (row["feasible"] == True) or not np.array_equal(values, np.asarray(t.values, float)):  # noqa: E712
            return None
    return best


def summary_counts(trials: pd.DataFrame) -> dict[str, int]:
    """Trials by outcome: complete, feasible, pruned, failed, running."""
    if trials.empty:
        return {"complete": 0, "feasible": 0, "pruned": 0, "failed": 0}
    state = trials["state"]
    return {
        "complete": int((state == "complete").sum()),
        "feasible": int(((state == "complete") & (trials["feasible"] == True)).sum()),  # noqa: E712
        "pruned": int((state == "pruned").sum()),
        "failed": int((state == "fail").sum()),
        "running": int((state == "running").sum()),
    }


def versus_uniform(trials: pd.DataFrame) -> pd.DataFrame:
    """Per cost-target value: uniform pruning's mAP50-95 there, the best other candidate's, and the gain.

    Only complete trials that landed on their target count; duplicates count as the trial they copy.
    """
    cols = ["target", "uniform trial", "uniform mAP50-95", "best trial", "best method", "best mAP50-95",
            "gain", "gain_%", "candidates"]  # fmt: skip
    if trials.empty or "cost_target" not in trials or trials["cost_target"].isna().all():
        return pd.DataFrame(columns=cols)
    ok = trials[(trials["state"] == "complete") & (trials["on_target"] == True)]  # noqa: E712
    rows = []
    for value in sorted(ok["cost_target"].dropna().unique()):
        at = ok[ok["cost_target"] == value]
        uni, others = at[at["method"] == "uniform"], at[at["method"] != "uniform"]
        row: dict[str, Any] = {"target": value, "candidates": len(others)}
        if not uni.empty:
            u = uni.sort_values("trial").iloc[0]
            row.update({"uniform trial": int(u["trial"]), "uniform mAP50-95": float(u["map50_95"])})
        if not others.empty:
            b = others.loc[others["map50_95"].astype(float).idxmax()]
            row.update(
                {"best trial": int(b["trial"]), "best method": b["method"], "best mAP50-95": float(b["map50_95"])}
            )
        if "uniform mAP50-95" in row and "best mAP50-95" in row:
            row["gain"] = row["best mAP50-95"] - row["uniform mAP50-95"]
            base = row["uniform mAP50-95"]
            row["gain_%"] = round(100 * row["gain"] / base, 1) if base > 0 else None
        rows.append(row)
    return pd.DataFrame(rows, columns=cols).round(4).replace({np.nan: None})


def describe_versus_uniform(table: pd.DataFrame, metric: str) -> list[str]:
    """Plain sentences for :func:`versus_uniform`, one per target value."""
    lines = []
    for _, r in table.iterrows():
        if r["uniform mAP50-95"] is None:
            lines.append(f"at {metric} {r['target']}: uniform pruning not evaluated yet")
        elif r["best mAP50-95"] is None:
            lines.append(f"at {metric} {r['target']}: uniform mAP50-95 {r['uniform mAP50-95']:.4f} (trial "
                         f"{r['uniform trial']}); no searched candidate yet")  # fmt: skip
        else:
            verdict = "beats" if r["gain"] > 0 else "ties" if r["gain"] == 0 else "loses to"
            lines.append(
                f"at {metric} {r['target']}: best searched (trial {r['best trial']}, {r['best method']}) mAP50-95 "
                f"{r['best mAP50-95']:.4f} {verdict} uniform {r['uniform mAP50-95']:.4f} (trial {r['uniform trial']}) "
                f"by {r['gain']:+.4f}"
                + (f" ({r['gain_%']:+.1f}%)" if r["gain_%"] is not None else "")
                + f", best of {r['candidates']} candidate(s)"
            )
    return lines


def per_class_change(study: optuna.Study, trial: int, baseline: dict[str, Any]) -> pd.DataFrame:
    """Per-class AP50-95 of ``trial`` against the baseline's: what pruning the head costs each class."""
    t = study.get_trials(deepcopy=False)[trial]
    before, after = baseline.get("per_class", {}), TrialRecord.from_frozen(t).per_class or {}
    rows = [
        {"class": name, "baseline AP50-95": before.get(name), f"trial {trial} AP50-95": ap,
         "change_%": round(100 * (ap / before[name] - 1), 1) if before.get(name) else None}
        for name, ap in after.items()
    ]  # fmt: skip
    return pd.DataFrame(rows).round(4).replace({np.nan: None})


def front_table(front: pd.DataFrame) -> pd.DataFrame:
    """The front's columns as users read them: ratios, mAP, drop, FLOPs and params reduction."""
    ratio_cols = [c for c in front.columns if c.startswith("ratio.")]
    latency_cols = [c for c in front.columns if c.startswith(("latency_ms.", "latency_ratio."))]
    cols = ["trial", "method", "uniform", "cost_target", *ratio_cols, "importance", "round_to", "map50_95",
            "map50_95_drop", "predicted_drop", "gflops", "flops_reduction", "params_reduction", *latency_cols, "reward"]  # fmt: skip
    for optional in ("method", "uniform", "cost_target", "predicted_drop"):
        if optional in front.columns and front[optional].isna().all():
            cols.remove(optional)  # no uniform baseline, no cost target in this search
    table = front[[c for c in cols if c in front.columns]].copy()
    table.columns = [c.removeprefix("ratio.") for c in table.columns]
    for c in ("map50_95_drop", "predicted_drop", "flops_reduction", "params_reduction"):
        if c in table:
            table[c] = (100 * table[c].astype(float)).round(1)
    table = table.rename(
        columns={
            "map50_95_drop": "mAP_drop_%",
            "predicted_drop": "final_drop_%_predicted",
            "flops_reduction": "FLOPs_-%",
            "params_reduction": "params_-%",
        }
    )
    return table.round(4).replace({np.nan: None})


def _proxy_lines(study: optuna.Study) -> list[str]:
    """How far the proxy is trusted: its fidelity (Kendall tau, p, n), the calibration, the screening's agreement."""
    from yoloprune.search import calibration, screening
    from yoloprune.search.fidelity import describe
    from yoloprune.search.fidelity import stored as stored_fidelity

    fidelity = stored_fidelity(study)
    lines = [
        describe(fidelity)
        if fidelity
        else "proxy fidelity: not measured (`yoloprune fidelity CONFIG` re-trains top and random trials)"
    ]
    lines.extend(calibration.describe(calibration.stored(study), study))
    screened = study.user_attrs.get(screening.FIDELITY_ATTR)
    if screened:
        lines.append(screening.describe(screened))
    return lines


def render_results(config: ExperimentConfig, *, show_all: bool = False) -> str:
    """The text ``yoloprune results`` prints; also writes ``<output>/trials.csv``."""
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.storage import Store

    study = open_study(config, create=False)
    trials = judged_frame(study, config)
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    trials.to_csv(out / "trials.csv", index=False)
    store = Store(config.storage_url)
    exp_id = store.find_experiment(config.name)
    base = store.latest_baseline(exp_id) if exp_id is not None else None
    counts = summary_counts(trials)
    lines = [
        f"\nexperiment '{config.name}': " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k == "complete")
    ]
    if base:
        lines.append(
            f"baseline: mAP50-95 {base['map50_95']:.4f}  mAP50 {base['map50']:.4f}  GFLOPs {base['gflops']:.3f}  "
            f"params {int(base['params']):,d}"
        )
    workers = store.workers(exp_id) if exp_id is not None else []
    if len(workers) > 1:
        by_state: dict[str, int] = {}
        for w in workers:
            by_state[w["state"]] = by_state.get(w["state"], 0) + 1
        hosts = len({w["host"] for w in workers})
        lines.append(
            f"workers: {len(workers)} on {hosts} machine(s) ("
            + ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
            + ")"
        )
    base_latency = baseline_latency(study)
    for name in [t.name for t in config.targets]:
        col = f"latency_ms.{name}"
        if col in trials and trials[col].notna().any():
            base_ms = base_latency.get(col)
            lines.append(
                f"latency on '{name}': baseline {base_ms:.2f} ms (this session), trials {trials[col].min():.2f}-"
                f"{trials[col].max():.2f} ms"
                if base_ms
                else f"latency on '{name}': trials {trials[col].min():.2f}-{trials[col].max():.2f} ms"
            )
    lines.extend(_proxy_lines(study))
    if config.cost_target is not None:
        lines.append(f"against uniform pruning at the same {config.cost_target.metric}:")
        lines.extend(f"  {line}" for line in describe_versus_uniform(versus_uniform(trials), config.cost_target.metric))
    from yoloprune.search import diagnostics

    history = diagnostics.hypervolume_history(trials, config, {**(base or {}), **base_latency})
    lines.append(diagnostics.describe_hypervolume(history, config))
    lines.extend(diagnostics.describe_importances(diagnostics.param_importances(study, trials, config)))
    constraints = ", ".join(c.describe() for c in config.constraints) or "none"
    front = pareto_front(trials, config, study)
    if "ratio.head" in front and base and (front["ratio.head"].fillna(0) > 0).any():
        best = int(front["trial"].iloc[0])
        lines.append(f"per-class AP50-95 of trial {best}, which prunes the head (rare classes suffer first):")
        lines.append(format_table(per_class_change(study, best, base)))
    if show_all:
        lines.append(format_table(trials))
    elif front.empty:
        lines.append(
            f"no feasible trial yet (constraints: {constraints}). `yoloprune results CONFIG --all` lists every trial."
        )
    else:
        lines.append(f"Pareto front (feasible: {constraints}):")
        lines.append(format_table(front_table(front)))
    lines.append(f"\ntrials.csv, per-trial checkpoints and the study database are in {out}")
    return "\n".join(lines)
