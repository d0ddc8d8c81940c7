"""Engine pieces without training: pruner wiring in a multi-objective study, interrupted-trial recovery,
and a trial that raises is recorded as failed while the search goes on."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from yoloprune.search.optuna_engine import EpochReporter, recover_interrupted


def _mo_study() -> optuna.Study:
    return optuna.create_study(directions=["maximize", "minimize"], storage="sqlite:///:memory:")


def test_median_pruner_stops_a_hopeless_trial_in_a_multi_objective_study():
    study = _mo_study()
    reporter = EpochReporter(study, optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    for value in (0.5, 0.6):  # two finished trials with good per-epoch mAP
        trial = study.ask()
        reporter.callback(trial)(0, {"map50_95": value})
        study.tell(trial, [value, 1.0])
    good, bad = study.ask(), study.ask()
    reporter.callback(good)(0, {"map50_95": 0.7})  # above the median: goes on
    with pytest.raises(optuna.TrialPruned, match="after epoch 1"):
        reporter.callback(bad)(0, {"map50_95": 0.1})
    stored = study._storage.get_trial(bad._trial_id)
    assert stored.user_attrs["epochs"] == [{"map50_95": 0.1}]
    assert stored.intermediate_values == {}  # TPE breaks on pruned trials with values in MO studies
    study.tell(bad, state=TrialState.PRUNED)
    optuna.samplers.TPESampler(n_startup_trials=0, seed=0).sample_independent(
        study, study.ask(), "x", optuna.distributions.FloatDistribution(0, 1)
    )


def test_without_a_pruner_values_are_still_recorded():
    study = _mo_study()
    trial = study.ask()
    report = EpochReporter(study, None).callback(trial)
    report(0, {"map50_95": 0.2})
    report(1, {"map50_95": 0.3})
    assert study._storage.get_trial(trial._trial_id).user_attrs["epochs"] == [{"map50_95": 0.2}, {"map50_95": 0.3}]


def test_running_trials_are_failed_and_requeued():
    study = _mo_study()
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert recover_interrupted(study) == [trial.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "interrupted" in trials[0].user_attrs["error"]
    assert trials[1].state == TrialState.WAITING
    assert trials[1].system_attrs["fixed_params"] == trials[0].params and trials[1].user_attrs["retry_of"] == 0
    assert recover_interrupted(study) == []
