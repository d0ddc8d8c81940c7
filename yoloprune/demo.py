"""The built-in demo: synthetic data, a small converged base detector shipped with the package, then a
cost-targeted search against uniform pruning.

Used by ``yoloprune demo`` / ``make demo`` and by the benchmarks in ``experiments/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from yoloprune.data import SyntheticSpec, generate_dataset, inspect_dataset
from yoloprune.errors import ConfigError
from yoloprune.log import get_logger
from yoloprune.storage.db import file_sha256
from yoloprune.ultra.offline import ultralytics_quiet, yoloprune_home

if TYPE_CHECKING:
    from torch import nn

    from yoloprune.config import ExperimentConfig
    from yoloprune.data.check import DatasetInfo
    from yoloprune.ultra.train import FinetuneResult

LOGGER = get_logger(__name__)


@dataclass(frozen=True)
class DemoSetup:
    """A synthetic dataset and how long its base detector is trained from scratch."""

    dataset: SyntheticSpec
    model: str = "yolov8n.yaml"
    base_epochs: int = 40
    batch: int = 16

    @property
    def imgsz(self) -> int:
        return self.dataset.imgsz


#: The demo preset (``builtin:synthetic``): large, uncluttered shapes at 128 px, a task yolov8n is
#: over-sized for, as real detectors often are for theirs. Its base (``builtin:demo-base``) is trained once by
#: ``yoloprune demo --train-base`` and shipped in ``yoloprune/assets`` (README, "The demo").
DEMO = DemoSetup(
    SyntheticSpec(n_train=300, n_val=150, imgsz=128, clutter=0.0, max_objects=3, min_size=0.15, max_size=0.5),
    base_epochs=150,
)
#: ``--quick`` (the tests): the same kind of images, far fewer, and the same shipped base.
QUICK = DemoSetup(dataclasses.replace(DEMO.dataset, n_train=32, n_val=16), base_epochs=2)
#: The demo's set before the shipped base (256 px, trained 30 epochs from scratch): older README tables.
FULL = DemoSetup(
    SyntheticSpec(n_train=300, n_val=80, imgsz=256, clutter=2.0, max_objects=4, min_size=0.06), base_epochs=30
)

# The headline benchmark's sets (experiments/search_quality.py): at 128 px so a base trains to convergence
# on 2 CPU cores (100 epochs, ~20 min). BENCH has the earlier demo's images (clutter, shapes down to 8 px); BENCH_SMALL many small objects.
BENCH = DemoSetup(
    SyntheticSpec(n_train=400, n_val=200, imgsz=128, clutter=2.0, max_objects=4, min_size=0.06), base_epochs=100
)
BENCH_SMALL = DemoSetup(
    SyntheticSpec(n_train=400, n_val=200, imgsz=128, clutter=4.0, max_objects=12, min_size=0.05, max_size=0.2),
    base_epochs=100,
)

ASSETS = Path(__file__).parent / "assets"
#: The shipped demo base: yolov8n trained from scratch on :data:`DEMO` by ``yoloprune demo --train-base``;
#: ``demo_base.json`` next to it says how (command, epochs, mAP, convergence). Checked at every load.
SHIPPED_BASE = ASSETS / "demo_base.pt"
SHIPPED_BASE_SHA256 = "6455a7d4fe89246edfc9917eded710c1fddf4d956c54bb8f389ee2b55061619f"


class DemoBaseError(ConfigError):
    """The shipped demo base is missing, corrupt or changed."""


def demo_dataset(setup: DemoSetup) -> Path:
    """Generate (or reuse) the demo's synthetic dataset in the yoloprune cache; returns its YAML."""
    key = _key(asdict(setup.dataset))
    return generate_dataset(yoloprune_home() / "datasets" / f"synthetic-{key}", setup.dataset)


def base_model_path(setup: DemoSetup, device: str = "cpu") -> Path:
    """Train a synthetic set's base detector once (cached by its settings) and return its checkpoint path."""
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector

    data = demo_dataset(setup)
    key = _key({"model": setup.model, "epochs": setup.base_epochs, "batch": setup.batch, **asdict(setup.dataset)})
    path = yoloprune_home() / "base-models" / f"{Path(setup.model).stem}-{key}.pt"
    if path.exists():
        LOGGER.info("reusing cached base model %s", path)
        return path
    LOGGER.info("training the base %s for %d epochs (once; cached at %s)", setup.model, setup.base_epochs, path)
    start = time.perf_counter()
    model = load_detector(setup.model, nc=inspect_dataset(data).nc)
    result = train_from_scratch(
        model, data, epochs=setup.base_epochs, imgsz=setup.imgsz, batch=setup.batch, device=device,
        project=path.parent / "runs", name=path.stem, desc="training the demo's base model",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    save_checkpoint(
        result.model,
        path,
        train_args={"data": str(data), "imgsz": setup.imgsz},
        metadata={"demo_base": True, "epochs": setup.base_epochs, "history": result.epochs, "seconds": seconds},
    )
    LOGGER.info("base model trained in %.0f s", seconds)
    return path


def shipped_base(path: Path | None = None, expected: str | None = None) -> Path:
    """The shipped demo base, after checking its SHA-256; a missing, corrupt or changed file is an error that says
    how to restore or rebuild it (never a silent retraining)."""
    path = SHIPPED_BASE if path is None else path
    expected = SHIPPED_BASE_SHA256 if expected is None else expected
    fix = (
        "Restore it (`git checkout -- yoloprune/assets/demo_base.pt` in a clone, or reinstall yoloprune), or "
        "rebuild it with `yoloprune demo --train-base` (about 15 minutes on 2 CPU cores) and give the checkpoint it "
        "prints as `model:` in the experiment config."
    )
    if not path.is_file():
        raise DemoBaseError(f"the shipped demo base {path} is missing. {fix}")
    actual = file_sha256(path)
    if actual != expected:
        raise DemoBaseError(
            f"the shipped demo base {path} has SHA-256 {actual[:16]}..., not the shipped {expected[:16]}...: the file "
            f"is corrupt or was changed. {fix}"
        )
    return path


def train_demo_base(device: str = "cpu") -> dict[str, Any]:
    """Train the demo preset's base from scratch (cached), validate it, and say how it was made: what
    ``yoloprune demo --train-base`` prints and writes next to the checkpoint as ``demo_base.json``."""
    from yoloprune.ultra.checkpoint import read_metadata
    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.val import validate

    path = base_model_path(DEMO, device)
    history = [float(e["map50_95"]) for e in read_metadata(path).get("history", [])]
    best, before = max(history), max(history[:-10])
    with ultralytics_quiet():
        val = validate(load_detector(path), inspect_dataset(demo_dataset(DEMO)), imgsz=DEMO.imgsz, device=device)
    info = {
        "command": "yoloprune demo --train-base",
        "model": DEMO.model,
        "epochs": DEMO.base_epochs,
        "batch": DEMO.batch,
        "dataset": asdict(DEMO.dataset),
        "map50_95": round(val.map50_95, 4),
        "map50": round(val.map50, 4),
        "last_10_epochs_added": round(best / before - 1, 4) if before else None,  # best mAP50-95, before vs after
        "train_seconds": round(float(read_metadata(path).get("seconds", 0.0))),
        "checkpoint": str(path),
        "sha256": file_sha256(path),
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def train_from_scratch(
    model: nn.Module,
    data: str | Path | DatasetInfo,
    *,
    epochs: int,
    imgsz: int,
    project: str | Path,
    name: str,
    batch: int = 16,
    device: str = "cpu",
    desc: str = "training from scratch",
    **overrides: Any,
) -> FinetuneResult:
    """Train ``model`` from its initial weights with Ultralytics' own recipe (the demo base's, and the benchmark's
    smaller sibling's): its optimizer choice, a warm-up, mosaic closed for the last quarter. A progress bar per epoch."""
    from yoloprune.ultra.train import finetune

    bar = tqdm(total=epochs, desc=desc, unit="epoch", dynamic_ncols=True)

    def on_epoch(_epoch: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"mAP50-95 {metrics['map50_95']:.3f}")

    with ultralytics_quiet(), bar:
        return finetune(
            model,
            data,
            epochs=epochs,
            imgsz=imgsz,
            batch=batch,
            device=device,
            project=project,
            name=name,
            on_epoch=on_epoch,
            optimizer="auto",  # training from scratch: Ultralytics' own choice, not the fine-tune recipe
            warmup_epochs=min(3, epochs // 4),
            close_mosaic=max(1, epochs // 4),
            nbs=64,  # Ultralytics' nominal batch (gradient accumulation), as `yolo train` does
            **overrides,
        )


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


def _key(obj: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


BUILTINS = ("synthetic", "synthetic-quick", "demo-base")


def resolve_builtin(name: str, device: str = "cpu") -> Path:
    """Path for ``builtin:<name>`` in an experiment config: the demo dataset's YAML or the shipped base."""
    from yoloprune.errors import did_you_mean

    if name not in BUILTINS:
        raise ConfigError(f"unknown builtin '{name}'.{did_you_mean(name, BUILTINS)} Known: {', '.join(BUILTINS)}.")
    if name == "demo-base":
        return shipped_base()
    return demo_dataset(QUICK if name.endswith("-quick") else DEMO)


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

    study = open_study(config, create=False)
    trials = judged_frame(study, config)
    long = long_results(study, long_epochs)
    base = Store(config.storage_url).baseline_of(config.name) or {}
    base_map = float(base.get("map50_95", 0.0))
    target = config.targets[0].name if config.targets else None
    latency_col = f"latency_ms.{target}" if target else None
    base_ms = study.user_attrs.get("baseline_latency", {}).get(latency_col) if latency_col else None
    cfg = shlex.quote(str(config_path))
    lines = [f"==== yoloprune demo: finished in {seconds / 60:.1f} min " + "=" * 50]
    base_line = f"baseline   {config.model}: mAP50-95 {base_map:.4f}  GFLOPs {base.get('gflops', float('nan')):.3f}"
    if base_ms:
        base_line += f"  latency {base_ms:.2f} ms ({target})"
    lines.append(base_line)
    ok = trials[(trials["state"] == "complete") & (trials["on_target"] == True)] if not trials.empty else trials  # noqa: E712
    constraints = ", ".join(c.describe() for c in config.constraints) or "none"
    cost = config.cost_target
    where = f"{cost.metric} {', '.join(f'{v:g}' for v in cost.values)}" if cost else "the searched costs"
    epochs = config.finetune.epochs
    lines.append(
        f"at {where}: after the {epochs}-epoch proxy, and after {long_epochs} epochs as the export fine-tunes "
        f"(constraints: {constraints})"
    )

    def final(r: Any) -> float | None:
        entry = long.get(int(r["trial"]))
        return float(entry["final"]) if entry else None

    uniform = ok[ok["method"] == "uniform"].sort_values("trial") if "method" in ok else ok.iloc[0:0]
    searched = ok[ok["method"] != "uniform"] if "method" in ok else ok
    rows: list[tuple[str, Any]] = []

    def score(r: Any) -> float:  # the measured long fine-tune when there is one, else the proxy
        after = final(r)
        return after if after is not None else float(r["map50_95"])

    if not searched.empty:
        measured = [r for _, r in searched.iterrows() if final(r) is not None]
        best = max(measured or [r for _, r in searched.iterrows()], key=score)
        rows.append((f"searched   trial {int(best['trial'])} ({best['method']})", best))
    if not uniform.empty:
        u = uniform.iloc[0]
        rows.append((f"uniform    trial {int(u['trial'])} (ratio {float(u['uniform']):.3f})", u))

    def drop(value: float | None) -> str:
        return f"{100 * (1 - value / base_map):5.1f}%" if value is not None and base_map > 0 else "     -"

    if rows:
        lines.append(f"  {'model':<34} {'proxy':>7} {'drop':>6} {f'{long_epochs} epochs':>10} {'drop':>6} "
                     f"{'FLOPs -%':>8} {'ms':>6}  meets the constraints")  # fmt: skip
        for label, r in rows:
            ms = r.get(latency_col) if latency_col else None
            after = final(r)
            on = "measured" if after is not None else "predicted" if r.get("predicted_drop") is not None else "proxy"
            lines.append(
                f"  {label:<34} {float(r['map50_95']):7.4f} {drop(float(r['map50_95']))} "
                f"{after if after is not None else float('nan'):10.4f} {drop(after)} "
                f"{100 * float(r['flops_reduction']):8.1f} {float(ms) if ms is not None else float('nan'):6.2f}  "
                f"{'yes' if r['feasible'] else 'no'} ({on})"
            )
    if len(rows) == 2:
        (_, s_row), (_, u_row) = rows
        proxy_gain = float(s_row["map50_95"]) - float(u_row["map50_95"])
        a, b = final(s_row), final(u_row)
        gain = a - b if a is not None and b is not None else proxy_gain
        verdict = "beats" if gain > 0 else "ties with" if gain == 0 else "loses to"
        when = f" after {long_epochs} epochs" if a is not None and b is not None else " on the proxy"
        lines.append(
            f"  the searched model {verdict} uniform pruning at the same cost by {gain:+.4f} mAP50-95{when}"
            + (f" ({proxy_gain:+.4f} on the proxy)" if when != " on the proxy" else "")
        )
    elif not rows:
        lines.append(f"  no complete trial on the target yet: `yoloprune results {cfg} --all` shows why")
    ref = reference(study, long_epochs)
    if ref and rows and any(final(r) is not None for _, r in rows):
        against = ", ".join(
            f"{label.split()[0]} {100 * (1 - after / ref['map50_95']):.1f}%"
            for label, r in rows
            if (after := final(r)) is not None
        )
        lines.append(
            f"  like with like: the unpruned base fine-tuned the same {long_epochs} epochs reaches "
            f"{ref['map50_95']:.4f}; drop against it: {against}"
        )
    feasible = ok[ok["feasible"] == True] if not ok.empty else ok  # noqa: E712
    pick = max((r for _, r in feasible.iterrows()), key=score) if not feasible.empty else None
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
    export_epochs = long_epochs  # what the demo measured: the export reproduces it, and re-checks it in its card
    chosen = pick if pick is not None else max((r for _, r in rows), key=score) if rows else None
    if chosen is not None:
        number = int(chosen["trial"])
        minutes = _export_minutes(study, number, epochs, long.get(number), long_epochs, export_epochs)
        if pick is None:
            lines.append(
                f"  no trial meets the constraints; the most accurate after {long_epochs} epochs is trial {number}:"
            )
        lines.append(
            f"  yoloprune export {cfg} --trial {number} --epochs {export_epochs}   # .pt + ONNX + model card, "
            f"about {minutes:.0f} min here"
        )
    return "\n".join(lines)


def _export_minutes(
    study: Any, trial: int, proxy_epochs: int, long: dict[str, float] | None, long_epochs: int, epochs: int
) -> float:
    """The export's fine-tune time, scaled from the trial's measured long fine-tune, else from its proxy's."""
    if long and long.get("seconds"):
        per_epoch = float(long["seconds"]) / long_epochs
    else:
        timings = study.get_trials(deepcopy=False)[trial].user_attrs.get("timings", {})
        per_epoch = float(timings.get("finetune", 0.0)) / max(1, proxy_epochs)
    return max(1.0, per_epoch * epochs / 60)
