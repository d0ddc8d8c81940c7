"""Is the demo's trade-off real? Uniform pruning of the shipped demo base at several FLOPs reductions, judged
by the demo's proxy (BN re-estimation, 2 epochs) and by the demo's long fine-tune (``--long-epochs``, as the export), against
the base and against the base fine-tuned as long (like with like).

The demo preset is meant to be a task yolov8n is over-sized for: a cut of -70% FLOPs must still visibly
cost accuracy (>= 10% relative mAP50-95), or the data is saturated and the demo shows nothing.

    python experiments/demo_tradeoff.py                  # -50% and -70% FLOPs, the demo's 10-epoch fine-tunes (~6 min)
    python experiments/demo_tradeoff.py --values 0.3 0.5 0.7 --long-epochs 0   # proxy only

Writes ``docs/benchmarks/demo_tradeoff.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd

from yoloprune.config import config_from_dict
from yoloprune.demo import DEMO_EXPERIMENT, LONG
from yoloprune.search import calibration as cal
from yoloprune.search.optuna_engine import open_study
from yoloprune.search.results import trials_frame
from yoloprune.search.runner import run_search
from yoloprune.storage import Store
from yoloprune.tables import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=float, nargs="+", default=[0.5, 0.7], help="FLOPs reductions")
    p.add_argument("--long-epochs", type=int, default=LONG["epochs"], help="the demo's long fine-tune (0: proxy only)")
    p.add_argument("--output", default="outputs/demo_tradeoff")
    p.add_argument("--json", default="docs/benchmarks/demo_tradeoff.json")
    args = p.parse_args()

    raw: dict[str, Any] = copy.deepcopy(DEMO_EXPERIMENT)
    raw.update(
        name="demo-tradeoff",
        output=args.output,
        cost_target={"metric": "flops_reduction", "value": args.values, "tolerance": 0.01},
        objectives=[{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}],
        engine={"sampler": "uniform", "seed": 0, "pruner": "none"},
        budget={"trials": len(args.values)},
    )
    config = config_from_dict(raw)
    run_search(config, progress=False)
    study = open_study(config, create=False)
    base = Store(config.storage_url).baseline_of(config.name) or {}
    df = trials_frame(study)
    df = df[df["state"] == "complete"].sort_values("cost_target")
    long: dict[int, dict[str, float]] = {}
    ref = None
    if args.long_epochs:
        long = cal.measure_long(config, [study.trials[int(t)] for t in df["trial"]], args.long_epochs)
        ref = cal.measure_reference(config, args.long_epochs)
    rows = []
    for _, r in df.iterrows():
        row: dict[str, Any] = {
            "FLOPs -%": round(100 * float(r["flops_reduction"]), 1),
            "uniform ratio": r["uniform"],
            "proxy mAP50-95": round(float(r["map50_95"]), 4),
            "proxy drop %": round(100 * float(r["map50_95_drop"]), 1),
        }
        if int(r["trial"]) in long:
            final = long[int(r["trial"])]["final"]
            row[f"after {args.long_epochs} epochs"] = round(final, 4)
            row["drop %"] = round(100 * (1 - final / base["map50_95"]), 1)
            if ref:
                row["drop vs base fine-tuned as long %"] = round(100 * (1 - final / ref["map50_95"]), 1)
        rows.append(row)
    table = pd.DataFrame(rows)
    print(
        f"base mAP50-95 {base.get('map50_95', float('nan')):.4f}"
        + (f"; fine-tuned as long {ref['map50_95']:.4f}" if ref else "")
    )
    print(format_table(table))
    out = {"base map50_95": base.get("map50_95"), "reference": ref, "long_epochs": args.long_epochs, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
