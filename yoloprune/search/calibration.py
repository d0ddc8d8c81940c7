"""Calibrate the proxy against the export's fine-tune, and judge accuracy constraints on the predicted final drop.

A short proxy fine-tune measures a pruned model early in its recovery: its relative mAP50-95 drop is far
larger than the drop the same candidate shows after the export's long fine-tune. ``yoloprune calibrate``
long-fine-tunes a few trials (uniform pruning first), fits ``final_drop = a + b * x`` by least squares, with x
either the proxy's drop (``linear``) or ``-ln(1 - proxy drop)``, the log of how much of the base's mAP the proxy
kept (``log``: a proxy near 0 still orders candidates that the long fine-tune brings back to very different
levels), and keeps the form with the smaller leave-one-out error. While that error is within ``max_error``, ``results``,
the report and ``export best`` judge accuracy constraints on the *predicted final* drop; otherwise they fall
back to the raw proxy with a warning. Every long fine-tune is stored on the study as it finishes
(``long_finetune:<epochs>:<trial>``), so an interrupted calibration resumes, and each ``export`` adds its own
measurement. ``reference:<epochs>`` holds the unpruned base fine-tuned for as long, so a drop can be read
against a base that got the same extra training, not only against the base as given.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from yoloprune.config import ExperimentConfig
from yoloprune.config.objectives import Constraint, violations
from yoloprune.errors import ConfigError, InternalError
from yoloprune.log import epoch_progress, get_logger, progress
from yoloprune.storage.record import TrialRecord

LOGGER = get_logger(__name__)

STUDY_ATTR = "calibration"
LONG_PREFIX = "long_finetune:"
REFERENCE_PREFIX = "reference:"
#: Two points draw the line; a third measures its (leave-one-out) error.
MIN_POINTS = 3
DEFAULT_MAX_ERROR = 0.02


class CalibrationError(ConfigError):
    """Too few long-fine-tuned candidates to fit a calibration."""


@dataclass(frozen=True)
class Calibration:
    """``final_drop = intercept + slope * x(proxy_drop)`` (relative mAP50-95 drops, fractions of the base's).

    Attributes:
        epochs: the long fine-tune's epochs; proxy_epochs: the proxy's.
        form: ``linear`` (x = proxy drop) or ``log`` (x = -ln(1 - proxy drop)).
        error: leave-one-out RMS error of the predicted final drop (same unit as the drops).
        max_error: the largest error at which constraints are judged on predictions.
        points: trial number -> ``{"proxy_drop", "final_drop", "loo_prediction"}``.
    """

    epochs: int
    proxy_epochs: int
    intercept: float
    slope: float
    error: float
    max_error: float
    points: dict[int, dict[str, float]] = field(default_factory=dict)
    form: str = "linear"

    @property
    def n(self) -> int:
        return len(self.points)

    @property
    def usable(self) -> bool:
        """A fit that ranks (slope > 0) and predicts within ``max_error``."""
        return self.slope > 0 and math.isfinite(self.error) and self.error <= self.max_error

    @property
    def problem(self) -> str | None:
        """Why the fit is not used, or None."""
        if self.slope <= 0:
            return f"its slope is {self.slope:.2f}: the proxy's drop does not predict the final drop's order"
        if not self.error <= self.max_error:
            return (
                f"its leave-one-out error {100 * self.error:.1f} points exceeds the {100 * self.max_error:.1f} allowed"
            )
        return None

    def predict(self, proxy_drop: float) -> float:
        """The final drop a candidate with this proxy drop is expected to show after the long fine-tune."""
        x = float(_transform(np.array([proxy_drop]), self.form)[0])
        return float(min(1.0, self.intercept + self.slope * x))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = {str(k): v for k, v in self.points.items()}
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Calibration:
        values = {k: record[k] for k in ("epochs", "proxy_epochs", "intercept", "slope", "error", "max_error")}
        points = {int(k): dict(v) for k, v in record.get("points", {}).items()}
        return cls(**values, points=points, form=str(record.get("form", "linear")))


FORMS = ("linear", "log")
#: The smallest share of the base's mAP50-95 the log form takes (a proxy at mAP 0 maps to -ln(1e-3) = 6.9).
_FLOOR = 1e-3


def _transform(proxy_drop: np.ndarray, form: str) -> np.ndarray:
    if form == "linear":
        return proxy_drop
    return -np.log(np.maximum(1.0 - proxy_drop, _FLOOR))


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope); a flat line through the mean when every x is the same."""
    if len(x) < 2 or float(np.ptp(x)) < 1e-9:
        return float(np.mean(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def fit(
    drops: Mapping[int, tuple[float, float]],
    *,
    epochs: int,
    proxy_epochs: int,
    max_error: float = DEFAULT_MAX_ERROR,
) -> Calibration:
    """Fit the proxy-to-final relation on ``{trial: (proxy_drop, final_drop)}``.

    Raises:
        CalibrationError: fewer than :data:`MIN_POINTS` candidates.
    """
    if len(drops) < MIN_POINTS:
        raise CalibrationError(
            f"a calibration needs at least {MIN_POINTS} long-fine-tuned candidates (two draw the line, a third "
            f"measures its error); {len(drops)} measured at {epochs} epochs. Run `yoloprune calibrate CONFIG "
            f"--candidates {max(MIN_POINTS, 4)} --epochs {epochs}`."
        )
    trials = sorted(drops)
    raw = np.array([drops[t][0] for t in trials], dtype=float)
    y = np.array([drops[t][1] for t in trials], dtype=float)
    fits = [_fit_form(trials, raw, y, form, epochs, proxy_epochs, max_error) for form in FORMS]
    # Both forms have two parameters: the leave-one-out error picks one (ties: linear, the simpler).
    return min(fits, key=lambda c: (c.slope <= 0, c.error))


def _fit_form(trials: list[int], raw: np.ndarray, y: np.ndarray, form: str, epochs: int, proxy_epochs: int,
              max_error: float) -> Calibration:  # fmt: skip
    x = _transform(raw, form)
    intercept, slope = _line(x, y)
    points: dict[int, dict[str, float]] = {}
    residuals = []
    for i, t in enumerate(trials):
        keep = np.arange(len(trials)) != i
        a, b = _line(x[keep], y[keep])
        loo = min(1.0, a + b * x[i])
        residuals.append(loo - y[i])
        points[t] = {"proxy_drop": float(raw[i]), "final_drop": float(y[i]), "loo_prediction": float(loo)}
    error = float(np.sqrt(np.mean(np.square(residuals))))
    return Calibration(epochs, proxy_epochs, intercept, slope, error, max_error, points, form)


# --- what the study stores ------------------------------------------------------------------------------


def record_long(study: optuna.Study, trial: int, epochs: int, proxy: float, final: float, **extra: Any) -> None:
    """Store one long fine-tune of ``trial`` (its proxy and final mAP50-95) on the study."""
    study.set_user_attr(f"{LONG_PREFIX}{epochs}:{trial}", {"proxy": proxy, "final": final, **extra})


def long_results(study: optuna.Study, epochs: int) -> dict[int, dict[str, float]]:
    """Stored long fine-tunes of ``epochs``: ``{trial: {"proxy", "final", ...}}``."""
    prefix = f"{LONG_PREFIX}{epochs}:"
    return {int(k.removeprefix(prefix)): dict(v) for k, v in study.user_attrs.items() if k.startswith(prefix)}


def reference(study: optuna.Study, epochs: int) -> dict[str, float] | None:
    """The unpruned base fine-tuned for ``epochs`` with the same recipe, if measured."""
    found = study.user_attrs.get(f"{REFERENCE_PREFIX}{epochs}")
    return dict(found) if found else None


def stored(study: optuna.Study) -> Calibration | None:
    record = study.user_attrs.get(STUDY_ATTR)
    return Calibration.from_dict(record) if record else None


def refit(study: optuna.Study, baseline: Mapping[str, Any], *, epochs: int, proxy_epochs: int,
          max_error: float | None = None) -> Calibration | None:  # fmt: skip
    """Fit on every stored long fine-tune of ``epochs`` and store the fit; None (nothing stored) under 3 points."""
    base = float(baseline["map50_95"])
    if base <= 0:
        return None
    found = long_results(study, epochs)
    drops = {t: (1 - r["proxy"] / base, 1 - r["final"] / base) for t, r in found.items()}
    if len(drops) < MIN_POINTS:
        return None
    previous = stored(study)
    limit = max_error if max_error is not None else previous.max_error if previous else DEFAULT_MAX_ERROR
    calibration = fit(drops, epochs=epochs, proxy_epochs=proxy_epochs, max_error=limit)
    study.set_user_attr(STUDY_ATTR, calibration.as_dict())
    return calibration


# --- judging constraints ----------------------------------------------------------------------------------


def predicted_metrics(metrics: Mapping[str, float], calibration: Calibration, base_map: float) -> dict[str, float]:
    """``metrics`` with mAP50-95 and its drop replaced by the calibration's predicted final values."""
    out = dict(metrics)
    drop = calibration.predict(float(metrics["map50_95_drop"]))
    out["map50_95_drop"] = drop
    out["map50_95"] = base_map * (1 - drop)
    return out


@dataclass(frozen=True)
class Verdict:
    """How one trial fares against the constraints: on its measured long fine-tune when it has one, else on the
    calibrated prediction when usable, else on the proxy."""

    feasible: bool
    predicted_drop: float | None
    on: str  # "measured", "calibrated" or "proxy"


def judge(
    trials: Sequence[FrozenTrial],
    constraints: Sequence[Constraint],
    calibration: Calibration | None,
    base_map: float,
    measured: Mapping[int, float] | None = None,
) -> dict[int, Verdict]:
    """Each complete trial's verdict. Cost constraints are the same either way; accuracy ones use, per trial, the
    mAP50-95 ``measured`` after the calibration's long fine-tune if there is one, else the prediction."""
    usable = calibration is not None and calibration.usable and base_map > 0
    real_map = dict(measured or {}) if calibration is not None and base_map > 0 else {}
    out: dict[int, Verdict] = {}
    for t in trials:
        rec = TrialRecord.from_frozen(t)
        if t.state != TrialState.COMPLETE or rec.metrics is None:
            continue
        metrics = rec.metrics
        if t.number in real_map and "map50_95_drop" in metrics:
            final = float(real_map[t.number])
            real = {**metrics, "map50_95": final, "map50_95_drop": 1 - final / base_map}
            feasible = all(v <= 0 for v in violations(real, constraints))
            out[t.number] = Verdict(feasible, real["map50_95_drop"], "measured")
            continue
        if not usable or "map50_95_drop" not in metrics:
            out[t.number] = Verdict(bool(rec.feasible), None, "proxy")
            continue
        if calibration is None:  # usable says it is not
            raise InternalError("a usable calibration is None.")
        predicted = predicted_metrics(metrics, calibration, base_map)
        feasible = all(v <= 0 for v in violations(predicted, constraints))
        out[t.number] = Verdict(feasible, predicted["map50_95_drop"], "calibrated")
    return out


def verdicts(study: optuna.Study, config: ExperimentConfig) -> dict[int, Verdict]:
    """:func:`judge` on a study, with its stored calibration, baseline and long fine-tunes."""
    from yoloprune.storage import Store

    base = Store(config.storage_url).baseline_of(config.name)
    calibration = stored(study)
    measured = (
        {t: r["final"] for t, r in long_results(study, calibration.epochs).items()} if calibration is not None else {}
    )
    return judge(
        study.get_trials(deepcopy=False),
        config.constraints,
        calibration,
        float((base or {}).get("map50_95", 0)),
        measured,
    )


def describe(calibration: Calibration | None, study: optuna.Study | None = None) -> list[str]:
    """Lines for ``results``: the fit, its error, and whether constraints are judged on it."""
    if calibration is None:
        return [
            "calibration: none; accuracy constraints are judged on the raw proxy. `yoloprune calibrate CONFIG` "
            "long-fine-tunes a few trials and predicts each trial's drop after the export's fine-tune"
        ]
    fit_line = (
        f"calibration ({calibration.n} trials, {calibration.proxy_epochs}-epoch proxy -> {calibration.epochs}-epoch "
        f"fine-tune): final drop = {calibration.intercept:+.3f} + {calibration.slope:.3f} x "
        f"{'proxy drop' if calibration.form == 'linear' else '-ln(1 - proxy drop)'}, "
        f"leave-one-out error {100 * calibration.error:.1f} points"
    )
    if calibration.usable:
        lines = [fit_line + "; accuracy constraints are judged on the predicted final drop"]
    else:
        lines = [
            fit_line,
            f"WARNING: calibration not used ({calibration.problem}); constraints judged on the raw proxy",
        ]
    if study is not None and (ref := reference(study, calibration.epochs)):
        lines.append(
            f"reference: the unpruned base fine-tuned {calibration.epochs} epochs the same way reaches mAP50-95 "
            f"{ref['map50_95']:.4f} (drops against it are in the calibrate output)"
        )
    return lines


# --- measuring --------------------------------------------------------------------------------------------


def choose(study: optuna.Study, candidates: int) -> list[FrozenTrial]:
    """Uniform-pruning trials first (one per cost-target value or ratio), then the best by reward."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    records = {t.number: TrialRecord.from_frozen(t) for t in finished}
    complete = [
        t
        for t in finished
        if (rec := records[t.number]).duplicate_of is None and rec.was_finetuned and rec.metrics is not None
    ]
    if len(complete) < MIN_POINTS:
        raise CalibrationError(
            f"a calibration needs at least {MIN_POINTS} complete, fine-tuned trials to long-fine-tune; "
            f"'{study.study_name}' has {len(complete)}. Run more of the search first (`yoloprune search CONFIG`)."
        )
    if candidates < MIN_POINTS:
        raise CalibrationError(f"--candidates {candidates}: a calibration needs at least {MIN_POINTS}.")
    uniform = [t for t in complete if records[t.number].uniform is not None]
    uniform.sort(key=lambda t: records[t.number].metric("map50_95_drop", 0.0))
    rest = sorted((t for t in complete if t not in uniform), key=lambda t: _reward(records[t.number]), reverse=True)
    return (uniform + rest)[:candidates]


def _reward(record: TrialRecord) -> float:
    """The trial's reward, for ranking (a trial without one last)."""
    return record.reward if record.reward is not None else float("-inf")


def measure_long(config: ExperimentConfig, trials: Sequence[FrozenTrial], epochs: int) -> dict[int, dict[str, float]]:
    """Fine-tune each trial's candidate ``epochs`` with the long fine-tune's recipe (the export's,
    ``finetune.long``); stored one by one, resumed if stored."""
    from yoloprune.experiment import open_session
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.search.optuna_engine import open_study

    if epochs <= config.finetune.epochs:
        raise ConfigError(f"--epochs {epochs} must exceed the proxy's {config.finetune.epochs} fine-tune epochs.")
    study = open_study(config, create=False)
    long = config.finetune.for_long(epochs)
    # Stored with another recipe (the config's finetune.long changed): measured again. Entries written before the
    # recipe was stored are taken as they are.
    done = {n: e for n, e in long_results(study, epochs).items() if e.get("recipe", long.overrides) == long.overrides}
    todo = [t for t in trials if t.number not in done]
    results = {t.number: done[t.number] for t in trials if t.number in done}
    if todo:
        with ultralytics_quiet():
            session = open_session(config, measure_latency=False, finetune=long)
        desc = f"long fine-tunes ({len(todo)} x {epochs} epochs)"
        with ultralytics_quiet(), progress(len(todo) * epochs, desc) as bar:
            for t in todo:
                start = time.perf_counter()
                rec = TrialRecord.from_frozen(t)
                candidate = config.space.candidate_of(t.params, rec)
                result = session.evaluator.evaluate(
                    candidate, name=f"long{epochs}_{t.number:04d}", on_epoch=epoch_progress(bar)
                )
                entry: dict[str, Any] = {
                    "proxy": rec.metric("map50_95"),
                    "final": result.raw["map50_95"],
                    "seconds": time.perf_counter() - start,
                    "recipe": long.overrides,
                }
                if rec.screen_score is not None:
                    entry["screen"] = float(rec.screen_score)
                record_long(study, t.number, epochs, **entry)
                results[t.number] = entry
                LOGGER.info(
                    "trial %d: proxy mAP50-95 %.4f, after %d epochs %.4f",
                    t.number, entry["proxy"], epochs, entry["final"],
                )  # fmt: skip
    return results


def measure_reference(config: ExperimentConfig, epochs: int, *, long: bool = True) -> dict[str, float]:
    """The unpruned base fine-tuned ``epochs`` (stored; measured once) with the long fine-tune's recipe, or the
    proxy's (``long=False``)."""
    from yoloprune.experiment import prepare
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.ultra.train import finetune

    study = open_study(config, create=False)
    recipe = config.finetune.for_long(epochs).overrides if long else dict(config.finetune.overrides)
    if (found := reference(study, epochs)) is not None and found.get("recipe", recipe) == recipe:
        return found
    exp = prepare(config)
    start = time.perf_counter()
    with ultralytics_quiet(), progress(epochs, f"reference: the base fine-tuned {epochs} epochs") as bar:
        result = finetune(
            exp.base, exp.data, epochs=epochs, imgsz=config.imgsz, batch=config.finetune.batch, device=exp.device,
            workers=config.finetune.workers, project=config.output_dir / "runs", name=f"reference{epochs}",
            keep_run=False, on_epoch=epoch_progress(bar), **recipe,
        )  # fmt: skip
    val = result.val
    value: dict[str, Any] = {
        "map50_95": float(val.map50_95 if val else result.epochs[-1]["map50_95"]),
        "map50": float(val.map50 if val else result.epochs[-1]["map50"]),
        "seconds": time.perf_counter() - start,
        "recipe": recipe,
    }
    study.set_user_attr(f"{REFERENCE_PREFIX}{epochs}", value)
    return value


@dataclass(frozen=True)
class CalibrationRun:
    """What ``yoloprune calibrate`` measured and fitted."""

    calibration: Calibration | None
    results: dict[int, dict[str, float]]
    baseline: dict[str, Any]
    reference: dict[str, float] | None
    proxy_reference: dict[str, float] | None
    error: str | None = None


def calibrate(
    config: ExperimentConfig,
    *,
    candidates: int = 4,
    epochs: int = 30,
    max_error: float = DEFAULT_MAX_ERROR,
    with_reference: bool = True,
) -> CalibrationRun:
    """Long-fine-tune ``candidates`` trials (uniform first), fit, store; the base's references too."""
    from yoloprune.search.optuna_engine import open_study
    from yoloprune.storage import Store

    study = open_study(config, create=False)
    chosen = choose(study, candidates)
    results = measure_long(config, chosen, epochs)
    baseline = Store(config.storage_url).baseline_of(config.name)
    if not baseline:
        raise ConfigError(f"experiment '{config.name}' has no baseline yet; run `yoloprune search` first.")
    ref = proxy_ref = None
    if with_reference:
        ref = measure_reference(config, epochs)
        proxy_ref = (
            measure_reference(config, config.finetune.epochs, long=False) if config.finetune.epochs > 0 else None
        )
    calibration = refit(study, baseline, epochs=epochs, proxy_epochs=config.finetune.epochs, max_error=max_error)
    problem = None
    if float(baseline["map50_95"]) <= 0:
        problem = "the baseline's mAP50-95 is 0: there is no drop to calibrate (give a trained base model)"
    elif calibration is None:
        problem = f"only {len(results)} long fine-tunes at {epochs} epochs; a calibration needs {MIN_POINTS}"
    if calibration is not None and not calibration.usable:
        LOGGER.warning("calibration not used: %s; constraints stay judged on the raw proxy", calibration.problem)
    return CalibrationRun(calibration, results, dict(baseline), ref, proxy_ref, problem)
