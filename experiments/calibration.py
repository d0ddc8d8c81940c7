"""Does the calibrated proxy predict the drop after the export's fine-tune? Fit it, then check it on other models.

On the benchmark's base (``yoloprune.experiment.builtin.BENCH``), a search puts uniform pruning and random allocations on
several FLOPs targets (the same proxy as ``experiments/search_quality.py``); ``yoloprune calibrate``'s code then
long-fine-tunes ``--candidates`` of them (uniform first) for the export's ``--epochs`` and fits
``final drop = a + b x proxy drop``. Printed: the fit, its leave-one-out error, and each point. Then, as an
independent check, the fit predicts the final drop of every model the headline benchmark exported (read
from its ``progress.json``; those candidates were never part of the fit) against the drop measured there.

    python experiments/calibration.py                      # ~25 min on 2 cores (base cached)
    python experiments/calibration.py --candidates 6 --epochs 15
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd

from yoloprune.config import config_from_dict
from yoloprune.demo import DEMO_EXPERIMENT
from yoloprune.experiment.builtin import BENCH, base_model_path, demo_dataset
from yoloprune.search import calibration as cal
from yoloprune.search.runner import run_search
from yoloprune.tables import format_table

STAGES = ("backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=float, nargs="+", default=[0.25, 0.4, 0.55, 0.7], help="FLOPs reductions")
    p.add_argument("--trials", type=int, default=8, help="search trials (uniform at each value first)")
    p.add_argument("--candidates", type=int, default=5, help="trials long-fine-tuned for the fit")
    p.add_argument("--epochs", type=int, default=15, help="the export's fine-tune epochs (the benchmark's)")
    p.add_argument("--proxy-epochs", type=int, default=2)
    p.add_argument("--benchmark", default="outputs/search_quality/progress.json")
    p.add_argument("--output", default="outputs/calibration")
    p.add_argument("--json", default="docs/benchmarks/calibration.json")
    args = p.parse_args()
    raw: dict[str, Any] = copy.deepcopy(DEMO_EXPERIMENT)
    raw.update(
        name="calibration",
        model=str(base_model_path(BENCH)),
        data=str(demo_dataset(BENCH)),
        imgsz=BENCH.imgsz,
        output=args.output,
        space={"ratios": {s: {"low": 0.05, "high": 0.75, "step": 0.05} for s in STAGES}, "round_to": 8},
        finetune={"epochs": args.proxy_epochs, "batch": 16, "bn_batches": 10},
        cost_target={"metric": "flops_reduction", "value": args.values, "tolerance": 0.01},
        constraints=[{"metric": "map50_95_drop", "max": 0.05}],
        objectives=[{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}],
        targets=[],
        engine={"sampler": "random", "seed": 0, "pruner": "none"},
        budget={"trials": args.trials},
    )
    config = config_from_dict(raw)
    run_search(config, progress=False)
    run = cal.calibrate(config, candidates=args.candidates, epochs=args.epochs)
    base = float(run.baseline["map50_95"])
    fitted = run.calibration
    rows = []
    for number, r in run.results.items():
        point = fitted.points.get(number, {}) if fitted else {}
        rows.append({
            "trial": number, "proxy mAP50-95": r["proxy"], "final mAP50-95": r["final"],
            "proxy drop %": 100 * (1 - r["proxy"] / base), "final drop %": 100 * (1 - r["final"] / base),
            "leave-one-out prediction %": 100 * point["loo_prediction"] if point else None,
        })  # fmt: skip
    print(format_table(pd.DataFrame(rows).round(2)))
    for line in cal.describe(fitted):
        print(line)
    if run.reference:
        print(f"the base fine-tuned {args.epochs} more epochs the same way: mAP50-95 {run.reference['map50_95']:.4f} "
              f"(as given: {base:.4f})")  # fmt: skip
    checks = []
    bench = Path(args.benchmark)
    if fitted is not None and bench.exists():
        done = json.loads(bench.read_text())
        for key, value in done.items():
            parts = key.split("/")
            if len(parts) == 5 and parts[3] == "long" and parts[0] == "builtin" and "same as" not in value:
                found = done.get("/".join(parts[:3]) + "/search", {})
                if found.get("proxy map50_95") is None:
                    continue
                proxy_drop = 1 - found["proxy map50_95"] / base
                real = 1 - value["map50_95"] / base
                checks.append({
                    "model": key, "proxy drop %": 100 * proxy_drop, "predicted final drop %":
                    100 * fitted.predict(proxy_drop), "real final drop %": 100 * real,
                    "error (points)": 100 * (fitted.predict(proxy_drop) - real),
                })  # fmt: skip
        if checks:
            print("independent check on the headline benchmark's exported models:")
            print(format_table(pd.DataFrame(checks).round(2)))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "json", "benchmark")},
        "baseline map50_95": base, "reference": run.reference, "proxy_reference": run.proxy_reference,
        "calibration": fitted.as_dict() if fitted else None, "error": run.error, "points": rows, "checks": checks,
    }, indent=1, default=float))  # fmt: skip
    print(f"written {out}")


if __name__ == "__main__":
    main()
