"""Relative metrics, constraints, the reward and the Pareto front."""

from __future__ import annotations

import numpy as np
import pytest

from yoloprune.config.objectives import Constraint, RewardConfig, pareto_mask, relative_metrics, reward, violations

BASE = {"map50": 0.8, "map50_95": 0.5, "params": 1000.0, "gflops": 8.0, "size_mb": 2.0}
DEFAULT = [Constraint(metric="map50_95_drop", max=0.02), Constraint(metric="flops_reduction", min=0.5)]


def test_relative_metrics():
    m = relative_metrics({"map50": 0.6, "map50_95": 0.49, "params": 400.0, "gflops": 3.0, "size_mb": 1.0}, BASE)
    assert m["map50_95_drop"] == pytest.approx(0.02) and m["map50_drop"] == pytest.approx(0.25)
    assert m["flops_reduction"] == pytest.approx(0.625) and m["params_reduction"] == pytest.approx(0.6)
    assert relative_metrics({"map50_95": 0.1}, {"map50_95": 0.0})["map50_95_drop"] == 0.0


def test_latency_metrics_are_relative_to_this_sessions_baseline():
    m = relative_metrics({"latency_ms.cpu": 6.0, "gflops": 4.0}, {**BASE, "latency_ms.cpu": 8.0})
    assert m["latency_ratio.cpu"] == pytest.approx(0.75) and m["latency_reduction.cpu"] == pytest.approx(0.25)
    assert Constraint(metric="latency_ratio.cpu", max=0.8).on_cost  # checked before any fine-tune


def test_violations_follow_optuna_sign_convention():
    ok = relative_metrics({"map50_95": 0.495, "gflops": 3.0}, BASE)
    bad = relative_metrics({"map50_95": 0.4, "gflops": 6.0}, BASE)
    assert all(v <= 0 for v in violations(ok, DEFAULT))
    v = violations(bad, DEFAULT)
    assert v[0] == pytest.approx(0.18) and v[1] == pytest.approx(0.25)


def test_reward_orders_trials_sensibly():
    cfg = RewardConfig()

    def r(map_, flops):
        return reward(relative_metrics({"map50_95": map_, "gflops": flops}, BASE), BASE, DEFAULT, cfg)

    assert r(0.5, 8.0) == pytest.approx(1.0 - 0.5)  # the baseline itself violates "FLOPs down 50%"
    assert r(0.495, 3.0) > r(0.495, 3.5) > 1.0  # feasible: fewer FLOPs, higher reward
    assert r(0.495, 3.0) > r(0.45, 3.0)  # same cost, better accuracy
    assert r(0.495, 3.0) > r(0.40, 3.0) + 0.15  # infeasible accuracy is penalised


def test_pareto_mask():
    values = np.array([[0.5, 3.0], [0.45, 2.0], [0.4, 2.5], [0.5, 3.5], [0.3, 1.0]])
    mask = pareto_mask(values, ["maximize", "minimize"])
    assert mask.tolist() == [True, True, False, False, True]
    assert pareto_mask(np.zeros((0, 2)), ["maximize", "minimize"]).tolist() == []
