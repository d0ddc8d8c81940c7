"""Engine pieces without training: pruner wiring in a multi-objective study, interrupted-trial recovery,
and a trial that raises is recorded as failed while the search goes on."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from yoloprune.search.optuna_engine import EpochReporter
from yoloprune.storage.optuna_adapter import recover_interrupted


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


@pytest.mark.parametrize("name", ["successive_halving", "hyperband"])
def test_multi_fidelity_pruners_stop_bad_curves_in_a_multi_objective_study(name):
    """Successive halving and Hyperband see the per-epoch mAP through the single-objective view."""
    from yoloprune.config import EngineConfig
    from yoloprune.search.optuna_engine import make_pruner

    pruner = make_pruner(EngineConfig(pruner=name, startup_trials=0), epochs=9)
    assert pruner is not None
    study = _mo_study()
    reporter = EpochReporter(study, pruner)

    def run(quality: float) -> bool:
        """One trial whose mAP climbs with ``quality``; True when the pruner stopped it."""
        trial = study.ask()
        report = reporter.callback(trial)
        try:
            for epoch in range(9):
                report(epoch, {"map50_95": quality * (epoch + 1) / 9})
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return True
        study.tell(trial, [quality, 1.0])
        return False

    assert not any(run(q) for q in (0.6, 0.7, 0.8, 0.9, 0.92, 0.95))  # each better than the last: kept
    stopped = [run(0.05) for _ in range(6)]
    assert sum(stopped) >= 3, stopped  # most bad ones stop early (some Hyperband brackets never stop any)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert any(len(t.user_attrs["epochs"]) < 9 for t in pruned)  # stopped before the last epoch
