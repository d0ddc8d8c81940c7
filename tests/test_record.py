"""The trial record: what the current code writes reads back field for field from a real SQLite study, with the
constraints where Optuna's samplers read them; a study written by an older version (fewer keys, one this version
does not know) still reads through the results table, the Pareto front and ``export best``'s selection."""

from __future__ import annotations

import math
from dataclasses import fields

import optuna
import pytest

from yoloprune.config import config_from_dict
from yoloprune.search import calibration
from yoloprune.search.results import judged_frame, pareto_front, render_results, trials_frame
from yoloprune.search.selection import select_trial
from yoloprune.spaces import Candidate
from yoloprune.storage.optuna_adapter import rdb_storage, write_record
from yoloprune.storage.record import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONSTRAINTS = [-0.1, 0.0, 0.25]


def _full_record() -> TrialRecord:
    """A record with every field set (JSON values, as the storage gives them back)."""
    candidate = Candidate({"neck": 0.3, "head": 0.1}, "l1", 8)
    return TrialRecord(
        candidate=candidate.as_dict(),
        candidate_key=candidate.key(),
        worker={"host": "node-1", "pid": 4242},
        engine="nni",
        nni={"experiment": "exp1", "trial_job": "job7"},
        method="tpe",
        target_value=0.5,
        proposal={"neck": 0.25, "head": 0.05},
        target={"metric": "flops_reduction", "value": 0.5, "achieved": 0.49, "tolerance": 0.02, "on_target": True},
        uniform=0.3,
        warm_start=2,
        screen_index=7,
        screen_rank=1,
        screen_score=0.31,
        retry_of=3,
        metrics={"map50_95": 0.41, "map50_95_drop": 0.12, "gflops": 4.1, "latency_ms.cpu": 3.2},
        per_class={"person": 0.44, "car": 0.38},
        feasible=True,
        finetuned=True,
        reward=0.87,
        latency={"cpu": {"ms": 3.2, "std_ms": 0.1}},
        constraints=CONSTRAINTS,
        epochs=[{"map50_95": 0.35}, {"map50_95": 0.41}],
        timings={"prune": 1.5, "total": 12.0},
        duplicate_of=1,
        error="RuntimeError: boom",
        interrupted=True,
        stop_search=False,
        extra={"legacy_key": [1, 2]},
    )


def test_a_record_written_by_the_current_code_reads_back_every_field(tmp_path):
    record = _full_record()
    names = TrialRecord.keys()
    assert [k for k in names if getattr(record, k) is None] == [], "set every field in _full_record"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=rdb_storage(url), directions=["maximize"])
    trial = study.ask()
    write_record(trial, record, CONSTRAINTS)
    study.tell(trial, 0.41)

    reloaded = optuna.load_study(study_name="s", storage=url).trials[0]  # a fresh read of the file
    assert reloaded.state == optuna.trial.TrialState.COMPLETE
    back = TrialRecord.from_frozen(reloaded)
    assert back == record
    for f in fields(TrialRecord):
        assert getattr(back, f.name) == getattr(record, f.name), f.name
    assert back.to_attrs() == record.to_attrs() == reloaded.user_attrs

    # The constraints are where Optuna's samplers read them: what the public Trial.set_constraint writes.
    reference = optuna.create_study(directions=["maximize"])
    constrained = reference.ask()
    for i, v in enumerate(CONSTRAINTS):
        constrained.set_constraint(f"c{i}", v)
    reference.tell(constrained, 0.41)
    assert reloaded.system_attrs == reference.trials[0].system_attrs
    assert reloaded.system_attrs  # not trivially equal


def test_a_constraint_without_a_value_is_stored_as_violated(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=rdb_storage(url))
    trial = study.ask()
    write_record(trial, TrialRecord(feasible=False), [-1.0, math.nan])  # Trial.set_constraint refuses NaN
    study.tell(trial, 0.0)
    stored = optuna.load_study(study_name="s", storage=url).trials[0]
    assert sorted(stored.system_attrs.values()) == [-1.0, 1e6]
    assert math.isnan(TrialRecord.from_frozen(stored).constraints[1])


def _old_study(tmp_path):
    """A study as an older version wrote it: metrics, feasible, reward, epochs, one unknown key; no candidate,
    finetuned or target. Written with plain Optuna, not this version's adapter."""
    config = config_from_dict({
        "name": "old", "model": "yolov8n.yaml", "data": "d.yaml", "imgsz": 128,
        "space": {"ratios": {"neck": {"low": 0.1, "high": 0.6}}},
        "constraints": [{"metric": "map50_95_drop", "max": 0.2}],
        "objectives": [{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}],
        "output": str(tmp_path / "out"),
    })  # fmt: skip
    config.output_dir.mkdir(parents=True)
    study = optuna.create_study(study_name=config.name, storage=config.storage_url, directions=["maximize", "minimize"])
    for ratio, drop in [(0.2, 0.1), (0.4, 0.15), (0.6, 0.3)]:
        study.enqueue_trial({"ratio.neck": ratio})
        trial = study.ask()
        trial.suggest_float("ratio.neck", 0.1, 0.6)
        metrics = {"map50_95": 0.5 * (1 - drop), "map50_95_drop": drop, "gflops": 8.0 * (1 - ratio)}
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("feasible", drop <= 0.2)
        trial.set_user_attr("reward", 1 - drop)
        trial.set_user_attr("epochs", [{"map50_95": metrics["map50_95"]}])
        trial.set_user_attr("legacy_key", {"ratio": ratio})
        study.tell(trial, [metrics["map50_95"], metrics["gflops"]])
    return config, optuna.load_study(study_name=config.name, storage=config.storage_url)


def test_a_study_written_by_an_older_version_still_reads(tmp_path):
    config, study = _old_study(tmp_path)
    records = [TrialRecord.from_frozen(t) for t in study.trials]
    assert [r.extra for r in records] == [{"legacy_key": {"ratio": t.params["ratio.neck"]}} for t in study.trials]
    assert all(r.candidate is None and r.finetuned is None and r.target is None for r in records)
    assert all(r.was_finetuned and not r.target_on for r in records)  # older versions fine-tuned every candidate
    assert all(r.to_attrs() == t.user_attrs for r, t in zip(records, study.trials, strict=True))
    assert records[0].to_attrs()["legacy_key"] == {"ratio": study.trials[0].params["ratio.neck"]}
    # No recorded candidate: the one its parameters give.
    assert config.space.candidate_of(study.trials[1].params, records[1]).ratios == {
        "neck": pytest.approx(study.trials[1].params["ratio.neck"])
    }

    frame = trials_frame(study)
    assert frame["feasible"].tolist() == [True, True, False]
    assert frame["reward"].tolist() == pytest.approx([0.9, 0.85, 0.7])
    assert frame["finetuned"].isna().all() and frame["cost_target"].isna().all() and frame["method"].isna().all()
    assert frame["map50_95"].tolist() == pytest.approx([0.45, 0.425, 0.35])
    assert "legacy_key" not in frame.columns
    judged = judged_frame(study, config)  # no calibration, no stored baseline: the proxy's verdicts
    assert judged["feasible"].tolist() == [True, True, False]
    assert sorted(pareto_front(judged, config)["trial"]) == [0, 1]
    assert select_trial(study, config).number == 1  # the fastest feasible (lowest GFLOPs)
    assert [t.number for t in calibration.choose(study, 3)] == [0, 1, 2]  # counted as fine-tuned, best reward first
    text = render_results(config)
    assert "experiment 'old': 3 complete, 2 feasible" in text and "Pareto front" in text


def test_to_attrs_drops_unset_fields_and_keeps_false_and_zero():
    assert TrialRecord().to_attrs() == {}
    record = TrialRecord(feasible=False, finetuned=False, reward=0.0, warm_start=0, extra={"legacy_key": None})
    assert record.to_attrs() == {"feasible": False, "finetuned": False, "reward": 0.0, "warm_start": 0,
                                 "legacy_key": None}  # fmt: skip
    assert TrialRecord.from_attrs(record.to_attrs()) == record
    assert not TrialRecord(finetuned=False).was_finetuned
