"""The ``yoloprune`` CLI: tables, pruning, the dataset command, and clean errors (exit code 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from yoloprune.cli import main


def test_stages_prints_every_stage(capsys):
    assert main(["stages", "yolo11n.yaml", "--imgsz", "320"]) == 0
    out = capsys.readouterr().out
    for name in ("backbone.p1", "backbone.p3", "backbone.p5", "neck", "head", "C2PSA", "flops_%"):
        assert name in out


def test_prune_uniform_and_per_stage(tmp_path, capsys):
    out = tmp_path / "u.pt"
    assert main(["prune", "yolov8n.yaml", "--uniform", "0.3", "--round-to", "8", "-o", str(out)]) == 0
    assert out.exists() and "GFLOPs" in capsys.readouterr().out
    out2 = tmp_path / "s.pt"
    assert main(["prune", str(out), "--ratio", "neck=0.5", "--ratio", "backbone.p5=0.2", "-o", str(out2)]) == 0
    assert out2.stat().st_size < out.stat().st_size


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "yolov8n.yaml", "--ratio", "bogus=0.3", "-o", "x.pt"], "unknown stage 'bogus'"),
        (["prune", "yolov8n.yaml", "--ratio", "neck", "-o", "x.pt"], "not STAGE=RATIO"),
        (["prune", "yolov8n.yaml", "--uniform", "0.97", "-o", "x.pt"], "outside [0, 0.95)"),
        (["prune", "yolov8n.yaml", "-o", "x.pt"], "no ratios"),
        (["stages", "missing.pt"], "does not exist"),
        (["stages", "yolov8n-cls.yaml"], "detection models only"),
        (["latency", "yolov8n.yaml", "--backend", "torch", "--precision", "int8"], "the torch backend has no int8"),
        (["latency", "yolov8n.yaml", "--backend", "onnxrt"], "Did you mean 'onnxruntime'"),
        (["latency", "yolov8n.yaml", "--backend", "remote"], "give its agent's url"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_latency_command_times_models_against_the_first(tmp_path):
    pruned = tmp_path / "p.pt"
    assert main(["prune", "yolov8n.yaml", "--uniform", "0.5", "--round-to", "8", "-o", str(pruned)]) == 0
    proc = subprocess.run(
        [sys.executable, "-m", "yoloprune.cli", "latency", "yolov8n.yaml", str(pruned), "--imgsz", "96",
         "--precision", "int8", "--threads", "1", "--repeats", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "onnxruntime on cpu, int8, batch 1, 96 px (2 interleaved repeat(s), every run of a model pooled" in proc.stdout
    )
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
    assert float(rows["yolov8n.yaml"][-1]) == 1.0 and 0 < float(rows[str(pruned)][-1]) < 2
    for _, median, p90, p99, _cv, runs, _ratio in (row[1:] for row in rows.values()):
        # percentiles of one pool of runs (both repeats'), so ordered; the default spec times >= 20 runs each
        assert float(median) <= float(p90) <= float(p99) and int(runs) >= 40


def test_dataset_command(tmp_path):
    assert main(["dataset", str(tmp_path / "ds"), "--train", "4", "--val", "2", "--imgsz", "64"]) == 0
    assert len(list((tmp_path / "ds" / "images" / "train").glob("*.jpg"))) == 4


@pytest.mark.slow
def test_real_cli_prune_finetune_val(tmp_path, tiny_data):
    exe = [sys.executable, "-m", "yoloprune.cli"]
    run = lambda *a: subprocess.run([*exe, *a], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # noqa: E731
    # A 6-class model for this dataset, then prune, fine-tune and validate through the real CLI.
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector

    save_checkpoint(load_detector("yolov5nu.yaml", nc=6), tmp_path / "base.pt")
    assert run("prune", "base.pt", "--uniform", "0.4", "-o", "p.pt").returncode == 0
    p = run(
        "finetune",
        "p.pt",
        "--data",
        str(tiny_data),
        "--epochs",
        "1",
        "--imgsz",
        "128",
        "-o",
        "t.pt",
        "--device",
        "cpu",
        "--project",
        str(tmp_path / "runs"),
        "--teacher",
        "base.pt",
    )
    assert p.returncode == 0, p.stderr[-3000:]
    from yoloprune.ultra.checkpoint import read_metadata

    assert read_metadata(tmp_path / "t.pt")["finetune"]["distill"] == 6.0  # distilled from the base
    p = run("val", "t.pt", "--data", str(tiny_data), "--imgsz", "128", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mAP50-95" in p.stdout and "cross" in p.stdout
