"""End to end through the real CLI on a tiny model and dataset: a search stores every trial with all its
metrics in SQLite, `results` reads them back, and a search killed mid-trial resumes losing nothing."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from yoloprune.config import load_config
from yoloprune.storage import Store, file_sha256

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "yoloprune.cli"]
METRICS = {"map50", "map50_95", "map50_drop", "map50_95_drop", "params", "gflops", "size_mb",
           "params_reduction", "flops_reduction", "size_reduction",
           "latency_ms.cpu", "latency_ratio.cpu", "latency_reduction.cpu"}  # fmt: skip


def _config(tmp_path: Path, data_yaml: Path, name: str, **changes) -> Path:
    raw = {
        "name": name,
        "model": {"yaml": "yolov8n.yaml"},
        "data": str(data_yaml),
        "imgsz": 128,
        "device": "cpu",
        "space": {
            "ratios": {"backbone.p4": {"low": 0.1, "high": 0.5, "step": 0.1}, "neck": {"low": 0.1, "high": 0.5}},
            "round_to": [1, 8],
        },
        "finetune": {"epochs": 1, "batch": 8, "bn_batches": 1},
        "targets": [
            {"name": "cpu", "backend": "onnxruntime", "threads": 1, "min_runs": 5, "max_runs": 10, "warmup": 1}
        ],
        "objectives": [
            {"metric": "map50_95", "direction": "maximize"},
            {"metric": "latency_ms.cpu", "direction": "minimize"},
        ],
        "constraints": [{"metric": "flops_reduction", "min": 0.25}],
        "engine": {"sampler": "random", "seed": 1},
        "budget": {"trials": 3},
        "output": str(tmp_path / name),
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _study(cfg_path: Path) -> optuna.Study:
    cfg = load_config(cfg_path)
    return optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)


def _run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cli_search_stores_every_trial_and_results_reads_them(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data, "e2e")
    proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    study = _study(cfg_path)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    for t in complete:
        assert set(t.user_attrs["metrics"]) >= METRICS, t.user_attrs["metrics"].keys()
        assert len(t.values) == 2 and t.values[1] == pytest.approx(t.user_attrs["metrics"]["latency_ms.cpu"])
        assert t.user_attrs["latency"]["cpu"]["runs"] >= 5 and t.user_attrs["timings"]["latency"] > 0
        assert set(t.user_attrs["per_class"]) == {"circle", "square", "triangle", "star", "ring", "cross"}
        assert {"prune", "bn", "finetune", "validation", "latency", "other", "total"} <= set(t.user_attrs["timings"])
        assert t.user_attrs["feasible"] == (t.user_attrs["metrics"]["flops_reduction"] >= 0.25)
        assert t.user_attrs["finetuned"] == t.user_attrs["feasible"]  # infeasible cost: no fine-tune
        assert isinstance(t.user_attrs["reward"], float)
    # yoloprune's own tables: the baseline once, one checkpoint per trial with a correct hash.
    cfg = load_config(cfg_path)
    store = Store(cfg.storage_url)
    exp = store.find_experiment("e2e")
    assert store.latest_baseline(exp)["gflops"] > 0
    arts = store.artifacts(exp)
    assert sorted(a["trial"] for a in arts) == [t.number for t in complete]
    assert all(file_sha256(Path(a["path"])) == a["sha256"] for a in arts)

    res = _run("results", str(cfg_path), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "baseline: mAP50-95" in res.stdout and "3 complete" in res.stdout
    assert "latency on 'cpu': baseline" in res.stdout
    csv = (cfg.output_dir / "trials.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("trial,state,feasible")

    # Re-running with the budget already spent trains nothing and keeps the trials.
    again = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and len(_study(cfg_path).get_trials()) == len(trials)


def test_killed_search_resumes_without_losing_a_trial(tmp_path, tiny_data):
    cfg_path = _config(
        tmp_path,
        tiny_data,
        "killme",
        finetune={"epochs": 4, "batch": 8, "bn_batches": 1},
        constraints=[],
        budget={"trials": 3},
        engine={"sampler": "random", "seed": 1, "workers": {"heartbeat_s": 1, "grace_s": 2}},
    )
    proc = subprocess.Popen(
        [*CLI, "search", str(cfg_path), "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 400
        first_values = None
        while time.monotonic() < deadline:  # wait for one finished trial and a second one running
            time.sleep(1.0)
            try:
                trials = _study(cfg_path).get_trials()
            except Exception:
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("epochs")]
            if done and running:
                first_values = {t.number: t.values for t in done}
                break
        assert first_values, "no trial finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = [t for t in _study(cfg_path).get_trials() if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    time.sleep(3)  # past the heartbeat grace: the next run knows no worker is still running that trial

    resumed = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    trials = _study(cfg_path).get_trials()
    for number, values in first_values.items():  # nothing completed was lost or redone
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3
    gone = trials[killed[0].number]
    assert gone.state == TrialState.FAIL and "interrupted" in gone.user_attrs["error"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == gone.number]
    assert len(retry) == 1 and retry[0].params == gone.params and retry[0].state == TrialState.COMPLETE


def test_bad_input_fails_before_any_training(tmp_path, tiny_data):
    cases = {
        "unknown stage": ({"space": {"ratios": {"backbone.p7": 0.3}}}, "does not have"),
        "missing data": ({"data": str(tmp_path / "nope.yaml")}, "does not exist"),
        "unreachable storage": ({"storage": "postgresql://u:p@127.0.0.1:9/x"}, "postgres"),
    }
    for i, (changes, message) in enumerate(cases.values()):
        cfg_path = _config(tmp_path, changes.pop("data", tiny_data), f"bad{i}", **changes)
        proc = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (changes, proc.stderr[-2000:])
        assert not (tmp_path / f"bad{i}" / "runs").exists()


def test_a_failing_trial_is_recorded_and_the_search_goes_on(tmp_path, tiny_data, monkeypatch):
    from yoloprune.evaluators.proxy import ProxyEvaluator
    from yoloprune.search.runner import run_search

    real = ProxyEvaluator.evaluate
    calls = {"n": 0}

    def flaky(self, candidate, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, candidate, **kwargs)

    monkeypatch.setattr(ProxyEvaluator, "evaluate", flaky)
    cfg = load_config(_config(tmp_path, tiny_data, "flaky"))
    study = run_search(cfg, progress=False)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1
    failed = next(t for t in study.get_trials() if t.state == TrialState.FAIL)
    assert failed.user_attrs["error"] == "RuntimeError: CUDA out of memory (simulated)"


def test_the_same_search_runs_on_postgresql(tmp_path, tiny_data, postgres):
    from yoloprune.search.results import render_results
    from yoloprune.search.runner import run_search

    url = postgres.create_database("search_e2e")
    cfg = load_config(_config(tmp_path, tiny_data, "pg", storage=url))
    study = run_search(cfg, progress=False)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    assert all(set(t.user_attrs["metrics"]) >= METRICS for t in study.get_trials())
    text = render_results(cfg, show_all=True)
    assert "3 complete" in text and "baseline: mAP50-95" in text
    store = Store(url)
    assert len(store.artifacts(store.find_experiment("pg"))) == 3


def test_ctrl_c_stops_cleanly_and_the_trial_is_retried(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data, "ctrlc", finetune={"epochs": 4, "batch": 8, "bn_batches": 1},
                       constraints=[], budget={"trials": 2})  # fmt: skip
    proc = subprocess.Popen([*CLI, "search", str(cfg_path), "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait until the first trial is fine-tuning
            time.sleep(0.5)
            try:
                if any(t.user_attrs.get("epochs") for t in _study(cfg_path).get_trials()):
                    break
            except Exception:
                continue
        os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "finished trials are kept" in err
    [stopped] = _study(cfg_path).get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs["interrupted"]
    resumed = _run("search", str(cfg_path), "--no-progress", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials = _study(cfg_path).get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert any(t.user_attrs.get("retry_of") == stopped.number and t.params == stopped.params for t in trials)


@pytest.mark.parametrize("on_error", ["fail_trial", "stop"])
def test_a_failing_latency_target_fails_the_trial_or_stops_the_search(tmp_path, tiny_data, monkeypatch, on_error):
    import yoloprune.evaluators.hardware as hardware
    from yoloprune.search.runner import run_search

    real = hardware.measure_latency
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the baseline measures fine; the first trial's target is unreachable
            raise OSError("agent at http://jetson:8765 is unreachable (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(hardware, "measure_latency", flaky)
    targets = [{"name": "cpu", "backend": "onnxruntime", "threads": 1, "min_runs": 5, "max_runs": 10, "warmup": 1,
                "on_error": on_error}]  # fmt: skip
    cfg = load_config(_config(tmp_path, tiny_data, f"lat-{on_error}", targets=targets, budget={"trials": 2}))
    study = run_search(cfg, progress=False)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "latency target 'cpu'" in trials[0].user_attrs["error"]
    assert "unreachable (simulated)" in trials[0].user_attrs["error"]
    if on_error == "stop":
        assert len(trials) == 1
    else:
        assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2


def test_export_best_trial_through_the_cli(tmp_path, tiny_data, plain_env):
    import json
    import textwrap

    cfg_path = _config(tmp_path, tiny_data, "exp", budget={"trials": 2}, constraints=[])
    assert _run("search", str(cfg_path), "--no-progress", cwd=tmp_path).returncode == 0
    bad = _run("export", str(cfg_path), "--trial", "7", cwd=tmp_path)
    assert bad.returncode == 2 and "does not exist; trials are numbered 0-1" in bad.stderr
    if importlib.util.find_spec("tensorrt") is None:  # refused before any training, with the way out
        bad = _run("export", str(cfg_path), "--engine", "--output", str(tmp_path / "no-trt"), cwd=tmp_path)
        assert bad.returncode == 2 and "trtexec --onnx" in bad.stderr and not (tmp_path / "no-trt").exists()
    bad = _run("export", str(cfg_path), "--int8", "--dynamic", "--output", str(tmp_path / "no-int8"), cwd=tmp_path)
    assert bad.returncode == 2 and "drop --dynamic" in bad.stderr and not (tmp_path / "no-int8").exists()
    out = tmp_path / "exported"
    proc = _run("export", str(cfg_path), "--epochs", "1", "--int8", "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export fine-tune (1 epochs)" in proc.stderr and "1/1" in proc.stderr  # its progress bar
    study = _study(cfg_path)
    fastest = min(study.get_trials(), key=lambda t: t.user_attrs["metrics"]["latency_ms.cpu"])
    stem = f"exp-trial{fastest.number}"
    card = json.loads((out / f"{stem}.card.json").read_text())
    assert card["trial"] == fastest.number and card["candidate"]["ratios"] == fastest.user_attrs["candidate"]["ratios"]
    assert card["after"]["latency_ms.cpu"] > 0 and card["before"]["latency_ms.cpu"] > 0
    assert card["onnx_check"]["max_abs_diff"] <= 1e-3 * card["onnx_check"]["scale"]
    assert set(card["files"]) == {f"{stem}.pt", f"{stem}.onnx", f"{stem}.int8.onnx"}
    assert "| mAP50-95 |" in (out / f"{stem}.card.md").read_text()
    int8 = card["int8"]
    assert int8["calibration_images"] == 24 and "INT8 ONNX (onnxruntime recipe" in (out / f"{stem}.card.md").read_text()
    assert 0 <= int8["int8_onnx"]["map50_95"] <= 1 and 0 <= int8["fp32_onnx"]["map50_95"] <= 1
    script = textwrap.dedent(f"""
        import sys
        from ultralytics import YOLO
        m = YOLO({str(out / f"{stem}.pt")!r})
        r = m.val(data={str(tiny_data)!r}, imgsz=128, batch=8, plots=False, verbose=False)
        print("MAP", float(r.box.map))
        q = YOLO({str(out / f"{stem}.int8.onnx")!r}, task="detect")
        r = q.val(data={str(tiny_data)!r}, imgsz=128, plots=False, verbose=False)
        print("INT8", float(r.box.map))
        assert not any(k == "yoloprune" or k.startswith("yoloprune.") for k in sys.modules)
    """)
    loaded = subprocess.run(
        [sys.executable, "-c", script], env=plain_env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert abs(float(loaded.stdout.split("MAP")[1].split()[0]) - card["after"]["map50_95"]) < 0.02
    assert abs(float(loaded.stdout.split("INT8")[1]) - int8["int8_onnx"]["map50_95"]) < 1e-4


def test_interrupted_export_fine_tune_resumes(tmp_path, tiny_data):
    import json

    import torch

    cfg_path = _config(tmp_path, tiny_data, "resume-exp", budget={"trials": 1}, constraints=[], targets=[],
                       objectives=[{"metric": "map50_95", "direction": "maximize"}])  # fmt: skip
    assert _run("search", str(cfg_path), "--no-progress", cwd=tmp_path).returncode == 0
    out = tmp_path / "exported"
    last = out / "runs" / "resume-exp-trial0" / "weights" / "last.pt"
    args = [*CLI, "export", str(cfg_path), "--trial", "0", "--epochs", "4", "--output", str(out)]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let the checkpoint write finish
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    done = torch.load(last, map_location="cpu", weights_only=False)["epoch"] + 1
    assert 1 <= done < 4, done

    again = _run("export", str(cfg_path), "--trial", "0", "--epochs", "4", "--output", str(out), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed the interrupted fine-tune at epoch {done + 1}" in again.stdout, again.stdout
    card = json.loads((out / "resume-exp-trial0.card.json").read_text())
    assert card["finetune"]["resumed_from_epoch"] == done and len(card["finetune"]["history"]) == 4 - done
    # the long recipe (finetune.long's default), mosaic closed for the last quarter, stated in the card
    assert card["finetune"]["recipe"] == {"close_mosaic": 1, "lr0": 0.005, "warmup_epochs": 1, "cos_lr": True}
    assert (
        "Fine-tuned 4 epochs (close_mosaic 1, lr0 0.005, warmup_epochs 1, cos_lr True)."
        in (out / "resume-exp-trial0.card.md").read_text()
    )
    fresh = _run("export", str(cfg_path), "--trial", "0", "--epochs", "4", "--output", str(out), cwd=tmp_path)
    assert fresh.returncode == 0 and "resumed" not in fresh.stdout  # a finished run is not resumed


def test_uniform_baseline_runs_in_the_same_study(tmp_path, tiny_data):
    from yoloprune.search.results import trials_frame
    from yoloprune.search.runner import run_search

    cfg = load_config(_config(tmp_path, tiny_data, "uni", constraints=[]))
    study = run_search(cfg, progress=False, uniform=[0.2, 0.3])
    trials = study.get_trials()
    assert [t.user_attrs.get("uniform") for t in trials[:2]] == [0.2, 0.3]
    assert set(trials[0].params.values()) >= {0.2} and trials[1].params["ratio.neck"] == 0.3
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3  # the uniform ones count in the budget
    assert trials_frame(study)["uniform"].tolist()[:2] == [0.2, 0.3]
    again = run_search(cfg, progress=False, uniform=[0.2, 0.3])  # resumed: not queued twice
    assert len(again.get_trials()) == len(trials)
