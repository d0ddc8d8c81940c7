"""A search stopped after a trial's results are stored (its checkpoint cannot be written) keeps that trial
COMPLETE, in Optuna's loop and in an NNI trial; a database lost under an NNI trial ends it with one line."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from yoloprune.atomic import OutputWriteError
from yoloprune.config import config_from_dict
from yoloprune.search import trial as trial_module
from yoloprune.search.optuna_engine import EpochReporter
from yoloprune.search.trial import EvaluateEvery, NoDisplay, StorageLost, TrialEvaluation

BASELINE = {"map50": 0.5, "map50_95": 0.4, "params": 1000.0, "gflops": 2.0, "size_mb": 1.0}


def _config(tmp_path: Path):
    return config_from_dict(
        {
            "name": "stops",
            "model": {"yaml": "yolov8n.yaml"},
            "data": str(tmp_path / "data.yaml"),
            "imgsz": 64,
            "device": "cpu",
            "space": {"ratios": {"backbone.p4": {"low": 0.1, "high": 0.5, "step": 0.1}}},
            "finetune": {"epochs": 0},
            "targets": [],
            "objectives": [{"metric": "map50_95", "direction": "maximize"}],
            "constraints": [],
            "engine": {"sampler": "random", "seed": 1},
            "output": str(tmp_path / "out"),
        }
    )


class _Evaluator:
    def evaluate(self, candidate, *, name, skip, on_epoch):
        raw = {"map50": 0.45, "map50_95": 0.35, "params": 600.0, "gflops": 1.2, "size_mb": 0.6}
        return SimpleNamespace(raw=raw, per_class={}, timings={"val": 0.1}, finetuned=False, latency={}, model=None)


def _evaluation(tmp_path: Path, study: optuna.Study, monkeypatch) -> TrialEvaluation:
    """A TrialEvaluation over a fake evaluator whose checkpoint write fails with a full disk."""
    cfg = _config(tmp_path)
    exp = SimpleNamespace(config=cfg, data=SimpleNamespace(yaml_path=tmp_path / "data.yaml"), experiment_id=1)
    session = SimpleNamespace(exp=exp, evaluator=_Evaluator(), baseline=BASELINE)

    def full_disk(*args, **kwargs):
        raise OutputWriteError("cannot write trial_0000.pt: no space left on the file system.")

    monkeypatch.setattr(trial_module, "save_checkpoint", full_disk)
    return TrialEvaluation(
        session,  # type: ignore[arg-type]
        EpochReporter(study, None),
        duplicates=EvaluateEvery(),
        display=NoDisplay,
    )


def test_optuna_loop_stops_after_a_stored_trial_which_stays_complete(tmp_path, monkeypatch):
    study = optuna.create_study(direction="maximize")
    evaluation = _evaluation(tmp_path, study, monkeypatch)
    study.optimize(evaluation, n_trials=3, catch=(Exception,))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # stopped after it, not marked FAIL
    assert study.trials[0].values == [0.35] and "error" not in study.trials[0].user_attrs
    assert isinstance(evaluation.stop_error, OutputWriteError)


@pytest.fixture
def fake_nni(monkeypatch):
    """The ``nni`` module as an NNI trial process sees it, recording what the trial reports."""
    reported: list[dict] = []
    module = SimpleNamespace(
        get_next_parameter=lambda: {"ratio.backbone.p4": 0.3},
        report_final_result=reported.append,
        report_intermediate_result=lambda value: None,
    )
    monkeypatch.setitem(sys.modules, "nni", module)
    return reported


def _nni_trial(tmp_path, monkeypatch, evaluation_for):
    from yoloprune.search import nni_engine

    study = optuna.create_study(direction="maximize")
    monkeypatch.setattr(nni_engine, "load_study", lambda config, **kwargs: study)
    monkeypatch.setattr(nni_engine, "_evaluation", lambda config, study: evaluation_for(study))
    monkeypatch.setattr(nni_engine.signal, "signal", lambda *args: None)
    code = nni_engine.run_trial(_config(tmp_path))
    return code, study


def test_an_nni_trial_stored_before_the_stop_is_complete_and_reported(tmp_path, monkeypatch, fake_nni, capsys):
    code, study = _nni_trial(tmp_path, monkeypatch, lambda study: _evaluation(tmp_path, study, monkeypatch))
    assert code == 2
    assert study.trials[0].state == TrialState.COMPLETE and "error" not in study.trials[0].user_attrs
    assert len(fake_nni) == 1 and fake_nni[0]["map50_95"] == 0.35
    err = capsys.readouterr().err
    assert "finished and is stored, but cannot write trial_0000.pt" in err and "Traceback" not in err


def test_a_database_lost_under_an_nni_trial_ends_it_with_one_line(tmp_path, monkeypatch, fake_nni, capsys):
    from sqlalchemy.exc import OperationalError

    def lost(trial):
        cause = OperationalError("UPDATE trials", {}, ConnectionRefusedError("connection refused"))
        raise StorageLost(cause) from cause

    code, study = _nni_trial(tmp_path, monkeypatch, lambda study: lost)
    assert code == 2 and fake_nni == []
    assert study.trials[0].state == TrialState.RUNNING  # nothing more is written to a lost database
    err = capsys.readouterr().err
    assert err.startswith("trial failed: lost the database ") and "connection refused" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_trial_another_worker_failed_as_stale_is_dropped_and_the_worker_goes_on(
    tmp_path, tiny_data, monkeypatch, caplog
):
    """A worker whose heartbeat went silent past grace_s (an overloaded or suspended machine) finds its trial
    failed and queued again by another worker: it drops that trial and runs on to its budget, where Optuna's
    loop alone would stop with "Cannot tell a FAIL trial"."""
    from yoloprune.evaluators.proxy import ProxyEvaluator
    from yoloprune.search.runner import run_search
    from yoloprune.storage.optuna_adapter import enqueue
    from yoloprune.storage.record import TrialRecord

    cfg = config_from_dict(
        {
            **_config(tmp_path).model_dump(mode="json", exclude_none=True),
            "data": str(tiny_data),
            "finetune": {"epochs": 0, "batch": 8, "bn_batches": 1},
            "budget": {"trials": 2},
        }
    )
    real, calls = ProxyEvaluator.evaluate, [0]

    def evaluate(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:  # what another worker's stale-trial check does, through its own connection
            other = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url)
            running = other.get_trials(states=(TrialState.RUNNING,))[0]
            other._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)
            enqueue(other, running.params, TrialRecord(retry_of=running.number))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ProxyEvaluator, "evaluate", evaluate)
    with caplog.at_level("WARNING", logger="yoloprune"):
        study = run_search(cfg, progress=False)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2, states
    assert study.trials[1].params == study.trials[0].params  # the queued retry ran
    assert any("trial 0 was failed by another worker" in r.getMessage() for r in caplog.records)
