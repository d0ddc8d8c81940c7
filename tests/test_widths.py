"""The cost model predicts exactly the params and FLOPs that pruning for real gives, without pruning."""

from __future__ import annotations

import random

import pytest

from yoloprune.pruning import find_stages, kept_width
from yoloprune.pruning.widths import CostModel
from yoloprune.ultra.models import load_detector


@pytest.fixture(scope="module", params=["yolov5nu.yaml", "yolov8n.yaml", "yolo11n.yaml"])
def model(request):
    return load_detector(request.param, nc=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cost_model_matches_real_pruning(model, seed):
    costs = CostModel(model, 160)
    assert costs.exact_without_pruning
    rng = random.Random(seed)
    stages = [s.name for s in find_stages(model) if s.prunable]
    ratios = {s: rng.uniform(0.0, 0.7) for s in stages}
    if seed == 1:
        ratios["head"] = 0.4
    round_to = (1, 8)[seed]
    predicted, real = costs.verify(ratios, round_to)
    assert predicted.params == real.params
    assert predicted.gflops == pytest.approx(real.gflops, rel=1e-9)
    assert 0 < predicted.flops_reduction < 1


def test_unsupported_architecture_is_costed_by_pruning():
    v6 = load_detector("yolov6n.yaml", nc=3)
    costs = CostModel(v6, 128)
    assert not costs.exact_without_pruning
    predicted, real = costs.verify({"neck": 0.3}, 8)
    assert predicted == real


@pytest.mark.parametrize(
    ("channels", "ratio", "round_to", "kept"),
    [(32, 0.25, 8, 24), (32, 0.2500488, 8, 24), (32, 0.36, 8, 24), (32, 0.38, 8, 16), (16, 0.9, 8, 8),
     (8, 0.5, 8, 8), (64, 0.0, 8, 64), (10, 0.26, 1, 7), (3, 0.9, 1, 1)],
)  # fmt: skip
def test_kept_width_rounds_to_the_nearest_multiple(channels, ratio, round_to, kept):
    assert kept_width(channels, ratio, round_to) == kept
