"""The built-in demo: synthetic data, a small base detector trained once and cached, then pruning.

Used by ``yoloprune demo`` / ``make demo`` and by the benchmarks in ``experiments/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from yoloprune.data import SyntheticSpec, generate_dataset, inspect_dataset
from yoloprune.log import get_logger
from yoloprune.ultra.offline import yoloprune_home

LOGGER = get_logger(__name__)


@dataclass(frozen=True)
class DemoSetup:
    """Sizes of the demo; ``QUICK`` is the tiny version the tests run."""

    dataset: SyntheticSpec
    model: str = "yolov8n.yaml"
    base_epochs: int = 40
    finetune_epochs: int = 3
    batch: int = 16

    @property
    def imgsz(self) -> int:
        return self.dataset.imgsz


FULL = DemoSetup(SyntheticSpec(n_train=400, n_val=100, imgsz=256))
QUICK = DemoSetup(SyntheticSpec(n_train=32, n_val=16, imgsz=128), base_epochs=2, finetune_epochs=1)


def demo_dataset(setup: DemoSetup) -> Path:
    """Generate (or reuse) the demo's synthetic dataset in the yoloprune cache; returns its YAML."""
    key = _key(asdict(setup.dataset))
    return generate_dataset(yoloprune_home() / "datasets" / f"synthetic-{key}", setup.dataset)


def base_model_path(setup: DemoSetup, device: str = "cpu") -> Path:
    """Train the demo's base detector once (cached by its settings) and return its checkpoint path."""
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.train import finetune

    data = demo_dataset(setup)
    key = _key({"model": setup.model, "epochs": setup.base_epochs, "batch": setup.batch, **asdict(setup.dataset)})
    path = yoloprune_home() / "base-models" / f"{Path(setup.model).stem}-{key}.pt"
    if path.exists():
        LOGGER.info("reusing cached base model %s", path)
        return path
    LOGGER.info("training the base %s for %d epochs (once; cached at %s)", setup.model, setup.base_epochs, path)
    start = time.perf_counter()
    model = load_detector(setup.model, nc=inspect_dataset(data).nc)
    result = finetune(
        model,
        data,
        epochs=setup.base_epochs,
        imgsz=setup.imgsz,
        batch=setup.batch,
        device=device,
        project=path.parent / "runs",
        name=path.stem,
        warmup_epochs=min(3, setup.base_epochs // 4),
        close_mosaic=max(1, setup.base_epochs // 4),
    )
    save_checkpoint(
        result.model,
        path,
        train_args={"data": str(data), "imgsz": setup.imgsz},
        metadata={"demo_base": True, "epochs": setup.base_epochs, "history": result.epochs},
    )
    LOGGER.info("base model trained in %.0f s", time.perf_counter() - start)
    return path


def run_demo(output: Path, *, quick: bool = False, device: str = "cpu") -> pd.DataFrame:
    """Prune the cached base model at a few settings, recover it, and print what each step gives."""
    from yoloprune.pruning import find_stages, measure_costs, prune
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector
    from yoloprune.ultra.train import finetune
    from yoloprune.ultra.val import recalibrate_bn, validate

    setup = QUICK if quick else FULL
    output.mkdir(parents=True, exist_ok=True)
    data = demo_dataset(setup)
    base = load_detector(base_model_path(setup, device))
    imgsz = setup.imgsz
    base_val = validate(base, data, imgsz=imgsz, device=device)
    base_cost = measure_costs(base, 640)
    stages = [s.name for s in find_stages(base) if s.prunable]
    candidates = {
        "uniform 0.3": {s: 0.3 for s in stages},
        "uniform 0.5": {s: 0.5 for s in stages},
        "deep 0.6, shallow 0.2": {s: (0.6 if s in ("backbone.p4", "backbone.p5", "neck") else 0.2) for s in stages},
    }
    rows = [
        _row(
            "base",
            base_cost,
            base_cost,
            base_val.map50_95,
            base_val.map50_95,
            base_val.map50_95,
            base_val.map50_95,
        )
    ]
    for label, ratios in candidates.items():
        pruned = prune(base, ratios, importance="l1", round_to=8)
        cost = measure_costs(pruned, 640)
        raw = validate(pruned, data, imgsz=imgsz, device=device).map50_95
        recalibrate_bn(pruned, data, imgsz=imgsz, device=device)
        bn = validate(pruned, data, imgsz=imgsz, device=device).map50_95
        tuned = finetune(
            pruned,
            data,
            epochs=setup.finetune_epochs,
            imgsz=imgsz,
            device=device,
            project=output / "runs",
            name=label.replace(" ", "_").replace(",", ""),
        )
        final = validate(tuned.model, data, imgsz=imgsz, device=device).map50_95
        save_checkpoint(
            tuned.model,
            output / f"{label.replace(' ', '_').replace(',', '')}.pt",
            train_args={"data": str(data), "imgsz": imgsz},
            metadata={"ratios": ratios, "importance": "l1", "round_to": 8},
        )
        rows.append(_row(label, base_cost, cost, base_val.map50_95, raw, bn, final))
    table = pd.DataFrame(rows)
    table.to_csv(output / "demo.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(f"\noutputs: {output.resolve()} (pruned, fine-tuned checkpoints and demo.csv); dataset: {data}")
    return table


def _row(label, base_cost, cost, base_map, raw, bn, final) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "model": label,
        "params": cost.params,
        "GFLOPs@640": round(cost.gflops, 3),
        "flops_reduction_%": round(100 * (1 - cost.gflops / base_cost.gflops), 1),
        "mAP50-95 pruned": round(raw, 4),
        "+BN re-est.": round(bn, 4),
        "+fine-tune": round(final, 4),
        "rel. drop_%": round(100 * (1 - final / base_map), 1) if base_map > 0 else float("nan"),
    }


def _key(obj: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]
