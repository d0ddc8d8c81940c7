"""Does searching per-stage ratios beat uniform pruning? Equal trial budgets on the built-in demo.

Runs, each as its own experiment on the demo's base model and dataset with the same proxy (2-epoch
fine-tune, BN re-estimation, ONNX Runtime CPU latency): the uniform sweep (the same ratio on every
stage), random search, TPE and NSGA-II. No constraints and no pruner, so every trial is fully
evaluated. Then, per method: mAP50-95 at matched FLOPs (the best trial pruning at least as many FLOPs
as each uniform point), the best FLOPs and latency reduction within a relative mAP50-95 drop, and the
proxy fidelity (Kendall tau of the proxy's ranking against longer fine-tunes) of the TPE search.

    python experiments/search_quality.py --trials 8               # about 20 min on a 2-core CPU
    python experiments/search_quality.py --trials 8 --fidelity-epochs 0   # skip the fidelity re-training
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import pandas as pd

from yoloprune.config import config_from_dict
from yoloprune.demo import DEMO_EXPERIMENT
from yoloprune.search import fidelity
from yoloprune.search.optuna_engine import open_study
from yoloprune.search.results import trials_frame
from yoloprune.search.runner import run_search
from yoloprune.tables import format_table


def _config(name: str, output: Path, sampler: str, trials: int, seed: int, model: str | None = None) -> Any:
    raw = copy.deepcopy(DEMO_EXPERIMENT)
    if model is not None:
        raw["model"] = model
    raw.update(
        name=name,
        output=str(output / name),
        constraints=[],
        engine={"sampler": sampler, "seed": seed, "pruner": "none", "startup_trials": 3},
        budget={"trials": trials},
    )
    return config_from_dict(raw)


def _frame(config: Any) -> pd.DataFrame:
    df = trials_frame(open_study(config, create=False))
    return df[df["state"] == "complete"].copy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="trials per search method (default 8)")
    p.add_argument("--uniform", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4], help="uniform sweep ratios")
    p.add_argument("--samplers", nargs="+", default=["random", "tpe", "nsga2"])
    p.add_argument("--max-drop", type=float, default=0.02, help="relative mAP50-95 drop allowed (default 0.02)")
    p.add_argument("--fidelity-epochs", type=int, default=6, help="long fine-tune for the fidelity check (0: skip)")
    p.add_argument("--output", default="outputs/quality")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-epochs", type=int, default=None,
                   help="train (once, cached) a demo base for this many epochs instead of the demo's 30")  # fmt: skip
    args = p.parse_args()
    out = Path(args.output)
    model = None
    if args.base_epochs is not None:
        from yoloprune.demo import FULL, base_model_path

        model = str(base_model_path(dataclasses.replace(FULL, base_epochs=args.base_epochs)))
    frames: dict[str, pd.DataFrame] = {}
    seconds: dict[str, float] = {}

    uniform = _config("quality-uniform", out, "random", len(args.uniform), args.seed, model)
    start = time.perf_counter()
    run_search(uniform, progress=False, uniform=args.uniform)
    seconds["uniform"] = time.perf_counter() - start
    frames["uniform"] = _frame(uniform)
    configs = {}
    for sampler in args.samplers:
        configs[sampler] = _config(f"quality-{sampler}", out, sampler, args.trials, args.seed, model)
        start = time.perf_counter()
        run_search(configs[sampler], progress=False)
        seconds[sampler] = time.perf_counter() - start
        frames[sampler] = _frame(configs[sampler])

    latency = next(c for c in frames["uniform"].columns if c.startswith("latency_ms."))
    target = latency.removeprefix("latency_ms.")
    for df in frames.values():
        df["latency_reduction"] = 1 - df[f"latency_ratio.{target}"]
    base = frames["uniform"].sort_values("flops_reduction")
    print(
        f"\nmAP50-95 at matched FLOPs (best trial pruning at least the uniform point's FLOPs; {args.trials} trials each):"
    )
    rows = []
    for _, u in base.iterrows():
        row: dict[str, Any] = {
            "uniform ratio": u["uniform"],
            "FLOPs -%": round(100 * u["flops_reduction"], 1),
            "uniform mAP": round(u["map50_95"], 4),
        }
        for name in args.samplers:
            df = frames[name]
            match = df[df["flops_reduction"] >= u["flops_reduction"]]
            row[name] = round(match["map50_95"].max(), 4) if not match.empty else None
        rows.append(row)
    print(format_table(pd.DataFrame(rows)))

    print(f"\nBest reductions within a {100 * args.max_drop:.0f}% relative mAP50-95 drop, and overall:")
    rows = []
    for name, df in frames.items():
        ok = df[df["map50_95_drop"] < args.max_drop]
        rows.append({
            "method": name,
            "trials": len(df),
            f"FLOPs -% (drop<{args.max_drop:.0%})": round(100 * ok["flops_reduction"].max(), 1) if not ok.empty else None,
            f"latency -% (drop<{args.max_drop:.0%})": round(100 * ok["latency_reduction"].max(), 1) if not ok.empty else None,
            "smallest mAP drop %": round(100 * df["map50_95_drop"].min(), 1),
            "best mAP50-95": round(df["map50_95"].max(), 4),
            "max FLOPs -%": round(100 * df["flops_reduction"].max(), 1),
            "max latency -%": round(100 * df["latency_reduction"].max(), 1),
            "minutes": round(seconds[name] / 60, 1),
        })  # fmt: skip
    print(format_table(pd.DataFrame(rows)))

    if args.fidelity_epochs and "tpe" in configs:
        result = fidelity.measure(configs["tpe"], top=3, sample=2, epochs=args.fidelity_epochs)
        print("\n" + fidelity.describe(vars(result)))
        for number, r in result.trials.items():
            print(f"  trial {number}: proxy {r['proxy']:.4f}, {result.epochs} epochs {r['long']:.4f}")


if __name__ == "__main__":
    main()
