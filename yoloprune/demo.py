"""The built-in demo: synthetic data, a small base detector trained once and cached, then a search.

Used by ``yoloprune demo`` / ``make demo`` and by the benchmarks in ``experiments/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from yoloprune.data import SyntheticSpec, generate_dataset, inspect_dataset
from yoloprune.log import get_logger
from yoloprune.ultra.offline import ultralytics_quiet, yoloprune_home

if TYPE_CHECKING:
    from torch import nn

    from yoloprune.config import ExperimentConfig
    from yoloprune.data.check import DatasetInfo
    from yoloprune.ultra.train import FinetuneResult

LOGGER = get_logger(__name__)


@dataclass(frozen=True)
class DemoSetup:
    """Sizes of the demo; ``QUICK`` is the tiny version the tests run."""

    dataset: SyntheticSpec
    model: str = "yolov8n.yaml"
    base_epochs: int = 40
    batch: int = 16

    @property
    def imgsz(self) -> int:
        return self.dataset.imgsz


# The demo's set is easier than the generator's default (less clutter, fewer and larger objects), so a
# base model trained for a few minutes on 2 CPU cores is good enough for pruning trade-offs to show.
FULL = DemoSetup(
    SyntheticSpec(n_train=300, n_val=80, imgsz=256, clutter=2.0, max_objects=4, min_size=0.06), base_epochs=30
)
QUICK = DemoSetup(SyntheticSpec(n_train=32, n_val=16, imgsz=128), base_epochs=2)

# The headline benchmark's sets (experiments/search_quality.py): at 128 px so a base trains to convergence
# on 2 CPU cores (100 epochs, ~20 min). BENCH has the demo's kind of images; BENCH_SMALL many small objects.
BENCH = DemoSetup(
    SyntheticSpec(n_train=400, n_val=200, imgsz=128, clutter=2.0, max_objects=4, min_size=0.06), base_epochs=100
)
BENCH_SMALL = DemoSetup(
    SyntheticSpec(n_train=400, n_val=200, imgsz=128, clutter=4.0, max_objects=12, min_size=0.05, max_size=0.2),
    base_epochs=100,
)


def demo_dataset(setup: DemoSetup) -> Path:
    """Generate (or reuse) the demo's synthetic dataset in the yoloprune cache; returns its YAML."""
    key = _key(asdict(setup.dataset))
    return generate_dataset(yoloprune_home() / "datasets" / f"synthetic-{key}", setup.dataset)


def base_model_path(setup: DemoSetup, device: str = "cpu") -> Path:
    """Train the demo's base detector once (cached by its settings) and return its checkpoint path."""
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
    save_checkpoint(
        result.model,
        path,
        train_args={"data": str(data), "imgsz": setup.imgsz},
        metadata={"demo_base": True, "epochs": setup.base_epochs, "history": result.epochs},
    )
    LOGGER.info("base model trained in %.0f s", time.perf_counter() - start)
    return path


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


#: The demo experiment (``experiments/demo.yaml`` holds the same, and a test keeps them equal). Its
#: accuracy constraint is far looser than the default 2%: on a 2-core CPU budget the base is trained for
#: 30 epochs from scratch and each proxy fine-tune lasts 2 epochs, which recovers only 25-40% of the base
#: mAP50-95 at 30-50% fewer FLOPs (README, "Measured results"). It shows the machinery, not a recipe.
DEMO_EXPERIMENT: dict[str, Any] = {
    "name": "demo",
    "model": "builtin:demo-base",
    "data": "builtin:synthetic",
    "imgsz": 256,
    "space": {
        "ratios": {
            stage: {"low": 0.05, "high": 0.45, "step": 0.05}
            for stage in ("backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck")
        },
        "importance": "l1",
        "round_to": 8,
    },
    "finetune": {"epochs": 2, "batch": 16, "bn_batches": 10},
    "targets": [{"name": "cpu_ort", "backend": "onnxruntime", "device": "cpu", "batch": 1}],
    "objectives": [
        {"metric": "map50_95", "direction": "maximize"},
        {"metric": "latency_ms.cpu_ort", "direction": "minimize"},
    ],
    "constraints": [{"metric": "map50_95_drop", "max": 0.7}, {"metric": "flops_reduction", "min": 0.3}],
    "engine": {"sampler": "tpe", "seed": 0, "pruner": "median", "startup_trials": 4},
    "budget": {"trials": 8},
}

#: What ``--quick`` changes: a tiny dataset and base model, one fine-tune epoch, three trials.
QUICK_CHANGES: dict[str, Any] = {
    "name": "demo-quick",
    "model": "builtin:demo-base-quick",
    "data": "builtin:synthetic-quick",
    "imgsz": 128,
    "finetune": {"epochs": 1, "batch": 8, "bn_batches": 2},
    "engine": {"sampler": "tpe", "seed": 0, "pruner": "none", "startup_trials": 2},
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


BUILTINS = ("synthetic", "synthetic-quick", "demo-base", "demo-base-quick")


def resolve_builtin(name: str, device: str = "cpu") -> Path:
    """Path for ``builtin:<name>`` in an experiment config: the demo dataset's YAML or base checkpoint."""
    from yoloprune.errors import ConfigError, did_you_mean

    if name not in BUILTINS:
        raise ConfigError(f"unknown builtin '{name}'.{did_you_mean(name, BUILTINS)} Known: {', '.join(BUILTINS)}.")
    setup = QUICK if name.endswith("-quick") else FULL
    return demo_dataset(setup) if name.startswith("synthetic") else base_model_path(setup, device)
