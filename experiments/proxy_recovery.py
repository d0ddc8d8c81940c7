"""Why does a short proxy fine-tune recover so little, and which recipe recovers most?

Prunes a converged base uniformly onto FLOPs-reduction targets (exact cost model, bisected ratio),
re-estimates BN, then fine-tunes ``--epochs`` epochs with each recipe and prints mAP50-95 per epoch and
the fraction of the base's mAP50-95 recovered. Recipes vary the learning rate and Ultralytics' nominal
batch size ``nbs``: the trainer accumulates gradients up to ``nbs`` images (64) before each optimizer step,
so at batch 16 a 2-epoch proxy on 400 images takes only ~12 optimizer steps.

    python experiments/proxy_recovery.py                          # the benchmark's base (cached), ~5 min
    python experiments/proxy_recovery.py --targets 0.25 0.5 --epochs 2
    python experiments/proxy_recovery.py --setup demo --targets 0.5 --epochs 10 --recipes 6 8 9 10 11 12 13
        # the long fine-tune (the export's): the shipped demo base, nothing to train first
"""

from __future__ import annotations

import argparse
import json
import time

from yoloprune.data.check import inspect_dataset
from yoloprune.experiment.builtin import BENCH, DEMO, base_model_path, demo_dataset, shipped_base
from yoloprune.offline import ultralytics_quiet
from yoloprune.pruning import find_stages, prune
from yoloprune.pruning.widths import CostModel
from yoloprune.ultra.models import load_detector
from yoloprune.ultra.train import finetune
from yoloprune.ultra.val import recalibrate_bn, validate

RECIPES: dict[str, dict[str, object]] = {
    "SGD lr0 0.01, nbs 64 (old default)": {"optimizer": "SGD", "lr0": 0.01, "nbs": 64},
    "SGD lr0 0.002, nbs 64": {"optimizer": "SGD", "lr0": 0.002, "nbs": 64},
    "SGD lr0 0.002, nbs = batch": {"optimizer": "SGD", "lr0": 0.002, "nbs": 16},
    "SGD lr0 0.005, nbs = batch": {"optimizer": "SGD", "lr0": 0.005, "nbs": 16},
    "AdamW lr0 2e-4, nbs = batch": {"optimizer": "AdamW", "lr0": 0.0002, "nbs": 16},
    "SGD lr0 0.002, nbs = batch, round_to 1": {"optimizer": "SGD", "lr0": 0.002, "nbs": 16, "round_to": 1},
    "SGD lr0 0.001, nbs = batch": {"optimizer": "SGD", "lr0": 0.001, "nbs": 16},
    "SGD lr0 0.002, nbs = batch, distill 6": {"optimizer": "SGD", "lr0": 0.002, "nbs": 16, "distill": 6.0},
    # For the long fine-tune (the export's, 10+ epochs): a higher rate after a one-epoch warm-up, decayed.
    "SGD lr0 0.01, nbs = batch, warm-up 1, cosine": {
        "optimizer": "SGD", "lr0": 0.01, "nbs": 16, "warmup_epochs": 1, "cos_lr": True,
    },
    "SGD lr0 0.003, nbs = batch, warm-up 1, cosine": {
        "optimizer": "SGD", "lr0": 0.003, "nbs": 16, "warmup_epochs": 1, "cos_lr": True,
    },
    "SGD lr0 0.01, nbs 64, warm-up 1, cosine (yolo train's)": {
        "optimizer": "SGD", "lr0": 0.01, "nbs": 64, "warmup_epochs": 1, "cos_lr": True,
    },
    "SGD lr0 0.003, nbs = batch, warm-up 1, cosine, mosaic to the last 3": {
        "optimizer": "SGD", "lr0": 0.003, "nbs": 16, "warmup_epochs": 1, "cos_lr": True, "close_mosaic": 3,
    },
    "SGD lr0 0.001, nbs = batch, distill 6": {"optimizer": "SGD", "lr0": 0.001, "nbs": 16, "distill": 6.0},
    "SGD lr0 0.005, nbs = batch, warm-up 1, cosine, mosaic but the last quarter": {
        "optimizer": "SGD", "lr0": 0.005, "nbs": 16, "warmup_epochs": 1, "cos_lr": True, "close_mosaic": "quarter",
    },
    "SGD lr0 0.003, nbs = batch, warm-up 1, cosine, mosaic but the last quarter": {
        "optimizer": "SGD", "lr0": 0.003, "nbs": 16, "warmup_epochs": 1, "cos_lr": True, "close_mosaic": "quarter",
    },
}  # fmt: skip


def uniform_at(costs: CostModel, stages: list[str], reduction: float, round_to: int) -> float:
    lo, hi = 0.0, 0.9
    for _ in range(30):
        mid = (lo + hi) / 2
        if costs.cost(dict.fromkeys(stages, mid), round_to).flops_reduction < reduction:
            lo = mid
        else:
            hi = mid
    return hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.5], help="FLOPs reductions")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--recipes", nargs="+", type=int, default=None, help="recipe numbers to run (default all)")
    p.add_argument(
        "--setup",
        choices=["bench", "demo"],
        default="bench",
        help="bench: the headline benchmark's base (trained once, cached); demo: the shipped demo base",
    )
    p.add_argument("--output", default="outputs/proxy_recovery")
    args = p.parse_args()
    setup = BENCH if args.setup == "bench" else DEMO
    with ultralytics_quiet():
        data = inspect_dataset(demo_dataset(setup))
        base = load_detector(base_model_path(setup) if args.setup == "bench" else shipped_base())
        base_map = validate(base, data, imgsz=setup.imgsz).map50_95
    print(f"base mAP50-95 {base_map:.4f} ({setup.base_epochs} epochs, {setup.imgsz} px)")
    stages = [s.name for s in find_stages(base) if s.prunable]
    costs = CostModel(base, setup.imgsz)
    rows = []
    for target in args.targets:
        pruned_at: dict[int, object] = {}
        for number, (name, options) in enumerate(RECIPES.items()):
            if args.recipes is not None and number not in args.recipes:
                continue
            recipe = dict(options)
            distill = float(recipe.pop("distill", 0.0))  # type: ignore[arg-type]
            round_to = int(recipe.pop("round_to", args.round_to))  # type: ignore[call-overload]
            if recipe.get("close_mosaic") == "quarter":
                recipe["close_mosaic"] = max(1, args.epochs // 4)
            if round_to not in pruned_at:
                ratio = uniform_at(costs, stages, target, round_to)
                with ultralytics_quiet():
                    pruned_at[round_to] = prune(base, dict.fromkeys(stages, ratio), round_to=round_to)
                    recalibrate_bn(pruned_at[round_to], data, imgsz=setup.imgsz)
                    bn_only = validate(pruned_at[round_to], data, imgsz=setup.imgsz).map50_95
                print(f"FLOPs -{target:.0%}, round_to {round_to} (uniform {ratio:.3f}): after BN re-estimation only "
                      f"{bn_only:.4f} ({bn_only / base_map:.0%})", flush=True)  # fmt: skip
            pruned = pruned_at[round_to]
            start = time.perf_counter()
            with ultralytics_quiet():
                result = finetune(
                    pruned, data, epochs=args.epochs, imgsz=setup.imgsz, project=args.output, name="r",
                    keep_run=False, teacher=base if distill else None, distill=distill, **{"warmup_epochs": 0, **recipe},
                )  # fmt: skip
            curve = [round(e["map50_95"], 4) for e in result.epochs]
            final = result.val.map50_95 if result.val else curve[-1]
            row = {"target": target, "recipe": name, "curve": curve, "map50_95": final,
                   "recovered": final / base_map, "seconds": round(time.perf_counter() - start)}  # fmt: skip
            rows.append(row)
            print(f"  {name:36s} by epoch {curve}  recovered {final / base_map:.0%}  {row['seconds']} s", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
