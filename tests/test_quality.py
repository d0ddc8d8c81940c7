"""Search-quality tools: the per-stage sensitivity scan, the warm start it drives, and the proxy-fidelity
rank correlation; units on their logic and the real CLI on a tiny model."""

from __future__ import annotations

import itertools

import optuna
import pytest
from optuna.trial import TrialState

from tests.test_search_e2e import _config, _run
from yoloprune.config import config_from_dict, load_config
from yoloprune.errors import ConfigError
from yoloprune.search.fidelity import kendall_tau
from yoloprune.search.sensitivity import StageSensitivity, warm_start_params

SPACE = {
    "ratios": {
        "backbone.p3": {"low": 0.1, "high": 0.5, "step": 0.05},
        "backbone.p4": {"low": 0.1, "high": 0.5, "step": 0.05},
        "neck": {"low": 0.2, "high": 0.6},
    }
}


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / (6 * 5) ** 0.5)  # tau-b with a tie
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [0.31, 0.12, 0.25, 0.25, 0.4, 0.05], [0.5, 0.2, 0.3, 0.45, 0.6, 0.1]
    assert kendall_tau(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    with pytest.raises(ValueError):
        kendall_tau([1], [1])


def _row(stage: str, drop: float, flops: float) -> StageSensitivity:
    return StageSensitivity(stage, 0.5, 0.3, drop, flops, flops, None)


def test_warm_start_prunes_robust_stages_harder_and_grows_with_k():
    config = config_from_dict({"name": "w", "model": "yolov8n.yaml", "data": "d.yaml", "space": SPACE})
    rows = [_row("backbone.p3", 0.40, 0.10), _row("backbone.p4", 0.05, 0.20), _row("neck", 0.10, 0.10)]
    params = warm_start_params(config, rows, 3)
    assert len(params) == 3
    # p3 costs 4.0 mAP per FLOP, the neck 1.0, p4 0.25: p4 is pruned hardest, p3 least.
    last = params[-1]
    assert last["ratio.backbone.p3"] == 0.1  # the most sensitive stage stays at the bottom of its range
    assert last["ratio.backbone.p4"] == 0.5  # the most robust reaches the top
    assert last["ratio.neck"] == pytest.approx(0.2 + 0.4 * 0.8)  # in between: 1 - (1.0 - 0.25) / (4.0 - 0.25)
    for a, b in itertools.pairwise(params):  # from mild to aggressive
        assert all(b[k] >= a[k] for k in a)
    for p in params:  # on the grid
        assert round(p["ratio.backbone.p4"] / 0.05, 6) == round(p["ratio.backbone.p4"] / 0.05)
    with pytest.raises(ConfigError, match="lacks stage"):
        warm_start_params(config, rows[:2], 2)


@pytest.mark.slow
def test_sensitivity_scan_warm_start_and_fidelity_through_the_cli(tmp_path, tiny_data):
    cfg_path = _config(
        tmp_path, tiny_data, "quality",
        constraints=[], targets=[], objectives=[{"metric": "map50_95", "direction": "maximize"}],
        engine={"sampler": "random", "seed": 0}, budget={"trials": 4},
    )  # fmt: skip
    proc = _run("sensitivity", str(cfg_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backbone.p4" in proc.stdout and "neck" in proc.stdout and "mAP_drop_%" in proc.stdout
    cfg = load_config(cfg_path)
    study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
    scan = study.user_attrs["sensitivity"]
    assert scan["epochs"] == 0 and {s["stage"] for s in scan["stages"]} == {"backbone.p4", "neck"}
    assert all(0 < s["flops_reduction"] < 1 for s in scan["stages"])

    proc = _run("search", str(cfg_path), "--no-progress", "--warm-start", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).get_trials()
    assert [t.user_attrs.get("warm_start") for t in trials[:2]] == [1, 2]
    from yoloprune.search.sensitivity import stored

    expected = warm_start_params(cfg, stored(optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)), 2)
    assert [t.params for t in trials[:2]] == [pytest.approx(p) for p in expected]
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4

    bad = _run("fidelity", str(cfg_path), "--epochs", "1", cwd=tmp_path)
    assert bad.returncode == 2 and "must exceed the proxy" in bad.stderr
    proc = _run("fidelity", str(cfg_path), "--top", "2", "--random", "1", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).user_attrs["fidelity"]
    assert record["n"] == 3 and record["epochs"] == 2 and len(record["trials"]) == 3
    pairs = list(record["trials"].values())
    expected = kendall_tau([p["proxy"] for p in pairs], [p["long"] for p in pairs])
    assert record["tau"] == pytest.approx(expected, nan_ok=True)  # NaN when every mAP ties (untrained model)
    results = _run("results", str(cfg_path), cwd=tmp_path)
    assert "proxy fidelity: Kendall tau" in results.stdout and "over 3 trials" in results.stdout

    # The calibration reuses fidelity's three 2-epoch fine-tunes (stored one by one) and adds the base's
    # references; this untrained tiny base has mAP 0, so there is nothing to fit and constraints stay on the proxy.
    bad = _run("calibrate", str(cfg_path), "--candidates", "2", "--epochs", "2", cwd=tmp_path)
    assert bad.returncode == 2 and "at least 3" in bad.stderr
    proc = _run("calibrate", str(cfg_path), "--candidates", "3", "--epochs", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attrs = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url).user_attrs
    longs = {k for k in attrs if k.startswith("long_finetune:2:")}
    assert {f"long_finetune:2:{n}" for n in record["trials"]} <= longs and len(longs) <= 4
    assert "reference:2" in attrs and "reference:1" in attrs
    assert "no calibration: the baseline's mAP50-95 is 0" in proc.stdout and proc.stdout.count("trial ") >= 3


def test_progressive_distilled_proxy_reaches_the_one_shot_architecture(tiny_data, tmp_path, monkeypatch):
    """finetune.rounds=2: prune to half the ratios, fine-tune, prune to the full ratios, fine-tune; each with
    the base as distillation teacher; the pruner's per-epoch callback sees one epoch sequence."""
    from torch import nn

    from yoloprune.config import FinetuneConfig
    from yoloprune.data.check import inspect_dataset
    from yoloprune.evaluators import proxy
    from yoloprune.pruning import count_params, prune
    from yoloprune.spaces import Candidate
    from yoloprune.ultra.models import load_detector

    calls, real = [], proxy.finetune
    monkeypatch.setattr(
        proxy, "finetune", lambda model, *a, **k: calls.append((count_params(model), k)) or real(model, *a, **k)
    )
    base = load_detector("yolov8n.yaml", nc=6)
    cfg = FinetuneConfig(epochs=3, batch=8, bn_batches=1, distill=2.0, rounds=2)
    evaluator = proxy.ProxyEvaluator(
        base, inspect_dataset(tiny_data), imgsz=128, device="cpu", finetune=cfg, workdir=tmp_path
    )
    candidate = Candidate({"backbone.p4": 0.4, "neck": 0.5}, round_to=8)
    seen = []
    result = evaluator.evaluate(candidate, name="t0", on_epoch=lambda e, m: seen.append(e))

    one_shot = prune(base, candidate.ratios, round_to=8)
    half = prune(base, {s: r / 2 for s, r in candidate.ratios.items()}, round_to=8)
    widths = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert widths(result.model) == widths(one_shot) and result.finetuned
    assert [params for params, _ in calls] == [count_params(half), count_params(one_shot)]
    assert [k["epochs"] for _, k in calls] == [1, 2] and seen == [0, 1, 2] and len(result.epochs) == 3
    assert all(k["teacher"] is base and k["distill"] == 2.0 for _, k in calls)
    assert not list(tmp_path.glob("t0*"))  # the rounds' run folders are removed
    with pytest.raises(ValueError, match=r"finetune\.rounds"):
        FinetuneConfig(epochs=1, rounds=2)
