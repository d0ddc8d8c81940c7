"""Bad input gets one clear error naming the value and what is valid; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from yoloprune.errors import DatasetError, ModelError, SearchSpaceError
from yoloprune.pruning import prune
from yoloprune.ultra.models import load_detector


@pytest.fixture(scope="module")
def v8n():
    return load_detector("yolov8n.yaml", nc=6)


def test_unknown_stage_lists_valid_ones(v8n):
    with pytest.raises(SearchSpaceError) as e:
        prune(v8n, {"backbone.p9": 0.3})
    msg = str(e.value)
    assert "backbone.p9" in msg and "backbone.p3" in msg and "neck" in msg


def test_near_miss_stage_suggests_the_close_name(v8n):
    with pytest.raises(SearchSpaceError, match=r"Did you mean 'backbone.p3'"):
        prune(v8n, {"backbone.3": 0.3})


def test_head_with_one_to_one_branches_is_refused():
    with pytest.raises(SearchSpaceError, match="one-to-one branches"):
        prune(load_detector("yolo26n.yaml", nc=3), {"head": 0.3})


@pytest.mark.parametrize("ratio", [-0.1, 0.95, 1.0, "0.3", True])
def test_ratio_outside_range(v8n, ratio):
    with pytest.raises(SearchSpaceError, match=r"outside \[0, 0.95\)"):
        prune(v8n, {"neck": ratio})


def test_unknown_importance_and_bad_round_to(v8n):
    with pytest.raises(SearchSpaceError, match="Known: l1, l2, bn_scale, random"):
        prune(v8n, {"neck": 0.3}, importance="l3")
    with pytest.raises(SearchSpaceError, match="round_to"):
        prune(v8n, {"neck": 0.3}, round_to=0)


def test_failed_prune_leaves_model_untouched(v8n):
    before = {k: v.clone() for k, v in v8n.state_dict().items()}
    with pytest.raises(SearchSpaceError):
        prune(v8n, {"neck": 0.3, "bogus": 0.2}, inplace=True)
    after = v8n.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match=r"does not exist.*never downloads"):
        load_detector(tmp_path / "nope.pt")


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ModelError, match="not a YOLO checkpoint"):
        load_detector(bad)


def test_checkpoint_without_model(tmp_path):
    import torch

    bad = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ModelError, match="'model' or 'ema'"):
        load_detector(bad)


@pytest.mark.parametrize("cfg", ["yolov8n-seg.yaml", "yolov8n-cls.yaml", "yolo11n-pose.yaml"])
def test_non_detection_models_are_refused(cfg):
    with pytest.raises(ModelError, match="detection models only"):
        load_detector(cfg)


def test_non_detection_module_is_refused():
    from ultralytics.nn.tasks import SegmentationModel

    with pytest.raises(ModelError, match="'segment' model"):
        load_detector(SegmentationModel("yolov8n-seg.yaml", verbose=False))


def test_unknown_yaml_and_unknown_suffix():
    with pytest.raises(ModelError, match="found neither on disk"):
        load_detector("yolov99z.yaml")
    with pytest.raises(ModelError, match=r"neither a .pt checkpoint nor a model YAML"):
        load_detector("model.onnx")


def test_dataset_errors(tmp_path, tiny_data):
    from yoloprune.data import inspect_dataset

    with pytest.raises(DatasetError, match="does not exist"):
        inspect_dataset(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: images/train\nnames: [a]\n")
    with pytest.raises(DatasetError, match="lacks val"):
        inspect_dataset(bad)
    bad.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(DatasetError, match=r"train path .* does not exist"):
        inspect_dataset(bad)
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "images" / "train" / "a.jpg").write_bytes(
        Path(tiny_data).parent.joinpath("images", "train", "train_00000.jpg").read_bytes()
    )
    with pytest.raises(DatasetError, match="val split holds no images"):
        inspect_dataset(bad)


def test_class_count_mismatch(tiny_data):
    from yoloprune.ultra.val import validate

    with pytest.raises(DatasetError, match=r"predicts 80 classes .* has 6"):
        validate(load_detector("yolov8n.yaml"), tiny_data, imgsz=64)
