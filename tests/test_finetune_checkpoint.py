"""Fine-tuning keeps the pruned architecture; saved checkpoints load, validate and export with plain
Ultralytics in a fresh process that never imports yoloprune."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tests.conftest import MODELS
from yoloprune.errors import EvaluatorError
from yoloprune.pruning import count_params, prune
from yoloprune.ultra.checkpoint import read_metadata, save_checkpoint
from yoloprune.ultra.models import load_detector
from yoloprune.ultra.train import finetune
from yoloprune.ultra.val import recalibrate_bn, validate

pytestmark = pytest.mark.slow

RATIOS = {"backbone.p3": 0.4, "backbone.p5": 0.3, "neck": 0.5}


@pytest.fixture(scope="module")
def tuned(tiny_data, tmp_path_factory):
    """Each model pruned, fine-tuned for 2 epochs and saved: {cfg: (pruned, result, path)}."""
    out = tmp_path_factory.mktemp("tuned")
    results = {}
    for cfg in MODELS:
        pruned = prune(load_detector(cfg, nc=6), RATIOS, round_to=8)
        epochs_seen = []
        result = finetune(
            pruned,
            tiny_data,
            epochs=2,
            imgsz=128,
            batch=8,
            project=out,
            name=cfg.split(".")[0],
            on_epoch=lambda e, m, seen=epochs_seen: seen.append((e, m)),
        )
        assert [e for e, _ in epochs_seen] == [0, 1]
        path = save_checkpoint(
            result.model,
            out / f"{cfg.split('.')[0]}-pruned.pt",
            train_args={"data": str(tiny_data), "imgsz": 128},
            metadata={"ratios": RATIOS, "round_to": 8},
        )
        results[cfg] = (pruned, result, path)
    return results


@pytest.mark.parametrize("cfg", MODELS)
def test_finetune_keeps_the_pruned_architecture(tuned, cfg):
    pruned, result, _ = tuned[cfg]
    assert count_params(result.model) == count_params(pruned)
    assert count_params(result.model) < 0.8 * count_params(load_detector(cfg, nc=6))
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert widths(result.model) == widths(pruned)
    assert len(result.epochs) == 2 and all(0.0 <= e["map50_95"] <= 1.0 for e in result.epochs)
    # The weights did train: they differ from the pruned starting point.
    a = dict(pruned.state_dict())
    assert any(
        not torch.allclose(a[k].float(), v.float())
        for k, v in result.model.state_dict().items()
        if k in a and v.is_floating_point()
    )


def test_saved_checkpoints_load_in_plain_ultralytics(tuned, tiny_data, plain_env, tmp_path):
    paths = {cfg: str(path) for cfg, (_, _, path) in tuned.items()}
    assert read_metadata(paths["yolov8n.yaml"])["ratios"] == RATIOS
    script = textwrap.dedent(
        f"""
        import json, sys
        from ultralytics import YOLO
        from ultralytics.nn.tasks import torch_safe_load
        out = {{}}
        for cfg, path in {paths!r}.items():
            model = YOLO(path)
            metrics = model.val(data={str(tiny_data)!r}, imgsz=128, batch=8, plots=False, verbose=False)
            ckpt, _ = torch_safe_load(path, safe_only=True)  # allow-list of stock classes only
            out[cfg] = {{"map50_95": float(metrics.box.map), "params": sum(p.numel() for p in model.model.parameters()),
                         "safe_load": ckpt["model"] is not None}}
        onnx = YOLO({paths["yolov8n.yaml"]!r}).export(format="onnx", imgsz=128)
        out["onnx"] = str(onnx)
        out["imported"] = sorted(m for m in sys.modules if m == "yoloprune" or m.startswith("yoloprune."))
        print("RESULT" + json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=plain_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["imported"] == []
    for cfg, (_, result, _) in tuned.items():
        assert out[cfg]["params"] == count_params(result.model)
        assert out[cfg]["safe_load"]
        assert 0.0 <= out[cfg]["map50_95"] <= 1.0
    assert out["onnx"].endswith(".onnx")


def test_validate_reports_every_class(tuned, tiny_data):
    _, result, _ = tuned["yolov8n.yaml"]
    val = validate(result.model, tiny_data, imgsz=128, batch=8)
    assert sorted(val.per_class) == list(range(6))
    assert all(c.name for c in val.per_class.values())
    assert 0.0 <= val.map50_95 <= val.map50 <= 1.0


def test_distillation_from_the_base_trains_only_the_student_and_resumes(tiny_data, tmp_path):
    """Ultralytics' DistillationModel wraps the pruned student; the result is the student alone, and an
    interrupted distilled fine-tune resumes (projector and all) from its last epoch."""
    import csv

    base = load_detector("yolov8n.yaml", nc=6)
    pruned = prune(base, RATIOS, round_to=8)

    class Interrupted(Exception):
        pass

    def interrupt(epoch, _metrics):
        if epoch == 1:
            raise Interrupted

    run = dict(epochs=3, imgsz=128, batch=8, project=tmp_path, name="kd", teacher=base, distill=6.0)
    with pytest.raises(Interrupted):
        finetune(pruned, tiny_data, on_epoch=interrupt, **run)
    rows = list(csv.DictReader((tmp_path / "kd" / "results.csv").open()))
    assert len(rows) == 2 and all(float(r["train/dis_loss"]) > 0 for r in rows)  # the teacher's loss was on
    result = finetune(pruned, tiny_data, resume=True, **run)
    assert result.resumed_from == 2 and len(result.epochs) == 1
    assert type(result.model).__name__ == "DetectionModel" and count_params(result.model) == count_params(pruned)
    assert count_params(base) == count_params(load_detector("yolov8n.yaml", nc=6))  # the teacher was not touched

    with pytest.raises(EvaluatorError, match=r"teacher checkpoint .* does not exist"):
        finetune(pruned, tiny_data, **{**run, "teacher": tmp_path / "none.pt", "name": "kd2"})


def test_bn_recalibration_matches_batch_statistics(tiny_data):
    model = prune(load_detector("yolov8n.yaml", nc=6), {"neck": 0.5})
    bn = model.model[0].bn
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(100.0)
    seen = []
    hook = model.model[0].conv.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    recalibrate_bn(model, tiny_data, imgsz=128, batches=3, batch=8)
    hook.remove()
    assert len(seen) == 3  # 24 training images in batches of 8
    batch_means = torch.stack([s.mean(dim=(0, 2, 3)) for s in seen])
    assert torch.allclose(bn.running_mean, batch_means.mean(0), atol=1e-4)
    assert bn.momentum == 0.03 or bn.momentum == pytest.approx(0.03)  # restored (Ultralytics' value)


def test_mosaic_override_reaches_the_trainer_and_short_runs_close_mosaic(tiny_data, tmp_path):
    """``finetune(..., mosaic=0.0)`` reaches the trainer (its saved args say so). A run no longer than
    ``close_mosaic`` (10) epochs has Ultralytics close mosaic from epoch 0, so the proxy never trains on
    mosaics either way; with ``close_mosaic=0`` mosaic stays on and the same seed gives other losses."""
    import csv

    import yaml

    def run(name, **overrides):
        model = prune(load_detector("yolov8n.yaml", nc=6), RATIOS, round_to=8)
        finetune(model, tiny_data, epochs=1, imgsz=128, batch=8, project=tmp_path, name=name, val=False, **overrides)
        row = next(csv.DictReader((tmp_path / name / "results.csv").open()))
        args = yaml.safe_load((tmp_path / name / "args.yaml").read_text())
        return [float(row[k]) for k in ("train/box_loss", "train/cls_loss", "train/dfl_loss")], args

    default, args = run("default")
    _, no_mosaic = run("no_mosaic", mosaic=0.0)
    assert args["mosaic"] == 1.0 and args["close_mosaic"] == 10 and no_mosaic["mosaic"] == 0.0
    kept, _ = run("mosaic_kept", close_mosaic=0)
    assert kept != default
