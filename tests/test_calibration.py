"""The proxy calibration: the proxy-to-final fit and its leave-one-out error, constraints judged on the predicted
final drop (results, the report's frame and `export best`), the fallback to the raw proxy, and the export's
re-check of the real drop. Studies are real (SQLite through the project's storage); the trials' metrics are set
by hand, since what is tested is how they are judged."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from yoloprune.config import config_from_dict
from yoloprune.search import calibration as cal
from yoloprune.search.optuna_engine import open_study
from yoloprune.storage import Store

BASE = 0.5  # the baseline's mAP50-95


def _loo(x, y):
    out = []
    for i in range(len(x)):
        b, a = np.polyfit(np.delete(x, i), np.delete(y, i), 1)
        out.append(a + b * x[i])
    return np.array(out)


def test_fit_recovers_a_line_and_its_leave_one_out_error():
    exact = {t: (x, 0.02 + 0.25 * x) for t, x in enumerate([0.2, 0.4, 0.6, 0.8])}
    fitted = cal.fit(exact, epochs=30, proxy_epochs=2)
    assert fitted.form == "linear" and fitted.intercept == pytest.approx(0.02) and fitted.slope == pytest.approx(0.25)
    assert fitted.error == pytest.approx(0.0, abs=1e-9) and fitted.usable and fitted.problem is None
    assert fitted.predict(0.5) == pytest.approx(0.145)

    noisy = {0: (0.2, 0.05), 1: (0.4, 0.12), 2: (0.6, 0.11), 3: (0.8, 0.2)}
    fitted = cal.fit(noisy, epochs=30, proxy_epochs=2, max_error=0.05)
    x, y = np.array([0.2, 0.4, 0.6, 0.8]), np.array([0.05, 0.12, 0.11, 0.2])
    errors = {form: float(np.sqrt(np.mean((_loo(cal._transform(x, form), y) - y) ** 2))) for form in cal.FORMS}
    assert fitted.form == min(errors, key=errors.get) and fitted.error == pytest.approx(min(errors.values()))
    expected = _loo(cal._transform(x, fitted.form), y)
    assert [fitted.points[i]["loo_prediction"] for i in range(4)] == pytest.approx(expected)
    assert fitted.usable  # ~0.037 < 0.05
    assert not cal.fit(noisy, epochs=30, proxy_epochs=2, max_error=0.01).usable
    assert cal.Calibration.from_dict(fitted.as_dict()) == fitted


def test_a_proxy_near_zero_is_fitted_on_the_log_of_what_it_kept():
    """Measured on the benchmark's base (uniform at -25..-70% FLOPs, 2-epoch proxy, 15-epoch fine-tune): the
    harshest cut keeps 3% of the base's mAP on the proxy and 52% after the long fine-tune. The linear form
    misses it by 22 points; the log form predicts every point within 2.2."""
    base = 0.3541
    proxy, final = [0.2683, 0.2211, 0.0976, 0.0111], [0.3432, 0.3248, 0.2888, 0.1826]
    drops = {t: (1 - p / base, 1 - f / base) for t, (p, f) in enumerate(zip(proxy, final, strict=True))}
    fitted = cal.fit(drops, epochs=15, proxy_epochs=2)
    assert fitted.form == "log" and fitted.error < 0.02 and fitted.usable
    assert all(abs(p["loo_prediction"] - p["final_drop"]) < 0.025 for p in fitted.points.values())
    assert 0 < fitted.predict(0.99) <= 1.0  # a proxy at ~0 still predicts a drop below 100%


def test_too_few_points_flat_and_inverted_fits_are_refused():
    with pytest.raises(cal.CalibrationError, match="at least 3 long-fine-tuned candidates"):
        cal.fit({0: (0.3, 0.1), 1: (0.5, 0.2)}, epochs=30, proxy_epochs=2)
    flat = cal.fit({0: (0.4, 0.1), 1: (0.4, 0.2), 2: (0.4, 0.15)}, epochs=30, proxy_epochs=2, max_error=1.0)
    assert flat.slope == 0 and not flat.usable and "does not predict" in (flat.problem or "")
    inverted = cal.fit({0: (0.2, 0.3), 1: (0.4, 0.2), 2: (0.6, 0.1)}, epochs=30, proxy_epochs=2, max_error=1.0)
    assert inverted.slope < 0 and not inverted.usable


def _study(tmp_path, constraints):
    config = config_from_dict({
        "name": "calib", "model": "yolov8n.yaml", "data": "d.yaml", "imgsz": 128,
        "space": {"ratios": {"neck": {"low": 0.1, "high": 0.6}}}, "constraints": constraints,
        "objectives": [{"metric": "map50_95", "direction": "maximize"}], "output": str(tmp_path / "out"),
    })  # fmt: skip
    config.output_dir.mkdir(parents=True)
    store = Store(config.storage_url)
    store.save_baseline(
        store.experiment_id(config.name, config.model_dump(mode="json")),
        "k",
        {"map50_95": BASE, "map50": 0.8, "gflops": 1.0, "params": 1000},
    )
    study = open_study(config)
    # Proxy drops 30%..70% (uniform at four ratios, tagged as the runner tags them) and one searched trial.
    for number, (ratio, proxy_drop) in enumerate([(0.2, 0.3), (0.3, 0.4), (0.4, 0.55), (0.5, 0.7), (0.4, 0.35)]):
        metrics = {"map50_95": BASE * (1 - proxy_drop), "map50_95_drop": proxy_drop, "flops_reduction": ratio,
                   "gflops": 1 - ratio}  # fmt: skip
        feasible = all(v <= 0 for v in cal.violations(metrics, config.constraints))
        attrs = {"metrics": metrics, "feasible": feasible, "finetuned": True, "reward": 1 - proxy_drop,
                 "uniform": ratio if number < 4 else None, "candidate": {"ratios": {"neck": ratio}}}  # fmt: skip
        trial = optuna.trial.create_trial(
            params={"ratio.neck": ratio},
            distributions={"ratio.neck": optuna.distributions.FloatDistribution(0.1, 0.6)},
            values=[metrics["map50_95"]],
            user_attrs={k: v for k, v in attrs.items() if v is not None},
        )
        study.add_trial(trial)
    return config, study


def test_constraints_are_judged_on_the_predicted_final_drop(tmp_path):
    from yoloprune.search.results import judged_frame, render_results
    from yoloprune.search.selection import select_trial

    config, study = _study(tmp_path, [{"metric": "map50_95_drop", "max": 0.1}])
    assert not any(t.user_attrs["feasible"] for t in study.trials)  # every proxy drop is >= 30%
    with pytest.raises(Exception, match="no feasible trial"):
        select_trial(study, config)
    assert cal.choose(study, 3) == study.trials[:3]  # uniform first, mildest first
    # Long fine-tunes of the uniform trials: final drop = 0.2 x proxy drop - 0.01, within 0.002.
    for t, wobble in zip(study.trials[:4], [0.002, -0.002, 0.001, -0.001], strict=True):
        final = BASE * (1 - (0.2 * t.user_attrs["metrics"]["map50_95_drop"] - 0.01 + wobble))
        cal.record_long(study, t.number, 30, t.user_attrs["metrics"]["map50_95"], final)
    fitted = cal.refit(study, {"map50_95": BASE}, epochs=30, proxy_epochs=2, max_error=0.02)
    assert fitted is not None and fitted.usable and fitted.slope == pytest.approx(0.2, abs=0.02)
    judged = cal.verdicts(study, config)
    # The four long-fine-tuned trials are judged on their measured drops (0.052, 0.068, 0.101, 0.129), the fifth
    # on its prediction (0.06).
    assert [judged[n].feasible for n in range(5)] == [True, True, False, False, True]
    assert [v.on for v in judged.values()] == ["measured"] * 4 + ["calibrated"]
    assert judged[2].predicted_drop == pytest.approx(0.101)
    frame = judged_frame(study, config)
    assert frame["feasible_proxy"].tolist() == [False] * 5
    assert frame["predicted_drop"].tolist() == pytest.approx([judged[n].predicted_drop for n in range(5)])
    assert select_trial(study, config).number in {n for n, v in judged.items() if v.feasible}
    text = render_results(config)
    assert "accuracy constraints are judged on the predicted final drop" in text
    assert "final_drop_%_predicted" in text and "Pareto front" in text

    # A fit that predicts badly falls back to the raw proxy, with a warning.
    cal.refit(study, {"map50_95": BASE}, epochs=30, proxy_epochs=2, max_error=0.0001)
    judged = cal.verdicts(study, config)
    assert [v.on for v in judged.values()] == ["measured"] * 4 + ["proxy"] and not judged[4].feasible
    text = render_results(config)
    assert "WARNING: calibration not used" in text


def test_the_export_rechecks_the_real_drop_and_adds_its_point(tmp_path):
    from yoloprune.deploy.export import _markdown, _recheck, _recheck_lines

    config, study = _study(tmp_path, [{"metric": "map50_95_drop", "max": 0.1}])
    for t in study.trials[:3]:
        drop = t.user_attrs["metrics"]["map50_95_drop"]
        cal.record_long(study, t.number, 30, t.user_attrs["metrics"]["map50_95"], BASE * (1 - 0.2 * drop))
    cal.refit(study, {"map50_95": BASE}, epochs=30, proxy_epochs=2)
    study.set_user_attr("reference:30", {"map50_95": 0.52, "map50": 0.8})
    trial = study.trials[4]  # proxy drop 0.35: predicted 0.07
    out = _recheck(config, trial, 30, {"map50_95": BASE * 0.9, "map50_95_drop": 0.1}, {"map50_95": BASE})
    check = out["calibration"]
    assert check["predicted_drop"] == pytest.approx(0.07) and check["real_drop"] == 0.1
    assert not check["within_error"]  # 3 points off, while the fit's error is 0 and the limit 2
    assert out["reference"]["drop_vs_reference"] == pytest.approx(1 - 0.45 / 0.52)
    study = open_study(config, create=False)
    assert cal.long_results(study, 30)[4]["source"] == "export"
    assert cal.stored(study).n == 4  # the export's measurement joined the fit
    lines = "\n".join(_recheck_lines(out))
    assert "predicted mAP50-95 drop 7.0%" in lines and "real drop" in lines and "outside" in lines
    assert "fine-tuned the same 30 epochs" in lines
    card = {"experiment": "calib", "trial": 4, "candidate": {"ratios": {}, "importance": "l1", "round_to": 8},
            "finetune": {"epochs": 30}, "before": {}, "after": {}, "per_class_ap50_95": {"before": {}, "after": {}},
            "onnx_check": {"max_abs_diff": 0.0, "scale": 1.0}, "files": {}, "versions": {}, **out}  # fmt: skip
    assert "predicted mAP50-95 drop 7.0%" in _markdown(card)
