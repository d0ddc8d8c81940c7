"""No network: the real CLI trains a base model, searches, fine-tunes, validates and saves
(``yoloprune demo --quick``, the reduced demo CI runs end to end), and plain Ultralytics exports a trial's
checkpoint to ONNX, in a process where every network touch is recorded and refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def _guarded_run(code: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = tmp_path / "netguard.json"
    env = {**env, "NETGUARD_LOG": str(log), "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(
        [sys.executable, "-c", "import _netguard\n" + code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, json.loads(log.read_text()) if log.exists() else ["netguard log missing"]


def test_guard_catches_a_connection(tmp_path):
    proc, attempts = _guarded_run(
        "import urllib.request\ntry:\n urllib.request.urlopen('http://example.com', timeout=2)\nexcept Exception: pass",
        tmp_path,
        dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert any("example.com" in a for a in attempts)


def test_train_val_export_touch_no_network(tmp_path, home):
    code = (
        "import sys\n"
        "from yoloprune.cli import main\n"
        f"assert main(['demo', '--quick', '--output', {str(tmp_path / 'demo')!r}, '--device', 'cpu']) == 0\n"
        "from ultralytics import YOLO\n"
        f"YOLO({str(tmp_path / 'demo' / 'trials' / 'trial_0000.pt')!r}).export(format='onnx', imgsz=128)\n"
    )
    env = {**os.environ, "YOLOPRUNE_HOME": str(home)}
    proc, attempts = _guarded_run(code, tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert attempts == [], attempts
    assert (tmp_path / "demo" / "trials" / "trial_0000.onnx").exists()
    with open(tmp_path / "demo" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete"] * 3
    assert rows[0]["method"] == "uniform" and float(rows[1]["screen_rank"]) == 1  # the screening's best, then TPE
    # The demo's final screen: the baseline, searched against uniform at the same cost, the files, what next.
    screen = proc.stdout[proc.stdout.index("==== yoloprune demo: finished") :]
    assert "baseline   builtin:demo-base: mAP50-95" in screen and "latency" in screen
    assert "at flops_reduction 0.5: after the 1-epoch proxy, and after 2 epochs as the export fine-tunes" in screen
    assert "(constraints: map50_95_drop <= 0.05)" in screen
    assert "searched   trial " in screen and "uniform    trial 0 (ratio " in screen and "(measured)" in screen
    assert "uniform pruning at the same cost by" in screen and "after 2 epochs" in screen
    assert "like with like: the unpruned base fine-tuned the same 2 epochs reaches" in screen
    assert "drop against it: searched " in screen and ", uniform " in screen
    for part in ("report.html", "study.db", "checkpoints", "yoloprune results", "yoloprune report", "yoloprune nni"):
        assert part in screen, part
    assert "yoloprune export" in screen and "--epochs 2" in screen
    assert (tmp_path / "demo" / "report.html").exists()
