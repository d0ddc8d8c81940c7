"""The experiment below the search and the export: checked inputs, the evaluators, and the stored baseline.

:func:`prepare` resolves and checks data, model, stages and storage before any training; :func:`start_session`
builds one process's evaluators and the baseline its candidates are compared with. The search
(:mod:`yoloprune.search`), the export (:mod:`yoloprune.deploy`) and the benchmarks stand on these.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from yoloprune.atomic import ensure_writable
from yoloprune.config import BUILTIN_PREFIX, ExperimentConfig, FinetuneConfig, ModelSource
from yoloprune.data.check import DatasetInfo, inspect_dataset
from yoloprune.device import default_device
from yoloprune.evaluators.hardware import HardwareEvaluator
from yoloprune.evaluators.proxy import ProxyEvaluator
from yoloprune.log import get_logger
from yoloprune.pruning import prunable_stage_names
from yoloprune.storage import Store, file_sha256
from yoloprune.ultra.models import load_detector
from yoloprune.ultra.val import check_classes

LOGGER = get_logger(__name__)

#: What a failed write in an experiment's output folder asks for (the message names the file and the cause).
OUTPUT_FIX = (
    "set `output:` in the experiment config (or add `output=DIR` to the command) to a writable folder with room"
)


@dataclass
class Experiment:
    """Everything a search needs, checked before any training starts."""

    config: ExperimentConfig
    data: DatasetInfo
    base: nn.Module
    model_key: str
    device: str
    store: Store
    experiment_id: int

    @property
    def baseline_key(self) -> str:
        return f"{self.model_key}:{self.data.yaml_path}:{self.config.imgsz}"


def prepare(config: ExperimentConfig) -> Experiment:
    """Resolve and check data, model, stages and storage; raises a clear error before any training."""
    device = default_device(config.device)
    ensure_writable(config.output_dir, fix=OUTPUT_FIX)  # a read-only or full folder fails here, not after training
    store = Store(config.storage_url)  # first: cheap, and an unreachable database should fail fast
    data = inspect_dataset(_resolve(config.data, device))
    base, model_key = _load_model(config.model, data, device)
    check_classes(base, data)
    config.space.check_stages(prunable_stage_names(base, opt_in=True))
    experiment_id = store.experiment_id(config.name, config.model_dump(mode="json"))
    return Experiment(config, data, base, model_key, device, store, experiment_id)


@dataclass
class Session:
    """One process's evaluators and the baseline its candidates are compared with."""

    exp: Experiment
    evaluator: ProxyEvaluator
    baseline: dict[str, Any]
    #: The base's latency per target (ms), measured in this process; None when not measured.
    baseline_latency: dict[str, float] | None = None


def start_session(exp: Experiment, *, measure_latency: bool = True, finetune: FinetuneConfig | None = None) -> Session:
    """Build the evaluators and the baseline: stored accuracy and costs, latency measured now.

    Latency is re-measured in every process (``measure_latency``), so candidates are compared with a
    baseline timed in the same session on the same machine; the search records it on its study.
    """
    config = exp.config
    hardware = (
        HardwareEvaluator(config.targets, imgsz=config.imgsz, store=exp.store, workdir=config.output_dir / "latency")
        if config.targets
        else None
    )
    evaluator = ProxyEvaluator(
        exp.base,
        exp.data,
        imgsz=config.imgsz,
        device=exp.device,
        finetune=finetune or config.finetune,
        workdir=config.output_dir / "runs",
        hardware=hardware,
    )
    baseline = experiment_baseline(exp, evaluator)
    measured: dict[str, float] | None = None
    if hardware is not None and measure_latency:
        measured, details = hardware.measure(exp.base, use_cache=False)
        baseline = {**baseline, **measured, "latency": details}
        LOGGER.info("baseline latency: %s", ", ".join(f"{k} {v:.2f} ms" for k, v in measured.items()))
    LOGGER.info(
        "baseline: mAP50-95 %.4f, mAP50 %.4f, %.3f GFLOPs at %d, %d params",
        baseline["map50_95"],
        baseline["map50"],
        baseline["gflops"],
        config.imgsz,
        baseline["params"],
    )
    return Session(exp, evaluator, baseline, measured)


def open_session(
    config: ExperimentConfig, *, measure_latency: bool = True, finetune: FinetuneConfig | None = None
) -> Session:
    """:func:`prepare` the experiment, then :func:`start_session` on it: what every command that evaluates needs."""
    return start_session(prepare(config), measure_latency=measure_latency, finetune=finetune)


def experiment_baseline(exp: Experiment, evaluator: ProxyEvaluator) -> dict[str, Any]:
    """The unpruned model's stored metrics, evaluated and stored on first use."""
    stored = exp.store.baseline(exp.experiment_id, exp.baseline_key)
    if stored is not None:
        return stored
    # One worker evaluates it; the others wait as long as it provably runs (see yoloprune.storage.locks).
    with exp.store.lock(f"baseline:{exp.experiment_id}:{exp.baseline_key}"):
        stored = exp.store.baseline(exp.experiment_id, exp.baseline_key)
        if stored is not None:
            return stored
        LOGGER.info("evaluating the baseline (once per experiment)")
        metrics = evaluator.baseline()
        exp.store.save_baseline(exp.experiment_id, exp.baseline_key, metrics)
        return metrics


def _resolve(value: str, device: str) -> Path:
    if value.startswith(BUILTIN_PREFIX):
        from yoloprune.experiment.builtin import resolve_builtin

        return resolve_builtin(value.removeprefix(BUILTIN_PREFIX), device)
    return Path(value)


def _load_model(source: str | ModelSource, data: DatasetInfo, device: str) -> tuple[nn.Module, str]:
    if isinstance(source, ModelSource):
        model = load_detector(source.yaml, nc=data.nc)
        key = hashlib.sha256(source.yaml.encode()).hexdigest()[:16]
        if source.weights:
            weights = load_detector(_resolve(source.weights, device))
            model.load(weights)
            key += ":" + file_sha256(Path(source.weights))[:16]
        return model, key
    path = _resolve(source, device)
    model = load_detector(path)
    key = file_sha256(path)[:16] if path.suffix == ".pt" else hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return model, key
