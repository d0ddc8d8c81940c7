"""What the results and the report say about a search beyond its trials: Kendall tau always with its p-value and
n; the Pareto front from Optuna's ``study.best_trials`` where the stored constraints decide (the same trials as
the hand-written mask on the same study), the judged verdicts where a calibration decides; the hypervolume
history; parameter importances, and studies too small for them. Studies are real (SQLite through the project's
storage and ``write_record``); the trials' metrics are set by hand, since what is tested is how they are read."""

from __future__ import annotations

import random

import optuna
import pytest

from yoloprune.config import config_from_dict
from yoloprune.config.objectives import violations
from yoloprune.search import calibration as cal
from yoloprune.search import diagnostics, fidelity, screening
from yoloprune.search.results import judged_frame, optuna_front, pareto_front, render_results
from yoloprune.storage import Store
from yoloprune.storage.optuna_adapter import rdb_storage, write_record
from yoloprune.storage.record import TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE = {"map50_95": 0.5, "map50": 0.8, "gflops": 8.0, "params": 1000}
TWO = [{"metric": "map50_95", "direction": "maximize"}, {"metric": "gflops", "direction": "minimize"}]
DROP = [{"metric": "map50_95_drop", "max": 0.2}]


# --- Kendall tau: always with p and n -------------------------------------------------------------------


def _fidelity_record(proxy: list[float], long: list[float], **extra) -> dict:
    agreement = fidelity.rank_agreement(proxy, long)
    trials = {str(i): {"proxy": p, "long": q} for i, (p, q) in enumerate(zip(proxy, long, strict=True))}
    record = {"tau": agreement["tau"], "n": len(proxy), "epochs": 20, "proxy_epochs": 2, "trials": trials}
    return {**record, "p": agreement["p"], **extra}


def test_tau_is_shown_with_its_p_value_and_n():
    # The README's example: tau 0.8 over 5 trials is p = 0.08, not yet evidence.
    record = _fidelity_record([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])
    text = fidelity.describe(record)
    assert "Kendall tau 0.80 (p = 0.08, n = 5)" in text and "over 5 trials" in text and "not significant" in text
    # A record written before the p-value was stored: recomputed from its trials.
    old = {k: v for k, v in record.items() if k != "p"}
    assert "Kendall tau 0.80 (p = 0.08, n = 5)" in fidelity.describe(old)
    # Seven trials in the same order: significant, and said so without a warning.
    strong = fidelity.describe(_fidelity_record(list(range(7)), list(range(7))))
    assert "Kendall tau 1.00 (p < 0.001, n = 7)" in strong and "not significant" not in strong
    with_screen = fidelity.describe({**record, "screen": {"tau": 1.0, "p": 0.0167, "n": 5}})
    assert "screening score vs 20-epoch: tau 1.00 (p = 0.02, n = 5)" in with_screen
    tied = fidelity.describe(_fidelity_record([0.0, 0.0, 0.0], [0.1, 0.2, 0.3]))  # an untrained base: mAP 0 everywhere
    assert "Kendall tau n/a (p n/a, n = 3: every value tied)" in tied

    shown = screening.describe([{"value": 0.3, **fidelity.rank_agreement([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])}])
    assert shown == "screening vs proxy at 0.3: Kendall tau 0.80 (p = 0.08, n = 5)"


# --- studies --------------------------------------------------------------------------------------------


def _config(tmp_path, objectives=TWO, constraints=DROP, name="diag"):
    config = config_from_dict({
        "name": name, "model": "yolov8n.yaml", "data": "d.yaml", "imgsz": 128,
        "space": {"ratios": {"backbone.p4": {"low": 0.1, "high": 0.6}, "neck": {"low": 0.1, "high": 0.6}}},
        "constraints": constraints, "objectives": objectives, "output": str(tmp_path / name),
    })  # fmt: skip
    config.output_dir.mkdir(parents=True)
    return config


def _study(config, seed=0):
    storage = rdb_storage(config.storage_url)
    directions = [o.direction for o in config.objectives]
    return optuna.create_study(
        study_name=config.name, storage=storage, directions=directions, sampler=optuna.samplers.RandomSampler(seed)
    )


def _add(study, config, map50_95: float, gflops: float, *, duplicate_of: int | None = None, finetuned=True):
    """One complete trial with these metrics, written as the search writes it (record and constraints)."""
    trial = study.ask()
    trial.suggest_float("ratio.backbone.p4", 0.1, 0.6)
    trial.suggest_float("ratio.neck", 0.1, 0.6)
    metrics = {"map50_95": map50_95, "map50_95_drop": 1 - map50_95 / BASE["map50_95"], "gflops": gflops}
    constraints = violations(metrics, config.constraints)
    record = TrialRecord(
        metrics=metrics, feasible=all(v <= 0 for v in constraints), finetuned=finetuned, reward=map50_95 - 0.01 * gflops,
        duplicate_of=duplicate_of, per_class={"person": map50_95},
    )  # fmt: skip
    write_record(trial, record, constraints)
    study.tell(trial, [metrics[o.metric] for o in config.objectives])
    return trial.number


def _save_baseline(config, metrics=BASE):
    store = Store(config.storage_url)
    store.save_baseline(store.experiment_id(config.name, config.model_dump(mode="json")), "k", dict(metrics))


# --- the front ------------------------------------------------------------------------------------------


def test_best_trials_is_the_old_masks_front_on_the_same_study(tmp_path):
    config = _config(tmp_path)
    study = _study(config)
    # drop <= 20% means map50_95 >= 0.4.
    _add(study, config, 0.45, 6.0)  # 0: front
    _add(study, config, 0.42, 4.0)  # 1: front
    _add(study, config, 0.41, 5.0)  # 2: dominated by 1
    _add(study, config, 0.30, 1.0)  # 3: infeasible, and dominates 1 and 2 on the objectives
    _add(study, config, 0.42, 4.0, duplicate_of=1)  # 4: the same candidate as 1, on the front with it
    _add(study, config, 0.48, 7.5)  # 5: front
    trials = judged_frame(study, config)
    best = optuna_front(study, trials, config)
    assert best is not None and sorted(best) == sorted(t.number for t in study.best_trials) == [0, 1, 4, 5]
    with_optuna = pareto_front(trials, config, study)
    with_mask = pareto_front(trials, config)  # no study: the mask
    assert sorted(with_optuna["trial"]) == sorted(with_mask["trial"]) == [0, 1, 4, 5]
    assert list(with_optuna["trial"]) == list(with_mask["trial"])  # best reward first, both

    # Forty random trials, a third of them infeasible: the same front either way.
    rng = random.Random(3)
    for _ in range(40):
        _add(study, config, rng.uniform(0.2, 0.5), rng.uniform(1.0, 8.0))
    trials = judged_frame(study, config)
    best = optuna_front(study, trials, config)
    assert best is not None and len(best) >= 3
    assert sorted(pareto_front(trials, config, study)["trial"]) == sorted(pareto_front(trials, config)["trial"])
    assert sorted(best) == sorted(pareto_front(trials, config)["trial"])


def test_a_calibrated_study_takes_the_judged_front_not_the_stored_constraints(tmp_path):
    config = _config(tmp_path, constraints=[{"metric": "map50_95_drop", "max": 0.1}])
    _save_baseline(config)
    study = _study(config)
    for map50_95, gflops in [(0.35, 6.0), (0.3, 5.0), (0.24, 4.0), (0.2, 3.0), (0.32, 4.5)]:  # proxy drops 30-60%
        _add(study, config, map50_95, gflops)
    assert study.best_trials == [] and pareto_front(judged_frame(study, config), config, study).empty
    # The long fine-tune brings them back to a fifth of the proxy's drop: the fit predicts the fifth trial's.
    for t in study.trials[:4]:
        proxy = TrialRecord.from_frozen(t).metric("map50_95")
        cal.record_long(study, t.number, 30, proxy, BASE["map50_95"] * (1 - 0.2 * (1 - proxy / 0.5)))
    assert cal.refit(study, BASE, epochs=30, proxy_epochs=2).usable
    trials = judged_frame(study, config)
    assert trials["feasible"].tolist() == [True, True, False, False, True]  # drops 6, 8, 10.4, 12 and 7.2%
    assert optuna_front(study, trials, config) is None  # Optuna's stored constraints say none is feasible
    assert sorted(pareto_front(trials, config, study)["trial"]) == [0, 4]  # 4 (0.32, 4.5) dominates 1 (0.30, 5)


def test_an_older_study_without_optuna_constraints_keeps_its_stored_verdicts(tmp_path):
    from tests.test_record import _old_study

    config, study = _old_study(tmp_path)
    trials = judged_frame(study, config)
    assert optuna_front(study, trials, config) is None  # no stored constraints: Optuna would keep trial 2
    assert sorted(pareto_front(trials, config, study)["trial"]) == [0, 1]


# --- hypervolume ----------------------------------------------------------------------------------------


def test_hypervolume_history_by_hand_and_against_optunas_plot(tmp_path):
    config = _config(tmp_path)
    study = _study(config)
    _add(study, config, 0.40, 4.0)  # 0.4 x (8 - 4) = 1.6
    _add(study, config, 0.30, 1.0)  # infeasible: nothing
    _add(study, config, 0.45, 2.0)  # dominates trial 0: 0.45 x 6 = 2.7
    _add(study, config, 0.42, 5.0)  # dominated: nothing
    _add(study, config, 0.50, 6.0)  # + (0.5 - 0.45) x 2 = 2.8
    trials = judged_frame(study, config)
    history = diagnostics.hypervolume_history(trials, config, BASE)
    assert history is not None and history.trials == [0, 1, 2, 3, 4]
    assert history.reference == [0.0, 8.0] and history.sources == ["no accuracy", "unpruned"]
    assert history.values == pytest.approx([1.6, 1.6, 2.7, 2.7, 2.8])
    assert history.last_growth == 4
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        plotted = optuna.visualization.plot_hypervolume_history(study, history.reference)  # the stored constraints
    assert list(plotted.data[0].y) == pytest.approx(history.values)
    line = diagnostics.describe_hypervolume(history, config)
    assert "reference map50_95 0 (no accuracy), gflops 8 (unpruned)" in line and "2.8 after trial 4" in line
    assert "last grew at trial 4" in line

    # Without a stored baseline, the cost's reference is the worst trial's.
    reference, sources = diagnostics.reference_point(config, {}, trials)
    assert reference == [0.0, 6.0] and sources == ["no accuracy", "worst trial"]


def test_hypervolume_history_never_falls_on_a_random_study(tmp_path):
    config = _config(tmp_path)
    study = _study(config)
    rng = random.Random(0)
    for _ in range(30):
        _add(study, config, rng.uniform(0.3, 0.5), rng.uniform(1.0, 8.0))
    history = diagnostics.hypervolume_history(judged_frame(study, config), config, BASE)
    assert history is not None and len(history.values) == 30 and history.final > 0
    assert all(b >= a for a, b in zip(history.values, history.values[1:], strict=False))


# --- importances, and small studies ---------------------------------------------------------------------


def test_importances_find_the_parameter_each_objective_follows(tmp_path):
    config = _config(tmp_path, constraints=[])
    study = _study(config)
    for _ in range(30):
        trial = study.ask()
        neck, p4 = trial.suggest_float("ratio.neck", 0.1, 0.6), trial.suggest_float("ratio.backbone.p4", 0.1, 0.6)
        metrics = {"map50_95": 0.5 - 0.4 * neck**2, "map50_95_drop": 0.8 * neck**2, "gflops": 8.0 * (1 - p4)}
        write_record(trial, TrialRecord(metrics=metrics, feasible=True, finetuned=True, reward=0.0), [])
        study.tell(trial, [metrics["map50_95"], metrics["gflops"]])
    result = diagnostics.param_importances(study, judged_frame(study, config), config)
    assert result.skipped == {} and result.counts == {"map50_95": 30, "gflops": 30}
    for metric, param in (("map50_95", "ratio.neck"), ("gflops", "ratio.backbone.p4")):
        found = result.by_objective[metric]
        assert sum(found.values()) == pytest.approx(1.0) and max(found, key=found.get) == param, (metric, found)
    lines = diagnostics.describe_importances(result)
    assert (
        lines[0].startswith("parameter importances (PED-ANOVA") and "for map50_95 (30 trials): ratio.neck" in lines[1]
    )
    assert diagnostics.importance_table(result).index[0] == "ratio.neck"
    text = render_results(config)
    assert "for gflops (30 trials): ratio.backbone.p4" in text and "hypervolume of the feasible front" in text


def test_a_study_with_few_or_no_trials_says_so_instead_of_failing(tmp_path):
    config = _config(tmp_path)
    study = _study(config)
    text = render_results(config)  # no trial at all
    assert "hypervolume: n/a (no complete trial yet)" in text
    assert "for map50_95: n/a (fewer than 10 complete trials; 0 so far)" in text

    _add(study, config, 0.45, 6.0)
    _add(study, config, 0.42, 4.0)
    _add(study, config, 0.30, 1.0, finetuned=False)  # skipped its fine-tune: not counted for accuracy
    text = render_results(config)
    assert "for map50_95: n/a (fewer than 10 complete trials; 2 so far)" in text
    assert "for gflops: n/a (fewer than 10 complete trials; 3 so far)" in text
    assert "hypervolume of the feasible front" in text and "Pareto front" in text

    single = _config(tmp_path, objectives=[{"metric": "map50_95", "direction": "maximize"}], name="single")
    one = _study(single)
    for map50_95 in (0.4, 0.45):
        _add(one, single, map50_95, 5.0)
    assert diagnostics.hypervolume_history(judged_frame(one, single), single, BASE) is None
    assert "hypervolume: n/a (one objective" in render_results(single)


def test_every_trial_tied_gives_no_importances(tmp_path):
    config = _config(tmp_path, constraints=[])
    study = _study(config)
    for _ in range(12):
        _add(study, config, 0.0, 4.0)  # an untrained base: mAP 0 everywhere, and one cost
    result = diagnostics.param_importances(study, judged_frame(study, config), config)
    assert result.by_objective == {}
    assert result.skipped == {
        "map50_95": "every trial has the same map50_95",
        "gflops": "every trial has the same gflops",
    }


def test_the_report_has_a_hypervolume_and_an_importance_plot(tmp_path):
    from yoloprune.search.report import write_report

    config = _config(tmp_path)
    _save_baseline(config, {**BASE, "per_class": {"person": 0.5}})
    study = _study(config)
    rng = random.Random(1)
    for _ in range(12):
        _add(study, config, rng.uniform(0.3, 0.5), rng.uniform(1.0, 8.0))
    report = write_report(config)
    assert "hypervolume" in report.figures and "importances" in report.figures
    page = report.path.read_text()
    assert "<dt>Hypervolume</dt><dd>hypervolume of the feasible front (reference map50_95 0 (no accuracy)" in page
    assert "for map50_95 (12 trials): ratio." in page
