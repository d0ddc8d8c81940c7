"""Ship a searched model: re-apply a trial's ratios to the base model, fine-tune with the full budget,
validate, and write a checkpoint plain Ultralytics loads, a checked ONNX file, and a model card."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial
from torch import nn

from yoloprune.atomic import atomic_path, ensure_writable, write_bytes, write_text
from yoloprune.config import ExperimentConfig
from yoloprune.errors import BackendUnavailableError, ConfigError
from yoloprune.log import epoch_progress, get_logger, progress
from yoloprune.storage.record import TrialRecord

LOGGER = get_logger(__name__)

#: What an export's failed write asks for (the message names the file and the cause before it).
FIX = "give `yoloprune export ... --output DIR` a folder that has room and is writable"


@dataclass
class ExportResult:
    """Files written by :func:`export_trial`."""

    checkpoint: Path
    onnx: Path
    card_json: Path
    card_md: Path
    card: dict[str, Any]
    engine: Path | None = None
    int8_onnx: Path | None = None
    int8_engine: Path | None = None


def export_trial(
    config: ExperimentConfig,
    trial: FrozenTrial,
    *,
    epochs: int,
    output: Path,
    dynamic: bool = False,
    engine: bool = False,
    int8: bool = False,
    fresh: bool = False,
) -> ExportResult:
    """Rebuild ``trial``'s model from the base, fine-tune ``epochs``, validate, and write the deliverables.

    An interrupted fine-tune of the same trial and ``epochs`` resumes from its last epoch unless
    ``fresh``. ``engine`` also builds an FP16 TensorRT engine (TensorRT must be installed here). ``int8``
    also writes an INT8 Q/DQ ONNX calibrated on the dataset's training images and validates it (with
    ``engine``, an INT8 engine too).
    """
    from yoloprune.experiment import prepare
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.storage import file_sha256

    if engine:
        _check_engine_export(dynamic)  # before any training: nothing computed is lost to a missing TensorRT
    if int8 and dynamic:
        raise ConfigError("--int8 quantizes a static-batch ONNX; drop --dynamic.")
    ensure_writable(output, fix=FIX)  # before any training: a read-only or missing folder fails in a second
    exp = prepare(config)
    candidate = config.space.candidate_of(trial.params, TrialRecord.from_frozen(trial))
    stem = f"{config.name}-trial{trial.number}"
    recipe = config.finetune.for_long(epochs).overrides if epochs > 0 else {}
    start = time.perf_counter()
    with ultralytics_quiet():
        model, finetuned = _prune_and_finetune(config, exp, candidate, epochs, recipe, output / "runs", stem, fresh)
        val, baseline = _validate_with_base(config, exp, model, output / "runs")
    measured = _measure_against_base(config, exp, model, val, baseline, output / "latency")
    metrics, base_raw = measured["after"], measured["before"]
    checkpoint, onnx_path, check = _save_model(config, exp, trial, candidate, model, metrics, output / stem, dynamic)
    files = {p.name: file_sha256(p) for p in (checkpoint, onnx_path)}
    card = {
        "experiment": config.name,
        "trial": trial.number,
        "candidate": candidate.as_dict(),
        "finetune": finetuned,
        **measured,  # before, after, per_class_ap50_95, latency
        "onnx_check": {"max_abs_diff": check.max_abs_diff, "scale": check.scale, "dynamic_batch": dynamic},
        "files": files,  # the engines' checksums join it below, before the card is written
        "versions": _versions(),
        "seconds": time.perf_counter() - start,
    }
    if config.cost_target is not None:
        card["versus_uniform"] = _versus_uniform(config, trial)
    if epochs > 0:
        card.update(_recheck(config, trial, epochs, metrics, base_raw))
    engine_path = _build_engine(model, output / f"{stem}.fp16.engine", config.imgsz) if engine else None
    int8_path = int8_engine = None
    if int8:
        int8_path, int8_engine, card["int8"] = _export_int8(onnx_path, exp.data, output / stem, config.imgsz, engine)
    extras = ((engine_path, "export_engine"), (int8_path, "export_int8_onnx"), (int8_engine, "export_engine"))
    card_json, card_md = _write_card(card, files, output / stem, [path for path, _ in extras])
    made = ((checkpoint, "export_checkpoint"), (onnx_path, "export_onnx"), (card_json, "model_card"), *extras)
    for path, kind in made:
        if path is not None:
            exp.store.add_artifact(exp.experiment_id, kind, path, trial.number)
    return ExportResult(checkpoint, onnx_path, card_json, card_md, card, engine_path, int8_path, int8_engine)


def _prune_and_finetune(
    config: ExperimentConfig,
    exp: Any,
    candidate: Any,
    epochs: int,
    recipe: dict[str, Any],
    runs: Path,
    name: str,
    fresh: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """The trial's model pruned from the base, BN re-estimated and fine-tuned ``epochs`` (resuming unless
    ``fresh``), with the model card's record of the fine-tune."""
    from yoloprune.pruning import prune_candidate
    from yoloprune.ultra.val import recalibrate_bn

    model: nn.Module = prune_candidate(exp.base, candidate)
    recalibrate_bn(model, exp.data, imgsz=config.imgsz, batches=config.finetune.bn_batches, device=exp.device)
    history: list[dict[str, float]] = []
    resumed_from: int | None = None
    if epochs > 0:
        with progress(epochs, f"export fine-tune ({epochs} epochs)") as bar:
            tuned = _finetune(config, exp, model, epochs, recipe, runs, name, fresh, epoch_progress(bar))
        model, history, resumed_from = tuned.model, tuned.epochs, tuned.resumed_from
    record = {
        "epochs": epochs,
        "recipe": recipe,
        "distill": config.finetune.distill,
        "history": history,
        "resumed_from_epoch": resumed_from,
    }
    return model, record


def _finetune(
    config: ExperimentConfig,
    exp: Any,
    model: nn.Module,
    epochs: int,
    recipe: dict[str, Any],
    runs: Path,
    name: str,
    fresh: bool,
    on_epoch: Callable[[int, dict[str, float]], None],
) -> Any:
    """The long fine-tune with the export's recipe (resumed unless ``fresh``), distilled from the base if configured."""
    from yoloprune.ultra.train import finetune

    return finetune(
        model,
        exp.data,
        epochs=epochs,
        imgsz=config.imgsz,
        batch=config.finetune.batch,
        device=exp.device,
        project=runs,
        name=name,
        resume=not fresh,
        teacher=exp.base if config.finetune.distill > 0 else None,
        distill=config.finetune.distill,
        on_epoch=on_epoch,
        **recipe,
    )


def _validate_with_base(config: ExperimentConfig, exp: Any, model: nn.Module, runs: Path) -> tuple[Any, dict[str, Any]]:
    """``model``'s validation, and the unpruned base's metrics (evaluated only if the search never stored them)."""
    from yoloprune.evaluators.proxy import ProxyEvaluator
    from yoloprune.experiment import experiment_baseline
    from yoloprune.ultra.val import validate

    val = validate(model, exp.data, imgsz=config.imgsz, batch=config.finetune.batch, device=exp.device)
    evaluator = ProxyEvaluator(
        exp.base, exp.data, imgsz=config.imgsz, device=exp.device, finetune=config.finetune, workdir=runs
    )
    return val, experiment_baseline(exp, evaluator)


def _measure_against_base(
    config: ExperimentConfig, exp: Any, model: nn.Module, val: Any, baseline: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """The card's ``before``, ``after`` (relative to before), per-class AP and latency (on the config's targets)."""
    from yoloprune.config.objectives import relative_metrics
    from yoloprune.evaluators.hardware import HardwareEvaluator
    from yoloprune.evaluators.proxy import raw_metrics
    from yoloprune.pruning import measure_costs

    raw = raw_metrics(val, measure_costs(model, config.imgsz))
    base_raw = {k: float(baseline[k]) for k in ("map50", "map50_95", "params", "gflops", "size_mb")}
    latency: dict[str, Any] = {}
    if config.targets:
        hardware = HardwareEvaluator(config.targets, imgsz=config.imgsz, store=exp.store, workdir=workdir)
        measured, details = hardware.measure(model)
        base_measured, base_details = hardware.measure(exp.base, use_cache=False)
        raw.update(measured)
        base_raw.update(base_measured)
        latency = {"after": details, "before": base_details}
    return {
        "before": base_raw,
        "after": relative_metrics(raw, base_raw),
        "per_class_ap50_95": {
            "before": dict(baseline["per_class"]),
            "after": {c.name: c.ap50_95 for c in val.per_class.values()},
        },
        "latency": latency,
    }


def _save_model(
    config: ExperimentConfig,
    exp: Any,
    trial: FrozenTrial,
    candidate: Any,
    model: nn.Module,
    metrics: dict[str, float],
    stem: Path,
    dynamic: bool,
) -> tuple[Path, Path, Any]:
    """The checkpoint plain Ultralytics loads (with the trial's pruning and metrics), the ONNX file and its check."""
    from yoloprune.convert.onnx import check_onnx, export_onnx
    from yoloprune.ultra.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(
        model,
        stem.with_name(f"{stem.name}.pt"),
        train_args={"data": str(exp.data.yaml_path), "imgsz": config.imgsz},
        metadata={
            "experiment": config.name,
            "trial": trial.number,
            **candidate.as_dict(),
            "metrics": metrics,
        },
        fix=FIX,
    )
    onnx_path = stem.with_name(f"{stem.name}.onnx")
    with atomic_path(onnx_path, fix=FIX) as tmp:  # checked before it takes the final name
        export_onnx(model, tmp, imgsz=config.imgsz, dynamic=dynamic)
        check = check_onnx(tmp, model, imgsz=config.imgsz)
    return checkpoint, onnx_path, check


def _write_card(
    card: dict[str, Any], files: dict[str, str], stem: Path, extras: list[Path | None]
) -> tuple[Path, Path]:
    """Add the ``extras``' checksums to ``files`` (the card's), then write the card as JSON and as Markdown."""
    from yoloprune.storage import file_sha256

    for extra in extras:
        if extra is not None:
            files[extra.name] = file_sha256(extra)
    card_json = write_text(stem.with_name(f"{stem.name}.card.json"), json.dumps(card, indent=2, default=float), fix=FIX)
    card_md = write_text(stem.with_name(f"{stem.name}.card.md"), _markdown(card), fix=FIX)
    return card_json, card_md


def _export_int8(
    onnx_path: Path, data: Any, stem: Path, imgsz: int, engine: bool
) -> tuple[Path, Path | None, dict[str, Any]]:
    """INT8 Q/DQ ONNX (ONNX Runtime recipe) calibrated on training images, validated beside the float ONNX;
    with ``engine``, a TensorRT-recipe Q/DQ ONNX and its INT8 engine too."""
    from yoloprune.convert.quantize import calibration_batches, quantize_onnx
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.ultra.val import train_images, validate

    calibration = calibration_batches(train_images(data), imgsz=imgsz, batch=1)
    path = stem.with_name(f"{stem.name}.int8.onnx")
    with atomic_path(path, fix=FIX) as tmp:
        quantize_onnx(onnx_path, tmp, calibration=calibration)
    with ultralytics_quiet():
        fp32 = validate(onnx_path, data, imgsz=imgsz, batch=1)
        quantized = validate(path, data, imgsz=imgsz, batch=1)
    card = {
        "recipe": "onnxruntime",
        "calibration_images": len(calibration),
        "fp32_onnx": {"map50": fp32.map50, "map50_95": fp32.map50_95},
        "int8_onnx": {"map50": quantized.map50, "map50_95": quantized.map50_95},
        "map50_95_drop": (fp32.map50_95 - quantized.map50_95) / fp32.map50_95 if fp32.map50_95 else None,
    }
    engine_path = None
    if engine:
        from yoloprune.evaluators.latency.base import LatencySpec
        from yoloprune.evaluators.latency.tensorrt_backend import TensorRTBackend

        trt_onnx = stem.with_name(f"{stem.name}.int8-trt.onnx")
        with atomic_path(trt_onnx, fix=FIX) as tmp:
            quantize_onnx(onnx_path, tmp, recipe="tensorrt", calibration=calibration)
        engine_path = stem.with_name(f"{stem.name}.int8.engine")
        spec = LatencySpec(precision="int8", batch=1, imgsz=imgsz, device="cuda")
        timing = engine_path.with_suffix(".timing-cache")
        write_bytes(engine_path, TensorRTBackend().build_engine(trt_onnx, spec, timing_cache=timing), fix=FIX)
    return path, engine_path, card


def _check_engine_export(dynamic: bool) -> None:
    from yoloprune.evaluators.latency.tensorrt_backend import TensorRTBackend

    if dynamic:
        raise ConfigError("--engine builds a static-batch engine; drop --dynamic (or build one with trtexec).")
    if not TensorRTBackend.available():
        raise BackendUnavailableError(
            "--engine needs TensorRT and a CUDA GPU on this machine (pip install -e '.[tensorrt]'). Without them, "
            "export the ONNX here and build the engine on the target: "
            "trtexec --onnx=MODEL.onnx --fp16 --saveEngine=MODEL.engine"
        )


def _build_engine(model: nn.Module, path: Path, imgsz: int) -> Path:
    """An FP16 engine for this machine's GPU, by Ultralytics' exporter: what ``yolo export format=engine half=True``
    gives, loadable by ``YOLO(path)``."""
    from yoloprune.convert.onnx import export_engine_fp16

    with atomic_path(path, fix=FIX) as tmp:
        export_engine_fp16(model, tmp, imgsz=imgsz)
    return path


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "ultralytics", "torch-pruning", "optuna", "onnx", "onnxruntime", "tensorrt", "yoloprune"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _int8_lines(int8: dict[str, Any] | None) -> list[str]:
    if not int8:
        return []
    fp32, quantized = int8["fp32_onnx"], int8["int8_onnx"]
    return [
        f"INT8 ONNX ({int8['recipe']} recipe, calibrated on {int8['calibration_images']} training images): "
        f"mAP50-95 {quantized['map50_95']:.4f} vs {fp32['map50_95']:.4f} for the float ONNX, "
        f"mAP50 {quantized['map50']:.4f} vs {fp32['map50']:.4f}.",
        "",
    ]


def _versus_uniform(config: ExperimentConfig, trial: FrozenTrial) -> dict[str, Any]:
    """The search's comparison with uniform pruning at this trial's cost-target value (proxy fine-tunes)."""
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.search.results import trials_frame, versus_uniform

    target = TrialRecord.from_frozen(trial).target or {}
    table = versus_uniform(trials_frame(open_study(config, create=False)))
    row = table[table["target"] == target.get("value")]
    out: dict[str, Any] = {"cost_target": target, "proxy_epochs": config.finetune.epochs}
    if not row.empty:
        out.update({k: v for k, v in row.iloc[0].to_dict().items() if v is not None})
    return out


def _recheck(
    config: ExperimentConfig, trial: FrozenTrial, epochs: int, metrics: dict[str, float], baseline: dict[str, float]
) -> dict[str, Any]:
    """The real drop after this fine-tune against the calibration's prediction, and against the base fine-tuned
    as long; the measurement joins the study's calibration points (and refits it) when the epochs match."""
    from yoloprune.search import calibration as cal
    from yoloprune.search.optuna_engine import open_study

    study = open_study(config, create=False)
    out: dict[str, Any] = {}
    fitted = cal.stored(study)
    rec = TrialRecord.from_frozen(trial)
    proxy = rec.metrics or {}
    real = float(metrics["map50_95_drop"])
    if fitted is not None and "map50_95_drop" in proxy:
        predicted = fitted.predict(float(proxy["map50_95_drop"]))
        out["calibration"] = {
            "epochs": fitted.epochs, "export_epochs": epochs, "used": fitted.usable, "problem": fitted.problem,
            "error": fitted.error, "predicted_drop": predicted, "real_drop": real,
            "within_error": abs(real - predicted) <= max(fitted.error, fitted.max_error),
        }  # fmt: skip
        if not out["calibration"]["within_error"]:
            LOGGER.warning(
                "the export's real mAP50-95 drop %.1f%% is %.1f points from the calibration's prediction %.1f%%",
                100 * real, 100 * abs(real - predicted), 100 * predicted,
            )  # fmt: skip
    if (ref := cal.reference(study, epochs)) is not None and ref["map50_95"] > 0:
        out["reference"] = {
            "epochs": epochs,
            "map50_95": ref["map50_95"],
            "drop_vs_reference": 1 - metrics["map50_95"] / ref["map50_95"],
        }
    if "map50_95" in proxy and rec.was_finetuned and config.finetune.rounds == 1:
        cal.record_long(
            study,
            trial.number,
            epochs,
            float(proxy["map50_95"]),
            float(metrics["map50_95"]),
            source="export",
            recipe=config.finetune.for_long(epochs).overrides,
        )
        if fitted is None or fitted.epochs == epochs:  # under 3 points at these epochs: no fit yet
            cal.refit(study, baseline, epochs=epochs, proxy_epochs=config.finetune.epochs)
    return out


def _recipe_text(finetune: dict[str, Any]) -> str:
    recipe = ", ".join(f"{k} {v}" for k, v in finetune["recipe"].items())
    return recipe + (f", distilled from the base (weight {finetune['distill']:g})" if finetune.get("distill") else "")


def _recheck_lines(card: dict[str, Any]) -> list[str]:
    lines = []
    if c := card.get("calibration"):
        lines.append(
            f"Calibrated proxy ({c['epochs']}-epoch fine-tunes, error {100 * c['error']:.1f} points"
            + ("" if c["used"] else f", not used: {c['problem']}")
            + f"): predicted mAP50-95 drop {100 * c['predicted_drop']:.1f}%; real drop after this "
            f"{c['export_epochs']}-epoch fine-tune {100 * c['real_drop']:.1f}%"
            + ("." if c["within_error"] else " (outside the calibration's error).")
        )
    if r := card.get("reference"):
        lines.append(
            f"Against the unpruned base fine-tuned the same {r['epochs']} epochs (mAP50-95 {r['map50_95']:.4f}): "
            f"drop {100 * r['drop_vs_reference']:.1f}%."
        )
    return [*lines, ""] if lines else []


def _versus_lines(versus: dict[str, Any] | None) -> list[str]:
    if not versus or "uniform mAP50-95" not in versus:
        return []
    target = versus["cost_target"]
    line = (
        f"At the search's cost target ({target.get('metric')} {target.get('value')}, this trial achieved "
        f"{target.get('achieved', float('nan')):.4f}), after {versus['proxy_epochs']}-epoch proxy fine-tunes: uniform "
        f"pruning (trial {versus['uniform trial']}) scored mAP50-95 {versus['uniform mAP50-95']:.4f}"
    )
    if "best mAP50-95" in versus:
        line += (
            f", the best searched candidate (trial {versus['best trial']}) {versus['best mAP50-95']:.4f} "
            f"({versus.get('gain', 0.0):+.4f})"
        )
    return [line + ".", ""]


def _markdown(card: dict[str, Any]) -> str:
    before, after = card["before"], card["after"]
    rows = [
        ("mAP50-95", "map50_95", "{:.4f}"),
        ("mAP50", "map50", "{:.4f}"),
        ("GFLOPs", "gflops", "{:.3f}"),
        ("parameters", "params", "{:,.0f}"),
        ("checkpoint MB (fp16)", "size_mb", "{:.2f}"),
    ]
    rows += [
        (f"latency {k.removeprefix('latency_ms.')} (ms, median)", k, "{:.2f}")
        for k in after
        if k.startswith("latency_ms.")
    ]
    lines = [
        f"# Model card: {card['experiment']}, trial {card['trial']}",
        "",
        f"Per-stage pruning ratios: {json.dumps(card['candidate']['ratios'])}; importance "
        f"{card['candidate']['importance']}; channels rounded to multiples of {card['candidate']['round_to']}. "
        f"Fine-tuned {card['finetune']['epochs']} epochs"
        + (f" ({_recipe_text(card['finetune'])})." if card["finetune"].get("recipe") else "."),
        "",
        *_versus_lines(card.get("versus_uniform")),
        *_recheck_lines(card),
        "| metric | before | after |",
        "|---|---|---|",
        *(
            f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} |"
            for label, key, fmt in rows
            if key in before
        ),
        "",
        "| class | AP50-95 before | after |",
        "|---|---|---|",
        *(
            f"| {name} | {ap:.4f} | {card['per_class_ap50_95']['after'].get(name, float('nan')):.4f} |"
            for name, ap in card["per_class_ap50_95"]["before"].items()
        ),
        "",
        f"ONNX output matches torch within {card['onnx_check']['max_abs_diff']:.3g} (scale {card['onnx_check']['scale']:.3g}).",
        "",
        *_int8_lines(card.get("int8")),
        "Files: " + ", ".join(f"`{name}` (sha256 {sha[:12]}...)" for name, sha in card["files"].items()),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items() if v),
        "",
    ]
    return "\n".join(lines)
