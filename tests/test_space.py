"""The search space: sampling through Optuna, grids, stage checks, replay of stored parameters."""

from __future__ import annotations

import optuna
import pytest

from yoloprune.errors import SearchSpaceError
from yoloprune.spaces import RatioRange, SearchSpace

SPACE = SearchSpace.model_validate(
    {
        "ratios": {
            "backbone.p3": {"low": 0.2, "high": 0.6, "step": 0.05},
            "neck": {"low": 0.1, "high": 0.3},
            "backbone.p5": 0.4,
        },
        "importance": ["l1", "bn_scale"],
        "round_to": [1, 8],
    }
)


def test_suggest_uses_named_parameters_and_fixed_values():
    params = {"ratio.backbone.p3": 0.35, "ratio.neck": 0.2, "importance": "bn_scale", "round_to": 8}
    cand = SPACE.suggest(optuna.trial.FixedTrial(params))
    assert cand.ratios == {"backbone.p3": 0.35, "neck": 0.2, "backbone.p5": 0.4}
    assert (cand.importance, cand.round_to) == ("bn_scale", 8)
    assert SPACE.candidate_from_params(params) == cand


def test_sampled_values_stay_on_the_grid():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        cand = SPACE.suggest(trial)
        study.tell(trial, 0.0)
        p3 = cand.ratios["backbone.p3"]
        assert 0.2 <= p3 <= 0.6 + 1e-9 and abs(round((p3 - 0.2) / 0.05) * 0.05 + 0.2 - p3) < 1e-6
        assert 0.1 <= cand.ratios["neck"] <= 0.3


def test_grid():
    grid = SPACE.grid()
    assert grid["ratio.backbone.p3"] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
    assert grid["ratio.neck"] == [0.1, 0.2, 0.3] and "ratio.backbone.p5" not in grid
    assert grid["importance"] == ["l1", "bn_scale"] and grid["round_to"] == [1, 8]
    assert RatioRange(low=0.3, high=0.3).values() == [0.3]


def test_stage_check_lists_valid_stages():
    with pytest.raises(SearchSpaceError, match=r"does not have.*Valid stages: backbone.p3, neck"):
        SPACE.check_stages(["backbone.p3", "neck"])
    with pytest.raises(SearchSpaceError, match="does not have"):
        SearchSpace.model_validate({"ratios": {"head": 0.2}}).check_stages(["neck"])


def test_candidate_key_is_stable():
    a = SPACE.candidate_from_params({"ratio.backbone.p3": 0.35, "ratio.neck": 0.2, "importance": "l1", "round_to": 1})
    b = SPACE.candidate_from_params({"ratio.neck": 0.2, "ratio.backbone.p3": 0.35, "round_to": 1, "importance": "l1"})
    assert a.key() == b.key()


def test_uniform_baseline_parameters():
    from yoloprune.config import config_from_dict
    from yoloprune.errors import ConfigError
    from yoloprune.search.uniform import uniform_params

    cfg = config_from_dict(
        {"name": "u", "model": "yolov8n.yaml", "data": "d.yaml",
         "space": {"ratios": {"backbone.p3": {"low": 0.2, "high": 0.6, "step": 0.05}, "neck": {"low": 0.1, "high": 0.5},
                              "backbone.p5": 0.4}, "round_to": [8, 1]}}
    )  # fmt: skip
    assert uniform_params(cfg, 0.3) == {"ratio.backbone.p3": 0.3, "ratio.neck": 0.3, "round_to": 8}
    with pytest.raises(ConfigError, match="not in the search space of stage 'neck'"):
        uniform_params(cfg, 0.55)
    with pytest.raises(ConfigError, match=r"on a grid of 0\.05"):
        uniform_params(cfg, 0.33)
