"""Every registered search method, run for real on a tiny model: each candidate sits on its cost target,
uniform at the target is candidate 0, and the best is never below it. Screening fine-tunes only its top k
and stores its rank agreement; screening and the sensitivity curves resume after an interruption."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from yoloprune.config import config_from_dict
from yoloprune.evaluators.proxy import ProxyEvaluator
from yoloprune.registry import SEARCH_METHODS
from yoloprune.search import screening
from yoloprune.search.runner import run_search
from yoloprune.search.sensitivity import CURVE_PREFIX

pytestmark = pytest.mark.slow

TOL = 0.02


def _config(tmp_path: Path, data: Path, name: str, **changes):
    raw = {
        "name": name,
        "model": {"yaml": "yolov8n.yaml"},
        "data": str(data),
        "imgsz": 64,
        "device": "cpu",
        "space": {
            "ratios": {"backbone.p4": {"low": 0.1, "high": 0.6, "step": 0.05}, "neck": {"low": 0.1, "high": 0.6}},
            "round_to": 8,
        },
        "finetune": {"epochs": 0, "batch": 8, "bn_batches": 1},
        "cost_target": {"metric": "flops_reduction", "value": 0.3, "tolerance": TOL},
        "constraints": [],
        "engine": {"seed": 0, "startup_trials": 1},
        "budget": {"trials": 3},
        "output": str(tmp_path / name),
        **changes,
    }
    return config_from_dict(raw)


_SCORE = ProxyEvaluator.screen_score


def _counting(monkeypatch, stop_at: int | None = None) -> dict[str, int]:
    """Count screening scores (and raise KeyboardInterrupt at the ``stop_at``-th: a Ctrl-C mid-way)."""
    calls = {"n": 0}

    def score(self, candidate, subset):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return _SCORE(self, candidate, subset)

    monkeypatch.setattr(ProxyEvaluator, "screen_score", score)
    return calls


def _interrupted_at(monkeypatch, config, stop_at: int) -> optuna.Study:
    """Run the search until the ``stop_at``-th screening score is interrupted; the study as it was left."""
    _counting(monkeypatch, stop_at)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, progress=False)
    return optuna.load_study(study_name=config.name, storage=config.storage_url)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _check_on_target(study: optuna.Study) -> None:
    for t in _complete(study):
        target = t.user_attrs["target"]
        assert target["on_target"] and abs(target["achieved"] - target["value"]) <= TOL, t.number
        # the landing's exact count is what the evaluator measured on the pruned model
        assert t.user_attrs["metrics"]["flops_reduction"] == pytest.approx(target["achieved"], abs=1e-6)


@pytest.mark.parametrize("method", SEARCH_METHODS.names())
def test_every_method_lands_every_candidate_on_target(tmp_path, tiny_data, method):
    config = _config(tmp_path, tiny_data, f"m-{method}", engine={"sampler": method, "seed": 0, "startup_trials": 1})
    study = run_search(config, progress=False)
    trials = _complete(study)
    assert trials, "no complete trial"
    _check_on_target(study)
    first = study.get_trials(deepcopy=False)[0]
    assert first.user_attrs["method"] == "uniform" and first.user_attrs["uniform"] > 0
    uniform_map = first.user_attrs["metrics"]["map50_95"]
    assert max(t.user_attrs["metrics"]["map50_95"] for t in trials) >= uniform_map
    if method == "uniform":
        assert len(study.get_trials(deepcopy=False)) == 1  # one candidate per target value, nothing sampled
    elif method in ("sensitivity", "tp_global"):
        assert [t.user_attrs["method"] for t in trials] == ["uniform", method]
        assert (method == "sensitivity") == any(k.startswith(CURVE_PREFIX) for k in study.user_attrs)
        assert trials[1].user_attrs["candidate"].get("global_ranking", False) == (method == "tp_global")
    else:
        assert len(trials) == 3 and {t.user_attrs["method"] for t in trials[1:]} == {method}


def test_several_target_values_give_one_uniform_each(tmp_path, tiny_data):
    config = _config(
        tmp_path, tiny_data, "values", cost_target={"metric": "flops_reduction", "value": [0.2, 0.35], "tolerance": TOL}
    )
    study = run_search(config, progress=False)
    _check_on_target(study)
    uniform = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("method") == "uniform"]
    assert sorted(t.user_attrs["target"]["value"] for t in uniform) == [0.2, 0.35]
    assert [t.number for t in uniform] == [0, 1]


def test_screening_fine_tunes_only_the_top_k_and_resumes(tmp_path, tiny_data, monkeypatch):
    screen = {"candidates": 24, "keep": 3, "images": 6}
    config = _config(tmp_path, tiny_data, "screen", engine={"sampler": "random", "seed": 0, "screen": screen},
                     budget={"trials": 4})  # fmt: skip
    study = _interrupted_at(monkeypatch, config, 6)
    assert sum(k.startswith(screening.PREFIX) for k in study.user_attrs) == 5  # kept across the interruption
    calls = _counting(monkeypatch)
    study = run_search(config, progress=False)
    assert calls["n"] == 24 - 5  # only the rest was scored
    records = [study.user_attrs[f"{screening.PREFIX}{i}"] for i in range(24)]
    top = sorted((r["score"] for r in records if r["score"] is not None), reverse=True)[:3]
    screened = [t for t in _complete(study) if "screen_rank" in t.user_attrs]
    assert sorted(t.user_attrs["screen_score"] for t in screened) == sorted(top)
    assert len(_complete(study)) == 4  # uniform + the 3 kept: nobody else was fine-tuned
    _check_on_target(study)
    stored = study.user_attrs[screening.FIDELITY_ATTR]
    assert stored[0]["n"] == 3 and "tau" in stored[0] and "p" in stored[0]
    from yoloprune.search.results import render_results

    shown = render_results(config)
    assert "screening vs proxy at 0.3: Kendall tau" in shown and "(p " in shown
    assert "against uniform pruning at the same flops_reduction:" in shown
    from yoloprune.search.report import write_report

    page = write_report(config).path.read_text()
    assert "id='versus-uniform'" in page and "screening vs proxy at 0.3" in page


def test_sensitivity_curves_resume_after_an_interruption(tmp_path, tiny_data, monkeypatch):
    config = _config(tmp_path, tiny_data, "sens", engine={"sampler": "sensitivity", "seed": 0})
    study = _interrupted_at(monkeypatch, config, 4)
    assert sum(k.startswith(CURVE_PREFIX) for k in study.user_attrs) == 3
    calls = _counting(monkeypatch)
    study = run_search(config, progress=False)
    assert calls["n"] == 1 + 2 * 4 - 3
    assert sum(k.startswith(CURVE_PREFIX) for k in study.user_attrs) == 1 + 2 * 4  # base + 2 stages x 4 points
    sensitivity = [t for t in _complete(study) if t.user_attrs["method"] == "sensitivity"]
    assert len(sensitivity) == 1 and sensitivity[0].user_attrs["target"]["on_target"]


def test_latency_target_lands_on_measured_latency(tmp_path, tiny_data):
    # warm-up and runs enough that the first (unpruned) measurement after the suite's other tests is not inflated
    target = {"name": "cpu", "backend": "onnxruntime", "threads": 1, "min_runs": 10, "max_runs": 30, "warmup": 10}
    config = _config(
        tmp_path,
        tiny_data,
        "lat",
        imgsz=128,
        targets=[target],
        cost_target={"metric": "latency_reduction.cpu", "value": 0.2, "tolerance": 0.1, "max_measurements": 4},
        engine={"sampler": "random", "seed": 0},
        budget={"trials": 2},
    )
    study = run_search(config, progress=False)
    for t in _complete(study):
        landed = t.user_attrs["target"]
        assert landed["measurements"] >= 1 and abs(landed["achieved"] - 0.2) <= 0.1
        assert t.user_attrs["metrics"]["latency_reduction.cpu"] == pytest.approx(landed["achieved"], abs=1e-6)


def test_cli_refuses_an_unreachable_target_before_any_training(tmp_path, tiny_data):
    import yaml

    raw = _config(tmp_path, tiny_data, "far").model_dump(mode="json", exclude_none=True)
    raw["cost_target"] = {"metric": "flops_reduction", "value": 0.97}
    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "yoloprune.cli", "search", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert "out of reach: this space reaches" in proc.stderr and "baseline" not in proc.stderr
    assert not (tmp_path / "far" / "trials").exists()
