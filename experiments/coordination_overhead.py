"""Coordination overhead of a distributed search: N worker processes share one study on PostgreSQL and
run trials whose evaluation is trivial, so everything measured is storage and coordination.

Each trial does what a real trial does to the database, with the same code: heartbeats (Optuna's RDB
heartbeat thread), the parameters sampled through the experiment's search space, the duplicate-candidate
check over the study, every attribute a real trial writes (metrics, per-class AP, constraints, timings...,
through the same batched writes), the stale-trial check, the worker's progress row and the budget count.
Not included: the per-epoch curve (two round trips per fine-tune epoch).

    python experiments/coordination_overhead.py                     # throwaway PostgreSQL on 127.0.0.1
    python experiments/coordination_overhead.py --storage postgresql://u:p@host/db --workers 1 2 4 8

Reports, per worker count: trials per second (all workers together) and storage time per trial (median
and p90 of each trial's wall time, all of it storage work here). Target: under 50 ms per trial.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.pg (a throwaway cluster)

import optuna
from optuna.trial import TrialState

from yoloprune.config import config_from_dict
from yoloprune.search.optuna_engine import open_study
from yoloprune.storage import Store
from yoloprune.storage.optuna_adapter import fail_stale, finished_count, write_record
from yoloprune.storage.record import TrialRecord

STAGES = ["backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck"]
CLASSES = ["circle", "square", "triangle", "star", "ring", "cross"]


def _config(name: str, url: str, trials: int) -> Any:
    return config_from_dict({
        "name": name, "model": "yolov8n.yaml", "data": "unused.yaml", "storage": url,
        "space": {"ratios": {s: {"low": 0.05, "high": 0.6} for s in STAGES}},
        "engine": {"sampler": "random", "workers": {"heartbeat_s": 5, "grace_s": 30}},
        "budget": {"trials": trials}, "output": tempfile.mkdtemp(prefix="yp-bench-"),
    })  # fmt: skip


def _worker(name: str, url: str, trials: int, times: Any, bare: bool = False, n_workers: int = 1) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = _config(name, url, trials)
    store = Store(url)
    exp = store.experiment_id(name, {})
    worker = store.register_worker(exp)
    study = open_study(config, worker=worker)
    done = 0
    stamps = [time.perf_counter()]

    def objective(trial: optuna.Trial) -> list[float]:
        candidate = config.space.suggest(trial)
        write_record(
            trial,
            TrialRecord(
                candidate={"ratios": candidate.ratios, "importance": "l1", "round_to": 1},
                candidate_key=candidate.key(),
                worker={"host": "bench", "pid": worker},
            ),
        )
        if not bare:
            twins = [
                t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if TrialRecord.from_frozen(t).candidate_key == candidate.key() and t.number != trial.number
            ]  # fmt: skip
            assert not twins  # continuous ratios: never the same
        metrics = {f"m{i}": 0.1 * i for i in range(15)} | {"map50_95": 0.3, "gflops": 5.0}
        write_record(trial, TrialRecord(
            metrics=metrics, per_class={c: 0.3 for c in CLASSES}, feasible=True, finetuned=True,
            reward=0.5, epochs=[{"map50": 0.4, "map50_95": 0.3}] * 3, timings={"total": 0.0},
        ), [-0.1, -0.2])  # fmt: skip
        return [0.3, 5.0]

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal done
        done += 1
        if bare:  # Optuna alone: only the budget check
            if done * n_workers >= trials:
                study.stop()
        else:
            store.update_worker(worker, trials=done)
            fail_stale(study)
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished_count(study) + running >= trials:
                study.stop()
        stamps.append(time.perf_counter())  # one full trial cycle: ask, objective, tell, this callback

    study.optimize(objective, callbacks=[after])
    store.update_worker(worker, trials=done, state="done")
    times.extend([b - a for a, b in itertools.pairwise(stamps)])


def run(url: str, workers: int, trials: int, bare: bool = False) -> dict[str, float]:
    name = f"bench-{workers}w-{int(time.time() * 1000) % 10**8}"
    open_study(_config(name, url, trials))  # created once, before the workers start
    Store(url).experiment_id(name, {})
    with mp.Manager() as manager:
        times = manager.list()
        procs = [mp.Process(target=_worker, args=(name, url, trials, times, bare, workers)) for _ in range(workers)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        wall = time.perf_counter() - start
        per_trial = sorted(times)
    complete = len(optuna.load_study(study_name=name, storage=_config(name, url, trials).storage_url.replace("postgresql://", "postgresql+psycopg://")).get_trials(states=(TrialState.COMPLETE,)))  # fmt: skip
    return {
        "workers": workers,
        "trials": complete,
        "trials_per_s": complete / wall,
        "median_ms": 1000 * statistics.median(per_trial),
        "p90_ms": 1000 * per_trial[int(0.9 * (len(per_trial) - 1))],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", help="PostgreSQL URL (default: a throwaway cluster on 127.0.0.1)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--trials", type=int, default=200, help="trials per run (default 200)")
    p.add_argument("--bare", action="store_true", help="also run Optuna alone (no yoloprune coordination) for scale")
    args = p.parse_args()
    cluster = None
    url = args.storage
    if url is None:
        from tests.pg import Cluster

        cluster = Cluster(Path(tempfile.mkdtemp(prefix="yp-bench-pg-")))
        url = cluster.create_database("bench")
    try:
        rows = [run(url, n, args.trials) for n in args.workers]
        if args.bare:
            rows += [{**run(url, n, args.trials, bare=True), "workers": f"{n} (Optuna alone)"} for n in args.workers]
    finally:
        if cluster is not None:
            cluster.stop()
    print("| workers | trials | trials/s (all workers) | storage time per trial, median | p90 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['trials']} | {r['trials_per_s']:.1f} | {r['median_ms']:.1f} ms | {r['p90_ms']:.1f} ms |"
        )


if __name__ == "__main__":
    main()
