"""Stages derived from YOLOv5u, YOLOv8 and YOLO11 at n/s/m, and the ``stages`` table."""

from __future__ import annotations

import pytest

from yoloprune.pruning import find_stages
from yoloprune.pruning.report import stage_table
from yoloprune.ultra.models import load_detector

EXPECTED = {  # layer indices per stage, read off the Ultralytics YAMLs
    "yolov5": {"backbone.p5": (7, 8, 9), "neck": tuple(range(10, 24)), "head": (24,)},
    "yolov8": {"backbone.p5": (7, 8, 9), "neck": tuple(range(10, 22)), "head": (22,)},
    "yolo11": {"backbone.p5": (7, 8, 9, 10), "neck": tuple(range(11, 23)), "head": (23,)},
}
FAMILY_YAML = {"yolov5": "yolov5{}u.yaml", "yolov8": "yolov8{}.yaml", "yolo11": "yolo11{}.yaml"}


@pytest.mark.parametrize("size", ["n", "s", "m"])
@pytest.mark.parametrize("family", ["yolov5", "yolov8", "yolo11"])
def test_stages_of_supported_families(family, size):
    model = load_detector(FAMILY_YAML[family].format(size))
    stages = {s.name: s for s in find_stages(model)}
    assert list(stages) == [
        "backbone.p1",
        "backbone.p2",
        "backbone.p3",
        "backbone.p4",
        "backbone.p5",
        "neck",
        "head",
    ]
    assert stages["backbone.p1"].layers == (0,)
    assert stages["backbone.p2"].layers == (1, 2)
    assert stages["backbone.p3"].layers == (3, 4)
    assert stages["backbone.p4"].layers == (5, 6)
    for name, layers in EXPECTED[family].items():
        assert stages[name].layers == layers
    assert not stages["head"].prunable and stages["head"].opt_in
    assert all(s.prunable for n, s in stages.items() if n != "head")
    covered = sorted(i for s in stages.values() for i in s.layers)
    assert covered == list(range(len(model.model)))


def test_stage_table_shares_add_up():
    table = stage_table(load_detector("yolov8n.yaml"), imgsz=320)
    assert table["params_%"].sum() == pytest.approx(100, abs=0.5)
    assert table["flops_%"].sum() == pytest.approx(100, abs=0.5)
    assert table.loc[table.stage == "backbone.p3", "out_channels"].item() == "64 64"  # yolov8n: Conv 64, C2f 64
    assert table.loc[table.stage == "head", "prunable"].item() == "opt-in"
