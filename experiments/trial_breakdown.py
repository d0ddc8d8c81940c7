"""Where does a trial's time go? Breaks each finished trial of an experiment into prune (pruning and
cost metrics), BN re-estimation, fine-tune, validation, latency and everything else (the framework's own
overhead: sampling, storage, checkpoint writing), and checks the overhead stays under 5%.

    .venv/bin/yoloprune demo                              # or any `yoloprune search CONFIG`
    .venv/bin/python experiments/trial_breakdown.py outputs/demo/experiment.yaml
"""

from __future__ import annotations

import argparse

import optuna
import pandas as pd
from optuna.trial import TrialState

from yoloprune.config import load_config
from yoloprune.storage.record import TrialRecord

PHASES = ["prune", "bn", "finetune", "validation", "latency", "other"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="the experiment YAML (the demo writes outputs/demo/experiment.yaml)")
    args = ap.parse_args()
    cfg = load_config(args.config)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_frozen(t)
        timings = rec.timings or {}
        if "total" in timings and "other" in timings:
            rows.append(
                {
                    "trial": t.number,
                    "finetuned": rec.finetuned,
                    **{p: timings.get(p, 0.0) for p in PHASES},
                    "total": timings["total"],
                }
            )
    if not rows:
        raise SystemExit(f"no complete trials with timings in {cfg.storage_url}")
    df = pd.DataFrame(rows)
    print(df.round(2).to_string(index=False))
    tuned = df[df["finetuned"] == True]  # noqa: E712
    for label, part in (("all complete trials", df), ("fine-tuned trials", tuned)):
        if part.empty:
            continue
        total = part["total"].sum()
        share = {p: 100 * part[p].sum() / total for p in PHASES}
        print(
            f"\n{label} ({len(part)}): mean {part['total'].mean():.1f} s/trial; share of time: "
            + ", ".join(f"{p} {share[p]:.1f}%" for p in PHASES)
        )
    overhead = 100 * df["other"].sum() / df["total"].sum()
    print(
        f"\nframework overhead ('other'): {overhead:.2f}% of trial time (target < 5%): {'OK' if overhead < 5 else 'OVER'}"
    )


if __name__ == "__main__":
    main()
