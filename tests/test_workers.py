"""Distributed search on a real PostgreSQL: three `yoloprune worker` processes share one study; one is
killed mid-trial and its trial is failed (heartbeat) and retried while the others carry on; the same
candidate is never evaluated twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from tests.test_search_e2e import CLI, _config, _run
from yoloprune.config import load_config
from yoloprune.storage import Store

pytestmark = pytest.mark.slow

GRACE_S = 4


def _study(cfg_path: Path, url: str) -> optuna.Study:
    return optuna.load_study(
        study_name=load_config(cfg_path).name, storage=url.replace("postgresql://", "postgresql+psycopg://")
    )


def test_three_workers_share_a_study_and_survive_a_killed_one(tmp_path, tiny_data, postgres):
    url = postgres.create_database("workers")
    cfg_path = _config(
        tmp_path, tiny_data, "shared",
        finetune={"epochs": 3, "batch": 8, "bn_batches": 1},
        constraints=[], targets=[], objectives=[{"metric": "map50_95", "direction": "maximize"}],
        engine={"sampler": "random", "seed": 0, "workers": {"heartbeat_s": 1, "grace_s": GRACE_S, "max_retries": 2}},
        budget={"trials": 6},
    )  # fmt: skip
    # Three workers on two cores: without a passive OpenMP wait policy each runs ~10x slower (README).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [
        subprocess.Popen(
            [*CLI, "worker", str(cfg_path), "--storage", url],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
        )
        for log in logs
    ]  # fmt: skip
    try:
        # Kill the worker running a trial that has finished at least one fine-tune epoch.
        victim, killed_at, deadline = None, 0.0, time.monotonic() + 400
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = _study(cfg_path, url).get_trials()
            except (KeyError, Exception):
                continue
            for t in trials:
                pid = (t.user_attrs.get("worker") or {}).get("pid")
                if t.state == TrialState.RUNNING and t.user_attrs.get("epochs") and pid in {p.pid for p in procs}:
                    victim = t
                    os.killpg(pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
        assert victim is not None, "no trial got to its first epoch in time"

        # Its trial is failed soon after the grace period (the survivors check every heartbeat, between
        # training steps on a loaded 2-core machine) and queued again.
        while time.monotonic() - killed_at < 60:
            state = _study(cfg_path, url).trials[victim.number].state
            if state != TrialState.RUNNING:
                break
            time.sleep(0.5)
        failed_after = time.monotonic() - killed_at
        assert state == TrialState.FAIL and failed_after <= GRACE_S + 10, (state, failed_after)
        print(f"killed worker's trial failed {failed_after:.1f} s after the kill (grace {GRACE_S} s)")

        survivors = [p for p in procs if p.pid != victim.user_attrs["worker"]["pid"]]
        for p in survivors:
            assert p.wait(timeout=600) == 0, Path(logs[procs.index(p)]).read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    trials = _study(cfg_path, url).get_trials()
    t0 = min(t.datetime_start for t in trials if t.datetime_start)
    for t in trials:  # the timeline, for the log
        end = t.datetime_complete or t.datetime_start
        print(t.number, t.state.name, (t.user_attrs.get("worker") or {}).get("pid"),
              f"{(t.datetime_start - t0).total_seconds():.1f}-{(end - t0).total_seconds():.1f} s" if t.datetime_start else "",
              {k: round(v, 1) for k, v in t.user_attrs.get("timings", {}).items()})  # fmt: skip
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no duplicate or missing trial numbers
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 6 <= len(complete) <= 8, [
        (t.number, t.state) for t in trials
    ]  # the budget; workers in flight may add one each
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    gone = trials[victim.number]
    assert gone.state == TrialState.FAIL and "heartbeats" in gone.user_attrs["error"]
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == gone.number]
    assert retry.params == gone.params and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["worker"]["pid"] != gone.user_attrs["worker"]["pid"]
    # The same candidate is evaluated once; any repeat reuses the results.
    evaluated = [t.user_attrs["candidate_key"] for t in complete if "duplicate_of" not in t.user_attrs]
    assert len(evaluated) == len(set(evaluated))
    # The baseline was evaluated by exactly one worker.
    assert sum("evaluating the baseline" in log.read_text() for log in logs) == 1
    store = Store(url)
    exp = store.find_experiment("shared")
    assert len(store.workers(exp)) == 3 and sum(w["trials"] for w in store.workers(exp)) >= len(complete)

    # `results` reads the same records whichever worker wrote them.
    proc = _run("results", str(cfg_path), "--storage", url, cwd=tmp_path)
    assert proc.returncode == 0 and "workers: 3 on 1 machine(s)" in proc.stdout, proc.stdout + proc.stderr
    csv = pd.read_csv(load_config(cfg_path).output_dir / "trials.csv")
    assert list(csv["trial"]) == numbers and list(csv["state"]) == [t.state.name.lower() for t in trials]
    for t in complete:
        assert csv.loc[csv["trial"] == t.number, "map50_95"].item() == pytest.approx(t.values[0])


def test_a_repeated_candidate_reuses_the_first_result(tmp_path, tiny_data):
    """Two possible candidates and a budget of three: one trial repeats a candidate and is not re-evaluated."""
    cfg_path = _config(
        tmp_path, tiny_data, "twins",
        space={"ratios": {"backbone.p4": {"low": 0.2, "high": 0.4, "step": 0.2}, "neck": 0.3}},
        constraints=[], targets=[], objectives=[{"metric": "map50_95", "direction": "maximize"}],
        engine={"sampler": "random", "seed": 0}, budget={"trials": 3},
    )  # fmt: skip
    proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(cfg_path)
    trials = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    dups = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert dups and len({t.user_attrs["candidate_key"] for t in trials if t not in dups}) == 3 - len(dups)
    for dup in dups:
        first = trials[dup.user_attrs["duplicate_of"]]
        assert "duplicate_of" not in first.user_attrs and dup.params == first.params and dup.values == first.values
        assert dup.user_attrs["metrics"] == first.user_attrs["metrics"] and dup.user_attrs["timings"]["total"] < 5
        assert not (cfg.output_dir / "trials" / f"trial_{dup.number:04d}.pt").exists()
