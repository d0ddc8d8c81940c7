"""The trial evaluation's pluggable parts: how a candidate another trial has is handled, and the epoch display."""

from __future__ import annotations

import optuna

from yoloprune.search.trial import EpochBars, EvaluateEvery, NoDisplay, WaitForTwin
from yoloprune.storage.optuna_adapter import write_record
from yoloprune.storage.record import TrialRecord


def _study_with(key: str, state: optuna.trial.TrialState) -> optuna.Study:
    study = optuna.create_study()
    first = study.ask()
    write_record(first, TrialRecord(candidate_key=key))
    if state != optuna.trial.TrialState.RUNNING:
        study.tell(first, 1.0 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    return study


def test_a_finished_twin_is_reused_and_a_new_candidate_is_not():
    study = _study_with("k", optuna.trial.TrialState.COMPLETE)
    trial = study.ask()
    assert WaitForTwin(poll_s=0.01).twin(trial, "k").number == 0
    assert WaitForTwin(poll_s=0.01).twin(trial, "other") is None
    assert EvaluateEvery().twin(trial, "k") is None


def test_a_later_trial_of_the_same_candidate_does_not_wait_for_an_earlier_one_it_started_before():
    study = _study_with("k", optuna.trial.TrialState.RUNNING)
    running = study.trials[0]
    # The running trial itself looks for twins: only later trials have its key, so it evaluates.
    assert WaitForTwin(poll_s=0.01).twin(optuna.Trial(study, running._trial_id), "k") is None


def test_displays_take_each_epoch_and_close():
    for display in (EpochBars(3, 2), NoDisplay(3, 2)):
        display.update({"map50_95": 0.5})
        display.close()


def test_progress_bars_show_epochs_and_can_be_hidden(capsys):
    from yoloprune.log import epoch_progress, progress, set_progress

    set_progress(True)
    with progress(2, "fine-tune") as bar:
        on_epoch = epoch_progress(bar)
        on_epoch(0, {"map50_95": 0.25})
        on_epoch(1, {"map50_95": 0.5})
    shown = capsys.readouterr().err
    assert "fine-tune" in shown and "2/2" in shown and "mAP50-95 0.500" in shown
    set_progress(False)
    try:
        with progress(2, "hidden") as bar:
            bar.update(2)
    finally:
        set_progress(True)
    assert "hidden" not in capsys.readouterr().err
