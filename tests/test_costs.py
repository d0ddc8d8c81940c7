"""One cost counter for base and pruned models, checked against Ultralytics' published figures."""

from __future__ import annotations

import pytest

from yoloprune.pruning import count_flops, count_params, flops_by_module, measure_costs, prune
from yoloprune.ultra.models import load_detector


@pytest.mark.parametrize(
    ("cfg", "params", "gflops"),
    [("yolov8n.yaml", 3_157_200, 8.7), ("yolov8s.yaml", 11_166_560, 28.6), ("yolo11n.yaml", 2_624_080, 6.5)],
)
def test_matches_ultralytics_published_numbers(cfg, params, gflops):
    model = load_detector(cfg)  # 80 classes, as published
    assert count_params(model) == params
    assert count_flops(model, 640) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_flops_scale_with_image_area_and_per_module_sums():
    model = load_detector("yolov8n.yaml", nc=6)
    f320, f640 = count_flops(model, 320), count_flops(model, 640)
    assert f640 / f320 == pytest.approx(4.0, rel=0.01)
    per = flops_by_module(model, 320)
    assert sum(v for k, v in per.items() if k.count(".") == 1 and k.startswith("model.")) == pytest.approx(per[""])


def test_pruned_costs_are_lower_and_size_follows_params():
    model = load_detector("yolov8n.yaml", nc=6)
    base = measure_costs(model, 320)
    pruned = measure_costs(prune(model, {"neck": 0.5, "backbone.p5": 0.5}), 320)
    assert pruned.params < base.params and pruned.gflops < base.gflops
    # fp16 checkpoint: ~2 bytes a parameter plus pickled structure
    assert base.size_mb == pytest.approx(2 * base.params / 1e6, rel=0.25)
    assert pruned.size_mb < base.size_mb
