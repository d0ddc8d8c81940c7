"""The built-in data and models: the synthetic sets, their from-scratch base detectors, and the shipped demo base.

``builtin:<name>`` in an experiment config resolves here (:func:`resolve_builtin`); the demo
(:mod:`yoloprune.demo`) and the benchmarks in ``experiments/`` use the presets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from yoloprune.data import SyntheticSpec, generate_dataset, inspect_dataset
from yoloprune.errors import ConfigError
from yoloprune.log import get_logger
from yoloprune.offline import ultralytics_quiet, yoloprune_home
from yoloprune.storage.db import file_sha256

if TYPE_CHECKING:
    from torch import nn

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

ASSETS = Path(__file__).parent.parent / "assets"
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
