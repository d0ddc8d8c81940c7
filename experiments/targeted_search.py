"""At the same cost, does a search beat uniform pruning? A first, small benchmark of the cost-targeted methods.

Each method runs as its own experiment on the demo's base and dataset, with the same cost target (FLOPs
reduction), the same proxy (BN re-estimation, then a short fine-tune) and uniform pruning at the target as
candidate 0: ``uniform`` alone, ``sensitivity`` (per-stage curves, one global trade-off), ``random`` with
EagleEye-style screening (many candidates scored after BN re-estimation on a few held-out training images, the best
few fine-tuned) and plain ``tpe``. Reports, per method and target value, the best proxy mAP50-95 against
uniform's, the achieved FLOPs reduction, trials, candidates screened and minutes; and the screening's rank
agreement with the proxy (Kendall tau, p-value, n). With ``--long-epochs N`` the best candidate of each
method and uniform are fine-tuned N epochs more, to see whether the proxy's verdict holds.

    python experiments/targeted_search.py                       # about 25 min on a 2-core CPU (base cached)
    python experiments/targeted_search.py --values 0.3 0.5 --long-epochs 10
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
from yoloprune.experiment import open_session
from yoloprune.experiment.builtin import FULL, base_model_path
from yoloprune.offline import ultralytics_quiet
from yoloprune.search.optuna_engine import open_study
from yoloprune.search.results import trials_frame
from yoloprune.search.runner import run_search
from yoloprune.search.screening import FIDELITY_ATTR
from yoloprune.storage.record import TrialRecord
from yoloprune.tables import format_table

STAGES = ("backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck")


def _config(name: str, args: argparse.Namespace, model: str, engine: dict[str, Any], trials: int) -> Any:
    raw = copy.deepcopy(DEMO_EXPERIMENT)
    raw.update(
        name=name,
        model=model,
        output=str(Path(args.output) / name),
        space={"ratios": {s: {"low": 0.05, "high": 0.7, "step": 0.05} for s in STAGES}, "round_to": 8},
        finetune={"epochs": args.proxy_epochs, "batch": 16, "bn_batches": 10, "overrides": {"lr0": args.lr0}},
        cost_target={"metric": "flops_reduction", "value": args.values, "tolerance": 0.01},
        constraints=[],
        objectives=[{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}],
        targets=[],
        engine={"seed": args.seed, "pruner": "none", **engine},
        budget={"trials": trials},
    )
    return config_from_dict(raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=float, nargs="+", default=[0.5], help="FLOPs reductions to land on")
    p.add_argument("--proxy-epochs", type=int, default=2)
    p.add_argument("--lr0", type=float, default=0.002, help="proxy fine-tune learning rate (default 0.002)")
    p.add_argument("--screen", type=int, default=60, help="candidates screened by the random method")
    p.add_argument("--keep", type=int, default=3, help="screened candidates fine-tuned per target value")
    p.add_argument("--tpe-trials", type=int, default=6, help="trials of the TPE search, uniform included")
    p.add_argument("--long-epochs", type=int, default=0, help="re-train each method's best this long (0: skip)")
    p.add_argument("--base-epochs", type=int, default=None, help="demo base trained this long (default the demo's)")
    p.add_argument("--output", default="outputs/targeted")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    setup = FULL if args.base_epochs is None else dataclasses.replace(FULL, base_epochs=args.base_epochs)
    with ultralytics_quiet():
        model = str(base_model_path(setup))
    n = len(args.values)
    plans = {
        "uniform": ({"sampler": "uniform"}, n),
        "sensitivity": ({"sampler": "sensitivity"}, 2 * n),
        "random+screen": (
            {"sampler": "random", "screen": {"candidates": args.screen, "keep": args.keep, "images": 64}},
            n + n * args.keep,
        ),
        "tpe": ({"sampler": "tpe", "startup_trials": 3}, args.tpe_trials),
    }
    rows, screened = [], []
    best_of: dict[str, tuple[Any, int]] = {}
    for label, (engine, trials) in plans.items():
        config = _config(f"targeted-{label.replace('+', '-')}", args, model, engine, trials)
        start = time.perf_counter()
        study = run_search(config, progress=False)
        minutes = (time.perf_counter() - start) / 60
        df = trials_frame(study)
        df = df[(df["state"] == "complete") & (df["on_target"] == True)]  # noqa: E712
        for value in args.values:
            at = df[df["cost_target"] == value]
            uni = at[at["method"] == "uniform"]["map50_95"].max()
            best = at.loc[at["map50_95"].astype(float).idxmax()]
            best_of[f"{label}@{value}"] = (config, int(best["trial"]))
            rows.append({
                "method": label, "target": value, "trials": len(at), "best mAP50-95": float(best["map50_95"]),
                "best is": best["method"], "uniform mAP50-95": float(uni), "gain": float(best["map50_95"]) - float(uni),
                "FLOPs -% (best)": 100 * float(best["achieved"]), "minutes": round(minutes, 1),
            })  # fmt: skip
        for record in study.user_attrs.get(FIDELITY_ATTR, []):
            screened.append({"method": label, **record})
    print(f"proxy: BN re-estimation + {args.proxy_epochs}-epoch fine-tune (SGD lr0 {args.lr0}); base {model}")
    print(format_table(pd.DataFrame(rows).round(4)))
    if screened:
        print("screening score vs proxy mAP50-95 (Kendall tau-b):")
        print(format_table(pd.DataFrame(screened).round(3)))
    if args.long_epochs:
        _long(best_of, args.long_epochs)


def _long(best_of: dict[str, tuple[Any, int]], epochs: int) -> None:
    """Fine-tune each method's best (and uniform) ``epochs`` epochs: does the proxy's ranking hold?"""
    rows = []
    done: dict[str, float] = {}
    for label, (config, number) in best_of.items():
        study = open_study(config, create=False)
        trial = study.get_trials(deepcopy=False)[number]
        candidate = config.space.candidate_of(trial.params, TrialRecord.from_frozen(trial))
        if candidate.key() in done:
            rows.append({"best of": label, "trial": number, f"mAP50-95 after {epochs} epochs": done[candidate.key()]})
            continue
        long = config.finetune.model_copy(update={"epochs": epochs, "skip_infeasible": False})
        with ultralytics_quiet():
            session = open_session(config, measure_latency=False, finetune=long)
            result = session.evaluator.evaluate(candidate, name=f"long_{number:04d}")
        done[candidate.key()] = result.raw["map50_95"]
        rows.append({"best of": label, "trial": number, f"mAP50-95 after {epochs} epochs": result.raw["map50_95"]})
    print(format_table(pd.DataFrame(rows).round(4)))


if __name__ == "__main__":
    main()
