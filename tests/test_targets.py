"""Landing allocations on a cost target: exact, within tolerance, for every method's family; clear errors for
targets the space cannot reach, tolerances the channel rounding makes impossible, and bad screening input."""

from __future__ import annotations

import random

import pytest

from yoloprune.config import config_from_dict
from yoloprune.errors import ConfigError
from yoloprune.registry import SEARCH_METHODS
from yoloprune.search.methods import MethodContext, get_method
from yoloprune.search.targeting import Targeting
from yoloprune.search.targets import Lander, LatencyModel, land_on_latency, uniform_family
from yoloprune.spaces import Candidate
from yoloprune.ultra.models import load_detector

STAGES = ("backbone.p2", "backbone.p3", "backbone.p4", "backbone.p5", "neck")


def _config(**changes):
    raw = {
        "name": "t",
        "model": "a.pt",
        "data": "d.yaml",
        "imgsz": 256,
        "space": {"ratios": {s: {"low": 0.05, "high": 0.6, "step": 0.05} for s in STAGES}, "round_to": 8},
        "cost_target": {"metric": "flops_reduction", "value": [0.3, 0.5], "tolerance": 0.01},
        **changes,
    }
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def v8n():
    return load_detector("yolov8n.yaml", nc=10)


@pytest.mark.parametrize("metric", ["flops_reduction", "params_reduction"])
def test_sampled_proposals_land_within_tolerance_and_the_count_is_exact(v8n, metric):
    config = _config(cost_target={"metric": metric, "value": [0.3, 0.5], "tolerance": 0.01})
    targeting = Targeting(config, v8n)
    rng = random.Random(0)
    for i in range(30):
        proposal = Candidate({s: rng.choice([0.05 * k for k in range(1, 13)]) for s in STAGES}, "l1", 8)
        value = (0.3, 0.5)[i % 2]
        landing = targeting.land("tpe", proposal, value)
        assert landing.on_target, (proposal, landing)
        assert all(0.05 - 1e-9 <= r <= 0.6 + 1e-9 for r in landing.ratios.values())
    _, real = targeting.costs.verify(landing.ratios, 8)
    achieved = real.flops_reduction if metric == "flops_reduction" else real.params_reduction
    assert achieved == pytest.approx(landing.achieved, abs=1e-9)


def test_uniform_lands_with_one_shared_ratio(v8n):
    targeting = Targeting(_config(), v8n)
    for landing in targeting.check():
        assert landing.on_target and len(set(landing.ratios.values())) == 1


def test_every_method_family_is_monotone_from_least_to_most_pruning(v8n):
    config = _config()
    targeting = Targeting(config, v8n)
    curves = {s: [(0.05, 0.01 * k), (0.6, 0.1 * (k + 1))] for k, s in enumerate(STAGES)}
    ctx = MethodContext(config.space, targeting.costs, 8, curves)
    proposal = dict.fromkeys(STAGES, 0.3)
    for name in SEARCH_METHODS.names():
        family = get_method(name).family(ctx, proposal)
        cuts = [targeting.lander.reduction(family(s / 10), 8) for s in range(11)]
        assert cuts == sorted(cuts), name
        assert family(0.0) == dict.fromkeys(STAGES, 0.05) and family(1.0) == dict.fromkeys(STAGES, 0.6), name


def test_sensitivity_family_prunes_robust_stages_harder(v8n):
    config = _config()
    targeting = Targeting(config, v8n)
    robust, fragile = "backbone.p5", "backbone.p3"
    curves = {s: [(0.05, 0.01), (0.6, 0.2)] for s in STAGES}
    curves[robust], curves[fragile] = [(0.05, 0.0), (0.6, 0.01)], [(0.05, 0.05), (0.6, 0.9)]
    targeting.curves = curves
    landing = targeting.land("sensitivity", Candidate(dict.fromkeys(STAGES, 0.3), "l1", 8), 0.3)
    assert landing.on_target
    assert landing.ratios[robust] > landing.ratios[fragile]


def test_unreachable_target_names_the_reachable_range(v8n):
    with pytest.raises(ConfigError, match=r"out of reach: this space reaches 0\.\d+ .* to 0\.\d+"):
        Targeting(_config(cost_target={"metric": "flops_reduction", "value": 0.9}), v8n).check()


def test_tolerance_finer_than_the_rounding_is_refused(v8n):
    space = {"ratios": {"backbone.p4": {"low": 0.1, "high": 0.6}}, "round_to": 32}
    config = _config(space=space, cost_target={"metric": "flops_reduction", "value": 0.05, "tolerance": 0.0001})
    with pytest.raises(ConfigError, match=r"round_to 32 makes the widths coarse. Raise the tolerance to at least"):
        Targeting(config, v8n).check()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"engine": {"sampler": "cma"}}, r"unknown search method 'cma'.*Known: tpe, cmaes"),
        ({"engine": {"screen": {"candidates": 4, "keep": 8}}}, r"keep \(8\) must not exceed candidates \(4\)"),
        ({"cost_target": {"metric": "latency_reduction.gpu", "value": 0.3}}, "names latency target 'gpu'"),
        ({"cost_target": {"metric": "flops_reduction", "value": 1.2}}, r"must lie in \(0, 1\)"),
        ({"cost_target": None, "engine": {"sampler": "uniform"}}, "needs a cost_target"),
    ],
)
def test_bad_cost_target_input(changes, message):
    with pytest.raises(ConfigError, match=message):
        _config(**changes)


def test_latency_landing_corrects_the_model_with_measurements():
    """A fake runtime whose latency is 0.2 + 0.8 x FLOPs ratio, and a model that starts at latency = FLOPs."""
    config = _config(space={"ratios": {"neck": {"low": 0.0, "high": 0.9}}})
    model = LatencyModel()
    costs = {"n": 0}

    def flops_reduction(ratios, round_to):  # a smooth stand-in for the cost model
        return 0.8 * ratios["neck"]

    lander = Lander(
        config.space, "latency_reduction.x", 0.01, lambda r, q: 1 - model.predict(1 - flops_reduction(r, q))
    )

    def measure(ratios, round_to):
        costs["n"] += 1
        real = 0.8 * (1 - flops_reduction(ratios, round_to)) + 0.2
        model.add(1 - flops_reduction(ratios, round_to), real)
        return 1 - real

    landing = land_on_latency(lander, uniform_family(config.space), 0.3, 1, measure=measure, max_measurements=4)
    assert landing.on_target and landing.measurements == costs["n"] and costs["n"] >= 2
