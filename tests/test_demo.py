"""The demo's shipped base: its SHA-256 is checked at every load, and a corrupt or changed file is a clear
error naming the file and how to restore or rebuild it, never a silent retraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from yoloprune.cli import main
from yoloprune.experiment import builtin
from yoloprune.experiment.builtin import DemoBaseError, shipped_base
from yoloprune.storage.db import file_sha256


def test_shipped_base_matches_its_record():
    path = shipped_base()  # raises if the file differs from SHIPPED_BASE_SHA256
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["sha256"] == builtin.SHIPPED_BASE_SHA256 == file_sha256(path)
    assert record["command"] == "yoloprune demo --train-base" and record["epochs"] == builtin.DEMO.base_epochs
    assert record["dataset"] == vars(builtin.DEMO.dataset)
    assert record["last_10_epochs_added"] < 0.02  # converged: more epochs add less than 2% mAP50-95
    assert path.stat().st_size < 8 * 2**20


def test_tampered_or_missing_base_is_a_clear_error(tmp_path):
    copy = tmp_path / "demo_base.pt"
    shutil.copy(builtin.SHIPPED_BASE, copy)
    with open(copy, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DemoBaseError, match=r"demo_base\.pt has SHA-256 .* corrupt or was changed") as err:
        shipped_base(copy)
    assert "git checkout -- yoloprune/assets/demo_base.pt" in str(err.value)
    assert "yoloprune demo --train-base" in str(err.value)
    with pytest.raises(DemoBaseError, match="is missing"):
        shipped_base(tmp_path / "nothing.pt")


def test_demo_refuses_a_changed_base_without_retraining(tmp_path, monkeypatch, capsys, home):
    copy = tmp_path / "demo_base.pt"
    copy.write_bytes(builtin.SHIPPED_BASE.read_bytes()[:-10])  # truncated
    monkeypatch.setattr(builtin, "SHIPPED_BASE", copy)
    before = set((Path(home) / "base-models").glob("*.pt")) if (Path(home) / "base-models").exists() else set()
    assert main(["demo", "--quick", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the shipped demo base {copy} has SHA-256" in err and "yoloprune demo --train-base" in err
    after = set((Path(home) / "base-models").glob("*.pt")) if (Path(home) / "base-models").exists() else set()
    assert after == before  # nothing was trained in its place
