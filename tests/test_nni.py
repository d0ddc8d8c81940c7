"""The NNI engine: search-space translation, the Optuna-backed tuner, and real NNI experiments launched
through the CLI (start, stop mid-search, resume, view), checked in NNI's REST API, in the project's
storage and in NNI's web dashboard in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from tests.browser import browser_page
from tests.test_search_e2e import _config
from yoloprune.config import config_from_dict, load_config
from yoloprune.errors import BackendUnavailableError, SearchSpaceError
from yoloprune.spaces import SearchSpace

nni = pytest.importorskip("nni", reason="the nni extra is not installed (pip install -e '.[nni]')")

from yoloprune.search import nni_engine  # noqa: E402

CLI = [sys.executable, "-m", "yoloprune.cli"]
SPACE = {
    "ratios": {"backbone.p4": {"low": 0.1, "high": 0.5, "step": 0.1}, "neck": {"low": 0.1, "high": 0.5}},
    "round_to": [1, 8],
}


# --- units --------------------------------------------------------------------------------------------


def test_search_space_translates_to_nni_format():
    space = SearchSpace.model_validate({**SPACE, "ratios": {**SPACE["ratios"], "backbone.p5": 0.3}})
    assert nni_engine.nni_search_space(space) == {
        "ratio.backbone.p4": {"_type": "quniform", "_value": [0.1, 0.5, 0.1]},
        "ratio.neck": {"_type": "uniform", "_value": [0.1, 0.5]},
        "round_to": {"_type": "choice", "_value": [1, 8]},
    }


def test_snap_moves_nni_values_onto_the_grid_and_refuses_foreign_ones():
    space = SearchSpace.model_validate({"ratios": {"a": {"low": 0.2, "high": 0.55, "step": 0.1}, "b": {"low": 0.1, "high": 0.5}}, "round_to": [1, 8]})  # fmt: skip
    snapped = space.snap({"ratio.a": 0.30000000000000004, "ratio.b": 0.7, "round_to": 8})
    assert snapped == {"ratio.a": 0.3, "ratio.b": 0.5, "round_to": 8}
    assert space.snap({"ratio.a": 0.56, "ratio.b": 0.2, "round_to": 1})["ratio.a"] == 0.5  # 0.55 is off the grid
    with pytest.raises(SearchSpaceError, match=r"lack 'ratio\.b'"):
        space.snap({"ratio.a": 0.3, "round_to": 1})
    with pytest.raises(SearchSpaceError, match="'round_to' = 4 is not one of"):
        space.snap({"ratio.a": 0.3, "ratio.b": 0.2, "round_to": 4})


def test_experiment_id_is_stable_valid_and_distinct(tmp_path):
    from nni.experiment.management import is_valid_experiment_id

    a = _cfg(tmp_path, "a.very.long.experiment-name_with.many.parts.1")
    b = _cfg(tmp_path, "a.very.long.experiment-name_with.many.parts.2")
    assert nni_engine.experiment_id(a) == nni_engine.experiment_id(a)
    assert nni_engine.experiment_id(a) != nni_engine.experiment_id(b)
    assert is_valid_experiment_id(nni_engine.experiment_id(a))


def test_optuna_tuner_asks_the_configured_sampler_and_learns_from_metric_dicts(tmp_path):
    cfg = _cfg(tmp_path, "tuner", engine={"sampler": "tpe", "seed": 0, "startup_trials": 2, "nni": {"tuner": "optuna"}})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    tuner = nni_engine.OptunaTuner(str(path))
    seen = []
    for i in range(6):
        params = tuner.generate_parameters(i)
        seen.append(params)
        assert cfg.space.snap(params) == pytest.approx(params, abs=1e-6)  # already on the grid
        if i == 3:
            tuner.trial_end(i, success=False)
            continue
        flops = 0.2 + params["ratio.backbone.p4"] / 2
        metrics = {"default": 1.0, "map50_95": 0.5 - params["ratio.neck"] / 2, "gflops": 3 - flops, "map50_95_drop": 0.01, "flops_reduction": flops}  # fmt: skip
        tuner.receive_trial_result(i, params, metrics)
        tuner.trial_end(i, success=True)
    states = [t.state for t in tuner.study.trials]
    assert states.count(TrialState.COMPLETE) == 5 and states.count(TrialState.FAIL) == 1
    assert all("constraints" in t.user_attrs for t in tuner.study.trials if t.state == TrialState.COMPLETE)
    assert len({json.dumps(p, sort_keys=True) for p in seen}) > 1
    tuner.receive_trial_result(9, {}, {"default": 1.0})  # unknown parameter id: ignored
    params = tuner.generate_parameters(10)
    tuner.receive_trial_result(10, params, {"default": 1.0, "map50_95": 0.3})  # objectives missing
    assert tuner.study.trials[-1].state == TrialState.FAIL


def test_missing_nni_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nni", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[nni\]'"):
        nni_engine.require_nni()


def test_final_metrics_hold_reward_metrics_and_feasibility():
    trial = optuna.trial.create_trial(
        values=[0.3],
        distributions={},
        params={},
        user_attrs={
            "reward": 0.8,
            "feasible": True,
            "metrics": {"map50_95": 0.3, "latency_ms.cpu": 2.0, "x": math.nan},
        },
    )
    out = nni_engine.final_metrics(trial)
    assert out["default"] == 0.8 and out["map50_95"] == 0.3 and out["latency_ms.cpu"] == 2.0 and out["feasible"] == 1.0
    assert "x" not in out  # NaN is not JSON the dashboard can read


# --- real NNI experiments -----------------------------------------------------------------------------


def _cfg(tmp_path: Path, name: str, **changes: Any):
    return config_from_dict({"name": name, "model": "yolov8n.yaml", "data": "d.yaml", "space": SPACE, "output": str(tmp_path), **changes})  # fmt: skip


def _write_config(tmp_path: Path, data_yaml: Path, name: str, **changes: Any) -> Path:
    """The end-to-end tests' tiny config, with NNI's TPE and a 2-epoch fine-tune (one intermediate result each)."""
    defaults = {"finetune": {"epochs": 2, "batch": 8, "bn_batches": 1}, "engine": {"nni": {"tuner": "tpe"}, "seed": 1}}
    return _config(tmp_path, data_yaml, name, **{**defaults, **changes})


@pytest.fixture
def nni_env(tmp_path: Path) -> dict[str, str]:
    """NNI keeps its experiment list in ~/nni-experiments: give each test its own home."""
    home = tmp_path / "home"
    home.mkdir()
    return {**os.environ, "HOME": str(home)}


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000 and not nni_engine._listening(port) and not nni_engine._listening(port + 1):
            return port
    raise RuntimeError("no free port pair")


def _cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _rest(port: int, path: str) -> Any:
    from nni.experiment import rest

    return rest.get(port, path)


def _wait(what: str, check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _done(port: int) -> bool:
    return _rest(port, "/check-status")["status"] in ("DONE", "ERROR", "STOPPED")


def _final(job: dict[str, Any]) -> dict[str, float]:
    return json.loads(json.loads(job["finalMetricData"][0]["data"]))  # NNI encodes it twice


@pytest.mark.slow
def test_nni_experiment_start_stop_resume_view_with_storage_and_dashboard(tmp_path, tiny_data, nni_env):
    cfg_path = _write_config(tmp_path, tiny_data, "nni-e2e", constraints=[])  # every trial fine-tunes
    cfg = load_config(cfg_path)
    port = _free_port()
    try:
        proc = _cli(nni_env, "nni", str(cfg_path), "--port", str(port))
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"dashboard http://127.0.0.1:{port}" in proc.stdout
        assert (cfg.output_dir / "nni" / nni_engine.experiment_id(cfg)).is_dir()  # NNI's state in the output

        # Stop mid-search once a trial has finished, then resume.
        _wait("a succeeded trial", lambda: any(j["status"] == "SUCCEEDED" for j in _rest(port, "/trial-jobs")))
        proc = _cli(nni_env, "nni", str(cfg_path), "--stop")
        assert proc.returncode == 0 and "stopped NNI experiment" in proc.stdout, proc.stderr[-3000:]
        assert not nni_engine._listening(port)
        proc = _cli(nni_env, "nni", str(cfg_path), "--resume", "--port", str(port))
        assert proc.returncode == 0, proc.stderr[-4000:]
        _wait("the experiment to finish", lambda: _done(port))
        assert _rest(port, "/check-status")["status"] == "DONE"

        # NNI and the project's storage hold the same trials and numbers.
        jobs = _rest(port, "/trial-jobs")
        succeeded = {j["trialJobId"]: j for j in jobs if j["status"] == "SUCCEEDED"}
        assert len(succeeded) >= 2
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
        trials = study.get_trials()
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        complete = {t.user_attrs["nni"]["trial_job"]: t for t in trials if t.state == TrialState.COMPLETE}
        assert set(complete) == set(succeeded)
        periodical = [m for m in _rest(port, "/metric-data") if m["type"] == "PERIODICAL"]
        for job_id, job in succeeded.items():
            t, final = complete[job_id], _final(job)
            assert t.user_attrs["engine"] == "nni"
            assert final["default"] == pytest.approx(t.user_attrs["reward"])
            assert final["map50_95"] == pytest.approx(t.values[0])
            assert final["latency_ms.cpu"] == pytest.approx(t.values[1])
            assert {"flops_reduction", "params_reduction", "map50_95_drop", "feasible"} <= set(final)
            params = json.loads(job["hyperParameters"][0])["parameters"]
            assert t.params["ratio.backbone.p4"] == pytest.approx(params["ratio.backbone.p4"])
            curve = [json.loads(json.loads(m["data"])) for m in periodical if m["trialJobId"] == job_id]
            assert curve == pytest.approx([e["map50_95"] for e in t.user_attrs["epochs"]]) and len(curve) == 2
        proc = _cli(nni_env, "results", str(cfg_path))
        assert proc.returncode == 0 and f"{len(complete)} complete" in proc.stdout, proc.stdout + proc.stderr

        # The dashboard, in a browser: trial rows, their status, every metric name.
        with browser_page() as (page, _errors):
            page.goto(f"http://127.0.0.1:{port}/detail", wait_until="networkidle")
            page.get_by_text("SUCCEEDED").first.wait_for(timeout=30_000)
            text = page.inner_text("body")
            assert all(job_id in text for job_id in succeeded), text[:2000]
            page.get_by_text("default", exact=True).first.click()
            options = page.get_by_role("option").all_inner_texts()
            assert {"default", "map50_95", "latency_ms.cpu", "flops_reduction", "feasible"} <= set(options), options
            page.get_by_role("option", name="map50_95", exact=True).click()
            page.screenshot(path=str(tmp_path / "nni-detail.png"), full_page=True)
            page.goto(f"http://127.0.0.1:{port}/oview", wait_until="networkidle")
            page.get_by_text("DONE", exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "nni-overview.png"), full_page=True)
        assert (tmp_path / "nni-detail.png").stat().st_size > 10_000

        # A finished experiment can be viewed again after its manager stopped.
        assert _cli(nni_env, "nni", str(cfg_path), "--stop").returncode == 0
        proc = _cli(nni_env, "nni", str(cfg_path), "--view", "--port", str(port))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(_rest(port, "/trial-jobs")) == len(jobs)
    finally:
        _cli(nni_env, "nni", str(cfg_path), "--stop", timeout=120)
    assert not nni_engine._listening(port)


@pytest.mark.slow
def test_nni_failed_trials_show_failed_and_bad_input_is_clear(tmp_path, tiny_data, nni_env):
    dead = _free_port()  # nothing listens there: every trial's latency measurement fails
    target = {"name": "jetson", "backend": "remote", "url": f"http://127.0.0.1:{dead}", "timeout_s": 5}
    cfg_path = _write_config(
        tmp_path,
        tiny_data,
        "nni-fail",
        targets=[target],
        objectives=[{"metric": "map50_95", "direction": "maximize"}],
        budget={"trials": 2},
        engine={"nni": {"tuner": "random"}, "seed": 0},
    )
    cfg = load_config(cfg_path)
    port = _free_port()

    missing = _cli(nni_env, "nni", str(cfg_path), "--view", "--id", "nope-123")
    assert missing.returncode == 2 and "no NNI experiment with id 'nope-123'" in missing.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        taken = _cli(nni_env, "nni", str(cfg_path), "--port", str(port))
    assert taken.returncode == 2 and f"port {port} is in use" in taken.stderr, taken.stderr[-2000:]

    try:
        proc = _cli(nni_env, "nni", str(cfg_path), "--port", str(port))
        assert proc.returncode == 0, proc.stderr[-4000:]
        again = _cli(nni_env, "nni", str(cfg_path), "--port", str(port + 2))
        assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
        _wait("the experiment to finish", lambda: _done(port))
        jobs = _rest(port, "/trial-jobs")
        assert [j["status"] for j in jobs] == ["FAILED", "FAILED"]  # the experiment went on after the first
        failed = [t for t in optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).trials]
        assert [t.state for t in failed] == [TrialState.FAIL, TrialState.FAIL]
        assert all(f"127.0.0.1:{dead}" in t.user_attrs["error"] for t in failed), [t.user_attrs for t in failed]
        with browser_page() as (page, _errors):
            page.goto(f"http://127.0.0.1:{port}/detail", wait_until="networkidle")
            page.get_by_text("FAILED").first.wait_for(timeout=30_000)
            assert page.inner_text("body").count("FAILED") >= 2
    finally:
        _cli(nni_env, "nni", str(cfg_path), "--stop", timeout=120)
