"""Do distillation and progressive pruning make the proxy fine-tune recover more, at the same epochs?

On the built-in demo (its base model and dataset), each candidate is evaluated by the proxy evaluator
with the same number of fine-tune epochs under four recipes: plain (prune once, fine-tune),
``distill`` (the base as teacher, Ultralytics' feature distillation), ``rounds`` (progressive: prune to
half the ratios, fine-tune, prune to the full ratios, fine-tune; the epochs are shared) and both. It
prints mAP50-95 per candidate and recipe, its gain over plain, and seconds per evaluation.

    python experiments/proxy_recipes.py                     # 4 epochs, 3 candidates: about 15 min on 2 cores
    python experiments/proxy_recipes.py --base-epochs 100   # on a longer-trained base (trained once, cached)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import pandas as pd

from yoloprune.config import FinetuneConfig, config_from_dict
from yoloprune.demo import DEMO_EXPERIMENT
from yoloprune.evaluators.proxy import ProxyEvaluator
from yoloprune.experiment import prepare
from yoloprune.spaces import Candidate
from yoloprune.tables import format_table

#: Candidates: two uniform ratios and one per-stage mix (light early stages, heavy neck).
CANDIDATES: dict[str, dict[str, float]] = {
    "uniform 0.3": {"backbone.p2": 0.3, "backbone.p3": 0.3, "backbone.p4": 0.3, "backbone.p5": 0.3, "neck": 0.3},
    "uniform 0.5": {"backbone.p2": 0.5, "backbone.p3": 0.5, "backbone.p4": 0.5, "backbone.p5": 0.5, "neck": 0.5},
    "mixed": {"backbone.p2": 0.2, "backbone.p3": 0.3, "backbone.p4": 0.5, "backbone.p5": 0.6, "neck": 0.5},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="fine-tune epochs per evaluation, every recipe (default 4)")
    p.add_argument("--distill", type=float, default=6.0, help="distillation loss weight (Ultralytics' default 6.0)")
    p.add_argument("--rounds", type=int, default=2, help="progressive rounds (default 2)")
    p.add_argument("--base-epochs", type=int, default=None, help="a demo base trained this long (cached)")
    p.add_argument("--output", default="outputs/recipes")
    args = p.parse_args()

    raw: dict[str, Any] = copy.deepcopy(DEMO_EXPERIMENT)
    if args.base_epochs is not None:
        from yoloprune.experiment.builtin import FULL, base_model_path

        raw["model"] = str(base_model_path(dataclasses.replace(FULL, base_epochs=args.base_epochs)))
    raw.update(name="recipes", output=args.output, targets=[], constraints=[])
    raw["objectives"] = [{"metric": "map50_95", "direction": "maximize"}]
    config = config_from_dict(raw)
    exp = prepare(config)
    recipes = {
        "plain": {},
        "distill": {"distill": args.distill},
        f"rounds {args.rounds}": {"rounds": args.rounds},
        f"distill + rounds {args.rounds}": {"distill": args.distill, "rounds": args.rounds},
    }
    base_cfg = config.finetune.model_dump()
    rows = []
    for label, ratios in CANDIDATES.items():
        candidate = Candidate(ratios, importance="l1", round_to=8)  # the demo space's settings
        row: dict[str, Any] = {"candidate": label}
        for recipe, change in recipes.items():
            cfg = FinetuneConfig(**{**base_cfg, "epochs": args.epochs, **change})
            evaluator = ProxyEvaluator(
                exp.base, exp.data, imgsz=config.imgsz, device=exp.device, finetune=cfg, workdir=Path(args.output)
            )
            start = time.perf_counter()
            result = evaluator.evaluate(candidate, name=f"{label}-{recipe}".replace(" ", "_"))
            seconds = time.perf_counter() - start
            row[recipe] = round(result.raw["map50_95"], 4)
            row[f"{recipe} s"] = round(seconds)
            print(f"{label:12s} {recipe:22s} mAP50-95 {result.raw['map50_95']:.4f}  {seconds:.0f} s", flush=True)
        row["FLOPs G"] = round(result.raw["gflops"], 3)
        rows.append(row)
    df = pd.DataFrame(rows)
    print(f"\nmAP50-95 after {args.epochs} fine-tune epochs per recipe (base {exp.model_key}):")
    print(format_table(df))


if __name__ == "__main__":
    main()
