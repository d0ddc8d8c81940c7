"""The built-in demo: synthetic data, a small converged base detector shipped with the package, then a
cost-targeted search against uniform pruning.

Used by ``yoloprune demo`` / ``make demo`` and by the benchmarks in ``experiments/``.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from yoloprune.log import get_logger

if TYPE_CHECKING:
    from yoloprune.config import ExperimentConfig

LOGGER = get_logger(__name__)


#: The demo experiment (``experiments/demo.yaml`` holds the same, and a test keeps them equal): every candidate
#: at -50% FLOPs, uniform pruning there as trial 0, 60 allocations screened by BN re-estimation, the best 3
#: fine-tuned by the proxy, then TPE; a candidate must keep its proxy mAP50-95 within 5% of the base's.
DEMO_EXPERIMENT: dict[str, Any] = {
    "name": "demo",
    "model": "builtin:demo-base",
    "data": "builtin:synthetic",
    "imgsz": 128,
    "space": {
        "ratios": {
            stage: {"low": 0.05, "high": 0.75, "step": 0.05}
            for stage in ("backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck")
        },
        "importance": "l1",
        "round_to": 8,
    },
    "finetune": {"epochs": 2, "batch": 16, "bn_batches": 10},
    "targets": [{"name": "cpu_ort", "backend": "onnxruntime", "device": "cpu", "batch": 1}],
    "cost_target": {"metric": "flops_reduction", "value": 0.5, "tolerance": 0.01},
    "objectives": [{"metric": "map50_95", "direction": "maximize"}],
    "constraints": [{"metric": "map50_95_drop", "max": 0.05}],
    "engine": {
        "sampler": "tpe",
        "seed": 0,
        "pruner": "none",
        "startup_trials": 2,
        "screen": {"candidates": 60, "keep": 3, "images": 64, "seed": 0},
    },
    "budget": {"trials": 6},
}

#: What ``--quick`` changes: a tiny set of the same images (the same shipped base), one epoch, three trials.
QUICK_CHANGES: dict[str, Any] = {
    "name": "demo-quick",
    "data": "builtin:synthetic-quick",
    "finetune": {"epochs": 1, "batch": 8, "bn_batches": 2},
    "engine": {
        **DEMO_EXPERIMENT["engine"],
        "startup_trials": 1,
        "screen": {"candidates": 6, "keep": 1, "images": 8, "seed": 0},
    },
    "budget": {"trials": 3},
}


def demo_config(
    output: Path, *, quick: bool = False, device: str | None = None, trials: int | None = None
) -> ExperimentConfig:
    """The demo's experiment config, also written to ``<output>/experiment.yaml`` for the user to copy."""
    from yoloprune.config import config_from_dict

    raw = {**DEMO_EXPERIMENT, **(QUICK_CHANGES if quick else {})}
    raw["output"] = str(Path(output).resolve())
    if device:
        raw["device"] = device
    if trials:
        raw["budget"] = {**raw["budget"], "trials": trials}
    config = config_from_dict(raw, source="demo")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    (config.output_dir / "experiment.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


#: After the search, the demo fine-tunes uniform and the best searched candidates as the export would (``calibrate``,
#: the long recipe ``finetune.long``): their real drops decide the constraint, and predict the others'.
LONG = {"candidates": 3, "epochs": 20}
QUICK_LONG = {"candidates": 3, "epochs": 2}


def run_demo(
    output: Path, *, quick: bool = False, device: str | None = None, trials: int | None = None, progress: bool = True
) -> str:
    """Search, long-fine-tune uniform and the best candidates, write the report; returns what to print."""
    from yoloprune.search.calibration import calibrate, measure_reference
    from yoloprune.search.report import write_report
    from yoloprune.search.results import render_results
    from yoloprune.search.runner import run_search

    start = time.perf_counter()
    config = demo_config(output, quick=quick, device=device, trials=trials)
    run_search(config, progress=progress)
    long = QUICK_LONG if quick else LONG
    LOGGER.info(
        "fine-tuning uniform pruning and the best searched candidates %d epochs each, as `yoloprune export` would",
        long["epochs"],
    )
    calibrate(config, candidates=long["candidates"], epochs=long["epochs"], with_reference=False)
    LOGGER.info("fine-tuning the unpruned base %d epochs the same way: the like-with-like reference", long["epochs"])
    measure_reference(config, long["epochs"])
    text = render_results(config)
    report = write_report(config).path
    screen = final_screen(
        config,
        seconds=time.perf_counter() - start,
        config_path=config.output_dir / "experiment.yaml",
        report=report,
        long_epochs=long["epochs"],
    )
    return text + "\n\n" + screen


def final_screen(
    config: ExperimentConfig, *, seconds: float, config_path: Path, report: Path | None, long_epochs: int
) -> str:
    """What ``yoloprune demo`` prints last, on one screen: the baseline, the best searched model against uniform
    pruning at the same cost (after the proxy, and after ``long_epochs`` of fine-tuning), where the files are,
    and the commands to go on with."""
    from yoloprune.search.calibration import long_results, reference
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.search.results import judged_frame
    from yoloprune.storage import Store
    from yoloprune.storage.optuna_adapter import baseline_latency

    study = open_study(config, create=False)
    trials = judged_frame(study, config)
    long = long_results(study, long_epochs)
    base = Store(config.storage_url).baseline_of(config.name) or {}
    base_map = float(base.get("map50_95", 0.0))
    target = config.targets[0].name if config.targets else None
    latency_col = f"latency_ms.{target}" if target else None
    base_ms = baseline_latency(study).get(latency_col) if latency_col else None
    cfg = shlex.quote(str(config_path))
    lines = [f"==== yoloprune demo: finished in {seconds / 60:.1f} min " + "=" * 50]
    base_line = f"baseline   {config.model}: mAP50-95 {base_map:.4f}  GFLOPs {base.get('gflops', float('nan')):.3f}"
    if base_ms:
        base_line += f"  latency {base_ms:.2f} ms ({target})"
    lines.append(base_line)
    ok = trials[(trials["state"] == "complete") & (trials["on_target"] == True)] if not trials.empty else trials  # noqa: E712
    lines.append(_comparison_heading(config, long_epochs))
    rows = _compared_rows(ok, long)
    lines += _comparison_table(rows, long, base_map, long_epochs, latency_col)
    lines += _verdict_lines(rows, long, long_epochs, cfg)
    lines += _reference_lines(reference(study, long_epochs), rows, long, long_epochs)
    lines.append("files:")
    if report is not None:
        lines.append(f"  report       {report}")
    lines.append(f"  study        {config.storage_url}  ({len(trials)} trials)")
    lines.append(f"  checkpoints  {config.output_dir / 'trials'}/trial_NNNN.pt (the proxy's, one per trial)")
    lines.append(f"  config       {config_path}")
    lines.append("next:")
    lines.append(f"  yoloprune results {cfg} --all        # every trial, and why each was kept or not")
    lines.append(f"  yoloprune report {cfg}               # rewrite the HTML report")
    lines.append(f"  yoloprune nni {cfg} --port 8080      # the same search in NNI's web dashboard")
    lines += _export_lines(study, ok, rows, long, cfg, proxy_epochs=config.finetune.epochs, long_epochs=long_epochs)
    return "\n".join(lines)


def _long_final(long: dict[int, dict[str, float]], row: Any) -> float | None:
    """A trial's mAP50-95 after the long fine-tune, or None where that was not measured."""
    entry = long.get(int(row["trial"]))
    return float(entry["final"]) if entry else None


def _long_or_proxy(long: dict[int, dict[str, float]], row: Any) -> float:
    """A trial's score: its measured long fine-tune when there is one, else its proxy's mAP50-95."""
    after = _long_final(long, row)
    return after if after is not None else float(row["map50_95"])


def _comparison_heading(config: ExperimentConfig, long_epochs: int) -> str:
    """The line naming the compared cost, both fine-tune lengths and the constraints."""
    constraints = ", ".join(c.describe() for c in config.constraints) or "none"
    cost = config.cost_target
    where = f"{cost.metric} {', '.join(f'{v:g}' for v in cost.values)}" if cost else "the searched costs"
    return (
        f"at {where}: after the {config.finetune.epochs}-epoch proxy, and after {long_epochs} epochs as the export "
        f"fine-tunes (constraints: {constraints})"
    )


def _compared_rows(ok: Any, long: dict[int, dict[str, float]]) -> list[tuple[str, Any]]:
    """The labelled trials to compare: the best searched one (measured long where any is), the first uniform one."""
    uniform = ok[ok["method"] == "uniform"].sort_values("trial") if "method" in ok else ok.iloc[0:0]
    searched = ok[ok["method"] != "uniform"] if "method" in ok else ok
    rows: list[tuple[str, Any]] = []
    if not searched.empty:
        measured = [r for _, r in searched.iterrows() if _long_final(long, r) is not None]
        best = max(measured or [r for _, r in searched.iterrows()], key=lambda r: _long_or_proxy(long, r))
        rows.append((f"searched   trial {int(best['trial'])} ({best['method']})", best))
    if not uniform.empty:
        u = uniform.iloc[0]
        rows.append((f"uniform    trial {int(u['trial'])} (ratio {float(u['uniform']):.3f})", u))
    return rows


def _comparison_table(
    rows: list[tuple[str, Any]],
    long: dict[int, dict[str, float]],
    base_map: float,
    long_epochs: int,
    latency_col: str | None,
) -> list[str]:
    """The compared trials' mAP50-95 and drop after the proxy and the long fine-tune, FLOPs cut, latency, verdict."""
    if not rows:
        return []

    def drop(value: float | None) -> str:
        return f"{100 * (1 - value / base_map):5.1f}%" if value is not None and base_map > 0 else "     -"

    lines = [f"  {'model':<34} {'proxy':>7} {'drop':>6} {f'{long_epochs} epochs':>10} {'drop':>6} "
             f"{'FLOPs -%':>8} {'ms':>6}  meets the constraints"]  # fmt: skip
    for label, r in rows:
        ms = r.get(latency_col) if latency_col else None
        after = _long_final(long, r)
        on = "measured" if after is not None else "predicted" if r.get("predicted_drop") is not None else "proxy"
        lines.append(
            f"  {label:<34} {float(r['map50_95']):7.4f} {drop(float(r['map50_95']))} "
            f"{after if after is not None else float('nan'):10.4f} {drop(after)} "
            f"{100 * float(r['flops_reduction']):8.1f} {float(ms) if ms is not None else float('nan'):6.2f}  "
            f"{'yes' if r['feasible'] else 'no'} ({on})"
        )
    return lines


def _verdict_lines(
    rows: list[tuple[str, Any]], long: dict[int, dict[str, float]], long_epochs: int, cfg: str
) -> list[str]:
    """Searched against uniform at the same cost (long fine-tunes where both were measured), or why there is none."""
    if not rows:
        return [f"  no complete trial on the target yet: `yoloprune results {cfg} --all` shows why"]
    if len(rows) != 2:
        return []
    (_, s_row), (_, u_row) = rows
    proxy_gain = float(s_row["map50_95"]) - float(u_row["map50_95"])
    a, b = _long_final(long, s_row), _long_final(long, u_row)
    gain = a - b if a is not None and b is not None else proxy_gain
    verdict = "beats" if gain > 0 else "ties with" if gain == 0 else "loses to"
    when = f" after {long_epochs} epochs" if a is not None and b is not None else " on the proxy"
    return [
        f"  the searched model {verdict} uniform pruning at the same cost by {gain:+.4f} mAP50-95{when}"
        + (f" ({proxy_gain:+.4f} on the proxy)" if when != " on the proxy" else "")
    ]


def _reference_lines(
    ref: dict[str, float] | None, rows: list[tuple[str, Any]], long: dict[int, dict[str, float]], long_epochs: int
) -> list[str]:
    """The long fine-tunes' drops against the unpruned base fine-tuned as long, where both were measured."""
    if not (ref and rows and any(_long_final(long, r) is not None for _, r in rows)):
        return []
    against = ", ".join(
        f"{label.split()[0]} {100 * (1 - after / ref['map50_95']):.1f}%"
        for label, r in rows
        if (after := _long_final(long, r)) is not None
    )
    return [
        f"  like with like: the unpruned base fine-tuned the same {long_epochs} epochs reaches "
        f"{ref['map50_95']:.4f}; drop against it: {against}"
    ]


def _export_lines(
    study: Any,
    ok: Any,
    rows: list[tuple[str, Any]],
    long: dict[int, dict[str, float]],
    cfg: str,
    *,
    proxy_epochs: int,
    long_epochs: int,
) -> list[str]:
    """The export command for the best feasible trial, else for the most accurate compared one, with its time."""
    feasible = ok[ok["feasible"] == True] if not ok.empty else ok  # noqa: E712
    pick = (
        max((r for _, r in feasible.iterrows()), key=lambda r: _long_or_proxy(long, r)) if not feasible.empty else None
    )
    export_epochs = long_epochs  # what the demo measured: the export reproduces it, and re-checks it in its card
    chosen = (
        pick if pick is not None else max((r for _, r in rows), key=lambda r: _long_or_proxy(long, r)) if rows else None
    )
    if chosen is None:
        return []
    number = int(chosen["trial"])
    minutes = _export_minutes(study, number, proxy_epochs, long.get(number), long_epochs, export_epochs)
    lines = []
    if pick is None:
        lines.append(
            f"  no trial meets the constraints; the most accurate after {long_epochs} epochs is trial {number}:"
        )
    lines.append(
        f"  yoloprune export {cfg} --trial {number} --epochs {export_epochs}   # .pt + ONNX + model card, "
        f"about {minutes:.0f} min here"
    )
    return lines


def _export_minutes(
    study: Any, trial: int, proxy_epochs: int, long: dict[str, float] | None, long_epochs: int, epochs: int
) -> float:
    """The export's fine-tune time, scaled from the trial's measured long fine-tune, else from its proxy's."""
    if long and long.get("seconds"):
        per_epoch = float(long["seconds"]) / long_epochs
    else:
        from yoloprune.storage.record import TrialRecord

        timings = TrialRecord.from_frozen(study.get_trials(deepcopy=False)[trial]).timings or {}
        per_epoch = float(timings.get("finetune", 0.0)) / max(1, proxy_epochs)
    return max(1.0, per_epoch * epochs / 60)
