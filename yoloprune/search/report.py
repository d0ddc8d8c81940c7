"""The HTML report of a search: one self-contained file (plotly, inlined, works offline) with the
Pareto front, the front's per-stage ratios, latency vs FLOPs, search progress, the hypervolume history,
parameter importances, per-class AP drop of one trial, and the trial table (also written as ``trials.csv``)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from yoloprune.atomic import atomic_path, write_text
from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.search.diagnostics import (
    HypervolumeHistory,
    Importances,
    describe_hypervolume,
    describe_importances,
    hypervolume_history,
    importance_table,
    param_importances,
)
from yoloprune.search.results import front_table, judged_frame, pareto_front, summary_counts
from yoloprune.storage.optuna_adapter import baseline_latency
from yoloprune.storage.record import TrialRecord

#: What a report's failed write asks for (the message names the file and the cause before it).
OUTPUT_FIX = "give `yoloprune report CONFIG --output FILE` a writable folder with room"

COLORS = {"front": "#d62728", "feasible": "#1f77b4", "infeasible": "#9e9e9e", "baseline": "#2ca02c"}


@dataclass(frozen=True)
class Report:
    path: Path
    csv: Path
    figures: list[str]  # the ids of the plots in the page
    trial: int | None  # the trial whose per-class AP is shown


def write_report(config: ExperimentConfig, *, output: Path | None = None, trial: int | None = None) -> Report:
    """Render the experiment's report from storage; ``trial`` picks the per-class AP plot's trial."""
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.search.selection import select_trial
    from yoloprune.storage import Store

    study = open_study(config, create=False)
    trials = judged_frame(study, config)
    counts = summary_counts(trials)
    if counts["complete"] == 0:
        states = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "no trials"
        raise ConfigError(f"experiment '{config.name}' has no finished trial yet ({states}); nothing to report.")
    out_dir = config.output_dir
    csv = out_dir / "trials.csv"
    with atomic_path(csv, fix=OUTPUT_FIX) as tmp:
        trials.to_csv(tmp, index=False)
    base = Store(config.storage_url).baseline_of(config.name) or {}
    base = {**base, **baseline_latency(study)}
    if trial is None:
        try:
            trial = select_trial(study, config).number
        except ConfigError:  # no feasible trial: show the best-rewarded one
            complete = trials[trials["state"] == "complete"]
            trial = int(complete.sort_values("reward", ascending=False)["trial"].iloc[0])
    all_trials = study.get_trials(deepcopy=False)
    chosen = TrialRecord.from_frozen(all_trials[trial]) if 0 <= trial < len(all_trials) else None
    if chosen is None or chosen.per_class is None:
        raise ConfigError(f"trial {trial} has no per-class AP (it does not exist or did not finish).")

    front = pareto_front(trials, config, study)
    latency = _latency_column(config, trials)
    figures: dict[str, go.Figure] = {}
    figures["front-latency" if latency else "front-gflops"] = _front(
        trials,
        front,
        base,
        latency or "gflops",
        config,
        title="Pareto front: mAP50-95 vs " + _label(latency or "gflops"),
    )
    if latency:
        figures["front-gflops"] = _front(trials, front, base, "gflops", config, title="mAP50-95 vs GFLOPs")
        figures["latency-vs-flops"] = _latency_vs_flops(trials, base, latency)
    ratios = (
        _ratios(front, "Per-stage pruning ratios of the Pareto front")
        if len(front) >= 2
        else _ratios(trials[trials["state"] == "complete"], "Per-stage pruning ratios of every complete trial")
    )
    if ratios is not None:
        figures["front-ratios"] = ratios
    figures["progress"] = _progress(trials)
    history = hypervolume_history(trials, config, base)
    if history is not None and history.values:
        figures["hypervolume"] = _hypervolume(history, config)
    importances = param_importances(study, trials, config)
    if importances.by_objective:
        figures["importances"] = _importances(importances)
    figures["per-class"] = _per_class(base.get("per_class", {}), chosen.per_class, trial)

    path = Path(output) if output else out_dir / "report.html"
    from yoloprune.search.fidelity import describe
    from yoloprune.search.fidelity import stored as stored_fidelity

    fidelity = stored_fidelity(study)
    note = describe(fidelity) if fidelity else "proxy fidelity not measured (yoloprune fidelity CONFIG)"
    diagnostics = [
        ("Hypervolume", [describe_hypervolume(history, config)]),
        ("Parameter importances", [line.strip() for line in describe_importances(importances)]),
    ]
    versus = _versus_html(config, study, trials, base)
    write_text(path, _page(config, trials, front, counts, base, figures, note, versus, diagnostics), fix=OUTPUT_FIX)
    return Report(path, csv, list(figures), trial)


def _latency_column(config: ExperimentConfig, trials: pd.DataFrame) -> str | None:
    for target in config.targets:
        col = f"latency_ms.{target.name}"
        if col in trials and trials[col].notna().any():
            return col
    return None


def _label(metric: str) -> str:
    return {"gflops": "GFLOPs", "map50_95": "mAP50-95"}.get(metric, metric.replace("latency_ms.", "latency (ms) on "))


def _hover(df: pd.DataFrame) -> list[str]:
    ratio_cols = [c for c in df.columns if c.startswith("ratio.")]
    return [
        f"trial {int(r['trial'])}<br>" + "<br>".join(f"{c.removeprefix('ratio.')}: {r[c]:.3f}" for c in ratio_cols)
        for _, r in df.iterrows()
    ]


def _front(
    trials: pd.DataFrame, front: pd.DataFrame, base: dict[str, Any], x: str, config: ExperimentConfig, title: str
) -> go.Figure:
    complete = trials[(trials["state"] == "complete") & trials[x].notna()]
    fig = go.Figure()
    for name, mask, symbol in (
        ("infeasible", complete["feasible"] != True, "x"),  # noqa: E712
        ("feasible", complete["feasible"] == True, "circle"),  # noqa: E712
    ):
        part = complete[mask]
        fig.add_trace(
            go.Scatter(
                x=part[x], y=part["map50_95"], mode="markers", name=name, text=_hover(part), hoverinfo="text+x+y",
                marker={"color": COLORS[name], "symbol": symbol, "size": 9},
            )
        )  # fmt: skip
    if not front.empty and front[x].notna().all():
        line = front.sort_values(x)
        fig.add_trace(
            go.Scatter(
                x=line[x], y=line["map50_95"], mode="lines+markers", name="Pareto front", text=_hover(line),
                hoverinfo="text+x+y", marker={"color": COLORS["front"], "size": 12, "line": {"width": 1}},
            )
        )  # fmt: skip
    if base.get(x) is not None and base.get("map50_95") is not None:
        fig.add_trace(
            go.Scatter(
                x=[base[x]], y=[base["map50_95"]], mode="markers", name="baseline (unpruned)",
                marker={"color": COLORS["baseline"], "symbol": "star", "size": 16},
            )
        )  # fmt: skip
    fig.update_layout(title=title, xaxis_title=_label(x), yaxis_title="mAP50-95", template="plotly_white")
    return fig


def _latency_vs_flops(trials: pd.DataFrame, base: dict[str, Any], latency: str) -> go.Figure:
    done = trials[trials[latency].notna() & trials["gflops"].notna()]
    fig = go.Figure(
        go.Scatter(
            x=done["gflops"], y=done[latency], mode="markers", name="trials", text=_hover(done),
            hoverinfo="text+x+y", marker={"size": 9, "color": done["map50_95"], "colorscale": "Viridis",
                                          "colorbar": {"title": "mAP50-95"}, "showscale": True},
        )
    )  # fmt: skip
    if base.get(latency) is not None and base.get("gflops") is not None:
        fig.add_trace(
            go.Scatter(
                x=[base["gflops"]], y=[base[latency]], mode="markers", name="baseline",
                marker={"color": COLORS["baseline"], "symbol": "star", "size": 16},
            )
        )  # fmt: skip
        # Where FLOPs would put each trial if latency scaled with them: points above the line are slower.
        xs = np.linspace(0, float(base["gflops"]), 2)
        fig.add_trace(
            go.Scatter(
                x=xs, y=xs * float(base[latency]) / float(base["gflops"]), mode="lines", name="latency ∝ FLOPs",
                line={"dash": "dot", "color": "#555"},
            )
        )  # fmt: skip
    fig.update_layout(
        title="Measured latency vs FLOPs (above the dotted line: slower than FLOPs predict)",
        xaxis_title="GFLOPs", yaxis_title=_label(latency), template="plotly_white",
        legend={"x": 0.01, "y": 0.99, "bgcolor": "rgba(255,255,255,0.7)"},
    )  # fmt: skip
    return fig


def _ratios(df: pd.DataFrame, title: str) -> go.Figure | None:
    cols = [c for c in df.columns if c.startswith("ratio.") and df[c].notna().any()]
    if not cols or df.empty:
        return None
    dims = [
        {"label": c.removeprefix("ratio."), "values": df[c].astype(float), "range": [0, max(0.6, df[c].max())]}
        for c in cols
    ]
    dims.append({"label": "mAP50-95", "values": df["map50_95"].astype(float)})
    fig = go.Figure(
        go.Parcoords(line={"color": df["map50_95"].astype(float), "colorscale": "Viridis", "showscale": True}, dimensions=dims)
    )  # fmt: skip
    fig.update_layout(title=f"{title} (colour: mAP50-95)", template="plotly_white")
    return fig


def _progress(trials: pd.DataFrame) -> go.Figure:
    done = trials[trials["state"] == "complete"].sort_values("trial")
    feasible = (done["feasible"] == True).to_numpy()  # noqa: E712
    feasible_reward = done["reward"].where(feasible)
    colors = [COLORS["feasible"] if f else COLORS["infeasible"] for f in feasible]
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=done["trial"], y=done["reward"], mode="markers", name="trial reward",
            marker={"color": colors},
        )
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=done["trial"], y=feasible_reward.cummax(), mode="lines", name="best feasible reward",
            line={"shape": "hv", "color": COLORS["front"]},
        )
    )  # fmt: skip
    fig.update_layout(title="Search progress", xaxis_title="trial", yaxis_title="reward", template="plotly_white")
    return fig


def _hypervolume(history: HypervolumeHistory, config: ExperimentConfig) -> go.Figure:
    reference = ", ".join(
        f"{_label(o.metric)} {v:g}" for o, v in zip(config.objectives, history.reference, strict=True)
    )
    fig = go.Figure(
        go.Scatter(
            x=history.trials, y=history.values, mode="lines+markers", name="hypervolume",
            line={"shape": "hv", "color": COLORS["front"]},
        )
    )  # fmt: skip
    fig.update_layout(
        title=f"Hypervolume of the feasible front after each trial (reference: {reference})",
        xaxis_title="trial", yaxis_title="hypervolume", template="plotly_white",
    )  # fmt: skip
    return fig


def _importances(importances: Importances) -> go.Figure:
    table = importance_table(importances)
    fig = go.Figure()
    for metric in table.columns:
        n = importances.counts[metric]
        fig.add_trace(
            go.Bar(y=list(table.index), x=table[metric], orientation="h", name=f"{_label(metric)} ({n} trials)")
        )
    fig.update_layout(
        title="Parameter importances per objective (PED-ANOVA: what the best quarter of the trials share)",
        xaxis_title="importance (sums to 1 per objective)", yaxis={"autorange": "reversed"}, barmode="group",
        template="plotly_white",
    )  # fmt: skip
    return fig


def _per_class(before: dict[str, float], after: dict[str, float], trial: int) -> go.Figure:
    names = sorted(after, key=lambda n: _drop(before.get(n), after[n]), reverse=True)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=[before.get(n) for n in names], name="baseline", marker_color=COLORS["baseline"]))
    fig.add_trace(
        go.Bar(
            x=names, y=[after[n] for n in names], name=f"trial {trial}", marker_color=COLORS["front"],
            text=[f"-{100 * _drop(before.get(n), after[n]):.0f}%" for n in names], textposition="outside",
        )
    )  # fmt: skip
    fig.update_layout(
        title=f"Per-class AP50-95, baseline vs trial {trial} (largest relative drop first)",
        yaxis_title="AP50-95", barmode="group", template="plotly_white",
    )  # fmt: skip
    return fig


def _drop(before: float | None, after: float) -> float:
    return 1.0 - after / before if before else 0.0


def _versus_html(config: ExperimentConfig, study: Any, trials: pd.DataFrame, base: dict[str, Any]) -> str:
    """The cost-target section: best searched candidate against uniform, screening agreement, head per-class AP."""
    from yoloprune.search import screening
    from yoloprune.search.results import describe_versus_uniform, per_class_change, versus_uniform

    if config.cost_target is None:
        return ""
    esc = html.escape
    table = versus_uniform(trials)
    parts = [
        f"<h2 id='versus-uniform'>Against uniform pruning at the same {esc(config.cost_target.metric)}</h2>",
        "<ul>"
        + "".join(f"<li>{esc(line)}</li>" for line in describe_versus_uniform(table, config.cost_target.metric))
        + "</ul>",
        f"<div class='scroll'>{table.to_html(index=False, classes='table', na_rep='', border=0)}</div>",
    ]
    screened = study.user_attrs.get(screening.FIDELITY_ATTR)
    if screened:
        parts.append(f"<p>{esc(screening.describe(screened))}</p>")
    if "ratio.head" in trials and (trials["ratio.head"].fillna(0) > 0).any() and not table.empty:
        best = table["best trial"].dropna()
        if not best.empty:
            change = per_class_change(study, int(best.iloc[0]), base)
            parts.append(f"<h3>Per-class AP50-95 of trial {int(best.iloc[0])} (prunes the head)</h3>")
            parts.append(change.to_html(index=False, classes="table", na_rep="", border=0))
    return "\n".join(parts)


def _page(
    config: ExperimentConfig,
    trials: pd.DataFrame,
    front: pd.DataFrame,
    counts: dict[str, int],
    base: dict[str, Any],
    figures: dict[str, go.Figure],
    fidelity: str,
    versus: str = "",
    diagnostics: list[tuple[str, list[str]]] | None = None,
) -> str:
    esc = html.escape
    notes = "".join(
        f"<dt>{esc(term)}</dt><dd>{'<br>'.join(esc(line) for line in lines)}</dd>\n"
        for term, lines in diagnostics or []
    )
    constraints = ", ".join(c.describe() for c in config.constraints) or "none"
    objectives = ", ".join(f"{o.direction} {o.metric}" for o in config.objectives)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v or k == "complete")
    baseline = (
        f"mAP50-95 {base['map50_95']:.4f}, mAP50 {base['map50']:.4f}, {base['gflops']:.3f} GFLOPs, "
        f"{int(base['params']):,d} params"
        if {"map50_95", "map50", "gflops", "params"} <= set(base)
        else "not stored"
    )
    plots = "\n".join(
        f'<section class="plot">{pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=fid)}</section>'
        for fid, fig in figures.items()
    )
    front_html = (
        front_table(front).to_html(index=False, classes="table", na_rep="", border=0)
        if not front.empty
        else "<p>No feasible trial yet.</p>"
    )
    table = trials.drop(columns=["error"]).round(4).to_html(index=False, classes="table", na_rep="", border=0)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>yoloprune report: {esc(config.name)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
.plot {{ margin: 1.5rem 0; }} .table {{ border-collapse: collapse; font-size: 0.8rem; }}
.table td, .table th {{ padding: 2px 6px; border-bottom: 1px solid #ddd; text-align: right; }}
.scroll {{ overflow-x: auto; }} dt {{ font-weight: 600; }}
</style></head><body>
<h1>Search report: {esc(config.name)}</h1>
<dl>
<dt>Trials</dt><dd>{esc(summary)}</dd>
<dt>Baseline</dt><dd>{esc(baseline)}</dd>
<dt>Objectives</dt><dd>{esc(objectives)}</dd>
<dt>Constraints (feasible)</dt><dd>{esc(constraints)}</dd>
<dt>Proxy fidelity</dt><dd>{esc(fidelity)}</dd>
{notes}</dl>
{versus}
{plots}
<h2>Pareto front</h2><div class="scroll">{front_html}</div>
<h2>All trials</h2><p>Also in <code>trials.csv</code> beside this report.</p><div class="scroll">{table}</div>
</body></html>
"""
