"""optuna-dashboard on an experiment's study: objectives named after the config's metrics, constraints listed in the
study note and read by the dashboard (feasible or not), and ``yoloprune dashboard`` in headless Chromium."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import optuna
import pytest
import yaml

from tests.browser import browser_page
from yoloprune.cli import main
from yoloprune.config import ExperimentConfig, config_from_dict
from yoloprune.errors import BackendUnavailableError
from yoloprune.search.optuna_engine import open_study
from yoloprune.storage.optuna_adapter import dashboard_storage, load_study, write_record
from yoloprune.storage.record import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)
dashboard = pytest.importorskip("yoloprune.search.dashboard")
pytest.importorskip("optuna_dashboard", reason="the dashboard extra is not installed (pip install -e '.[dashboard]')")

CLI = [sys.executable, "-m", "yoloprune.cli"]
#: (ratio, mAP50-95, GFLOPs): the last violates the accuracy constraint, the first the FLOPs one.
TRIALS = [(0.1, 0.50, 7.4), (0.3, 0.47, 5.6), (0.5, 0.43, 4.1), (0.7, 0.30, 2.6)]
BASE_MAP, BASE_GFLOPS = 0.52, 8.2


def _config(tmp_path: Path, name: str = "dash") -> tuple[ExperimentConfig, Path]:
    raw = {
        "name": name, "model": "yolov8n.yaml", "data": "d.yaml", "imgsz": 128,
        "space": {"ratios": {"neck": {"low": 0.1, "high": 0.7}}},
        "objectives": [{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}],
        "constraints": [{"metric": "map50_95_drop", "max": 0.2}, {"metric": "flops_reduction", "min": 0.2}],
        "output": str(tmp_path / name),
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    return config, path


def _search(config: ExperimentConfig) -> optuna.Study:
    """A finished study as a search writes it: records, constraint violations, values."""
    study = open_study(config)
    for ratio, map50_95, gflops in TRIALS:
        study.enqueue_trial({"ratio.neck": ratio})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Heartbeat of storage")  # a search asks inside optimize()
            trial = study.ask()
        trial.suggest_float("ratio.neck", 0.1, 0.7)
        metrics = {"map50_95": map50_95, "gflops": gflops, "map50_95_drop": 1 - map50_95 / BASE_MAP,
                   "flops_reduction": 1 - gflops / BASE_GFLOPS}  # fmt: skip
        violations = [c.violation(metrics) for c in config.constraints]
        feasible = all(v <= 0 for v in violations)
        write_record(trial, TrialRecord(metrics=metrics, feasible=feasible, reward=map50_95), violations)
        study.tell(trial, [map50_95, gflops])
    return study


# --- units --------------------------------------------------------------------------------------------


def test_a_study_names_its_objectives_after_the_config(tmp_path):
    config, _ = _config(tmp_path)
    assert open_study(config).metric_names == ["map50_95", "gflops"]
    # A study created before the names were set gets them when it is next opened.
    old, _ = _config(tmp_path, "old")
    optuna.create_study(study_name="old", storage=old.storage_url, directions=["maximize", "minimize"])
    assert load_study(old).metric_names == ["map50_95", "gflops"]
    assert optuna.load_study(study_name="old", storage=old.storage_url).metric_names == ["map50_95", "gflops"]


def test_the_dashboard_reads_the_named_constraints_in_order(tmp_path):
    config, _ = _config(tmp_path)
    _search(config)
    stored = optuna.load_study(study_name=config.name, storage=config.storage_url).trials
    assert "constraints" not in stored[0].system_attrs  # stored as Optuna 5 names them: constraints:c0, c1
    storage = dashboard_storage(config.storage_url)
    read = storage.get_all_trials(storage.get_study_id_from_name(config.name))
    lists = [t.system_attrs["constraints"] for t in read]
    assert [[v > 0 for v in c] for c in lists] == [[False, True], [False, False], [False, False], [True, False]]
    assert lists[3][0] == pytest.approx(1 - 0.30 / BASE_MAP - 0.2)
    assert not any(k.startswith("constraints:") for t in read for k in t.system_attrs)
    assert [v > 0 for v in read[0].constraints.values()] == [False, True]  # Optuna reads the list form too
    # Stored trials are unchanged.
    again = optuna.load_study(study_name=config.name, storage=config.storage_url).trials
    assert [t.system_attrs for t in again] == [t.system_attrs for t in stored]


def test_the_note_lists_objectives_and_constraints_and_keeps_a_users_note(tmp_path):
    from optuna_dashboard import get_note, save_note

    config, _ = _config(tmp_path)
    _search(config)
    study = dashboard.prepare_study(config)
    note = get_note(study)
    assert note == dashboard.note_text(config)
    assert "| c0 | `map50_95_drop <= 0.2` |" in note and "| c1 | `flops_reduction >= 0.2` |" in note
    assert "| 1 | `gflops` | minimize |" in note
    save_note(study, "my own notes")
    assert get_note(dashboard.prepare_study(config)) == "my own notes"


def test_no_study_or_no_extra_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _, path = _config(tmp_path, "never-run")
    assert main(["dashboard", str(path), "--port", "0"]) == 2
    assert "Run `yoloprune search CONFIG` first" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install -e '\.\[dashboard\]'"):
        dashboard.prepare_study(_config(tmp_path, "other")[0])


# --- the server in a browser --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited with {proc.returncode}: {proc.communicate()[1][-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {url}")


@pytest.mark.slow  # about 12 s: a server and a browser
def test_yoloprune_dashboard_shows_the_trials_and_metric_names_in_a_browser(tmp_path):
    config, path = _config(tmp_path)
    _search(config)
    port = _free_port()
    proc = subprocess.Popen(
        [*CLI, "dashboard", str(path), "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert f"http://127.0.0.1:{port}/dashboard/studies/" in line, line
        url = line.split()[3]
        _wait_http(f"http://127.0.0.1:{port}/api/studies", proc)
        with browser_page() as (page, errors):
            page.goto(url, wait_until="networkidle")
            page.get_by_text("Infeasible", exact=True).first.wait_for(timeout=30_000)  # the timeline's legend
            text = page.inner_text("body")
            assert "map50_95" in text and "gflops" in text and "Objective 0" not in text, text[:3000]
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            page.goto(f"{url}/trials", wait_until="networkidle")
            page.get_by_text(f"{len(TRIALS)} Trials").wait_for(timeout=30_000)
            text = page.inner_text("body")
            assert all(f"Trial {i}" in text for i in range(len(TRIALS))) and "feasible" in text, text[:3000]
            page.goto(f"{url}/note", wait_until="networkidle")
            page.get_by_text("flops_reduction >= 0.2").wait_for(timeout=30_000)
            assert "map50_95_drop <= 0.2" in page.inner_text("body")
            assert errors == [], errors
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(30)
