"""Per-stage sensitivity: prune one stage at a time, measure the accuracy it costs and what it saves, and
use that to warm-start the search with candidates that prune robust stages hard and sensitive ones little.

The scan is stored on the experiment's study (user attribute ``sensitivity``), so a later search, any
worker, and the report read it without scanning again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
from tqdm.auto import tqdm

from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.log import get_logger, progress
from yoloprune.spaces import Candidate
from yoloprune.storage.optuna_adapter import enqueue, record_baseline_latency
from yoloprune.storage.record import TrialRecord

if TYPE_CHECKING:
    from yoloprune.data.check import DatasetInfo
    from yoloprune.evaluators.proxy import ProxyEvaluator
    from yoloprune.experiment import Experiment

LOGGER = get_logger(__name__)

STUDY_ATTR = "sensitivity"


@dataclass(frozen=True)
class StageSensitivity:
    """What pruning one stage alone did (BN re-estimated, ``epochs`` of fine-tune)."""

    stage: str
    ratio: float
    map50_95: float
    map50_95_drop: float
    flops_reduction: float
    params_reduction: float
    latency_reduction: float | None  # on the first latency target, when there is one


def scan(
    config: ExperimentConfig,
    *,
    ratio: float | None = None,
    epochs: int = 0,
    exp: Experiment | None = None,
    study: optuna.Study | None = None,
) -> list[StageSensitivity]:
    """Prune each searched stage alone at ``ratio`` (default: the top of its range) and evaluate it.

    ``epochs`` of fine-tune per stage (0: BN re-estimation only, seconds per stage). The result is
    stored on the study and returned, most sensitive stage first.
    """
    from yoloprune.config.objectives import relative_metrics
    from yoloprune.experiment import prepare, start_session
    from yoloprune.offline import ultralytics_quiet
    from yoloprune.search.optuna_engine import open_study

    stages = config.space.searched()
    if not stages:
        raise ConfigError("the search space has no searched stage ratio to scan.")
    if ratio is not None and not 0 < ratio < 0.95:
        raise ConfigError(f"--ratio {ratio} must lie in (0, 0.95).")
    exp = exp or prepare(config)
    study = study or open_study(config)
    importance, round_to = config.space.importances[0], config.space.round_tos[0]
    rows = []
    with ultralytics_quiet():
        session = start_session(exp, finetune=config.finetune.model_copy(update={"epochs": epochs}))
        record_baseline_latency(study, session.baseline_latency)
    with ultralytics_quiet(), progress(len(stages), "sensitivity scan", unit="stage") as bar:
        for name, r in stages.items():
            value = r.high if ratio is None else ratio
            bar.set_postfix_str(f"{name} at {value:.2f}")
            result = session.evaluator.evaluate(Candidate({name: value}, importance, round_to), name=f"scan_{name}")
            m = relative_metrics(result.raw, session.baseline)
            latency = next((k for k in m if k.startswith("latency_reduction.")), None)
            rows.append(
                StageSensitivity(
                    name, value, m["map50_95"], m["map50_95_drop"], m["flops_reduction"], m["params_reduction"],
                    m[latency] if latency else None,
                )
            )  # fmt: skip
            LOGGER.info("stage %s at %.2f: mAP50-95 drop %.1f%%", name, value, 100 * m["map50_95_drop"])
            bar.update(1)
    rows.sort(key=lambda s: s.map50_95_drop, reverse=True)
    study.set_user_attr(STUDY_ATTR, {"epochs": epochs, "stages": [vars(s) for s in rows]})
    return rows


def stored(study: optuna.Study) -> list[StageSensitivity]:
    """The scan stored on the study ([] if none)."""
    return [StageSensitivity(**s) for s in study.user_attrs.get(STUDY_ATTR, {}).get("stages", [])]


def table(rows: list[StageSensitivity]) -> pd.DataFrame:
    out = pd.DataFrame([vars(r) for r in rows])
    for col in ("map50_95_drop", "flops_reduction", "params_reduction", "latency_reduction"):
        if col in out:
            out[col] = (100 * out[col].astype(float)).round(1)
    out = out.rename(
        columns={
            "map50_95_drop": "mAP_drop_%",
            "flops_reduction": "FLOPs_-%",
            "params_reduction": "params_-%",
            "latency_reduction": "latency_-%",
        }
    )
    return out.round(4)


def warm_start_params(config: ExperimentConfig, rows: list[StageSensitivity], n: int) -> list[dict[str, Any]]:
    """``n`` candidates from mild to aggressive; each stage's ratio falls with its sensitivity.

    A stage's sensitivity is its mAP drop per FLOP saved, scaled to [0, 1] across stages; candidate k
    (of n) prunes a stage at ``low + (high - low) * (k / n) * (1 - sensitivity)``, snapped to the grid.
    """
    stages = config.space.searched()
    by_stage = {r.stage: r for r in rows}
    missing = sorted(set(stages) - set(by_stage))
    if missing:
        raise ConfigError(
            f"the stored sensitivity scan lacks stage(s) {', '.join(missing)}; run `yoloprune sensitivity CONFIG` again."
        )
    cost = {s: by_stage[s].map50_95_drop / max(by_stage[s].flops_reduction, 1e-6) for s in stages}
    lo, hi = min(cost.values()), max(cost.values())
    scaled = {s: (c - lo) / (hi - lo) if hi > lo else 0.5 for s, c in cost.items()}
    out = []
    for k in range(1, n + 1):
        strength = k / n
        params: dict[str, Any] = {
            f"ratio.{s}": r.low + (r.high - r.low) * strength * (1.0 - scaled[s]) for s, r in stages.items()
        }
        for key, choices in (("importance", config.space.importance), ("round_to", config.space.round_to)):
            if isinstance(choices, list):
                params[key] = choices[0]
        out.append(config.space.snap(params))
    return out


def enqueue_warm_start(study: optuna.Study, exp: Experiment, n: int) -> list[dict[str, Any]]:
    """Queue ``n`` sensitivity-guided candidates (once per experiment); scans first if no scan is stored."""
    if any(TrialRecord.from_frozen(t).warm_start for t in study.get_trials(deepcopy=False)):
        return []
    config = exp.config
    rows = stored(study) or scan(config, exp=exp, study=study)
    params = warm_start_params(config, rows, n)
    for k, p in enumerate(params, start=1):
        enqueue(study, p, TrialRecord(warm_start=k))
    return params


CURVE_PREFIX = "sensitivity_curve:"


def measure_curves(
    config: ExperimentConfig,
    evaluator: ProxyEvaluator,
    study: optuna.Study,
    subset: DatasetInfo,
    *,
    points: int = 4,
    progress: bool = True,
) -> dict[str, list[tuple[float, float]]]:
    """Per-stage sensitivity curves for the ``sensitivity`` method: each searched stage pruned alone at
    ``points`` ratios across its range, BN re-estimated, validated on ``subset``; returns, per stage, the
    (ratio, relative mAP50-95 drop) points, the drop made non-decreasing in the ratio.

    Every score is stored on the study as it is measured (``sensitivity_curve:<stage>:<ratio>``), so an
    interrupted measurement resumes where it stopped.
    """
    stages = config.space.searched()
    importance, round_to = config.space.importances[0], config.space.round_tos[0]
    stored = study.user_attrs
    plan: list[tuple[str, float]] = [("base", 0.0)]
    for name, r in stages.items():
        plan += [(name, round(r.low + (r.high - r.low) * k / max(points - 1, 1), 4)) for k in range(points)]
    scores: dict[tuple[str, float], float] = {}
    keys = {point: CURVE_PREFIX + ("base" if point[0] == "base" else f"{point[0]}:{point[1]}") for point in plan}
    todo = sum(1 for key in keys.values() if key not in stored)
    bar = tqdm(total=len(plan), initial=len(plan) - todo, desc="sensitivity curves", unit="point",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    with bar:
        for (stage, ratio), key in keys.items():
            if key in stored:
                scores[stage, ratio] = float(stored[key])
                continue
            candidate = Candidate({} if stage == "base" else {stage: ratio}, importance, round_to)
            scores[stage, ratio], _ = evaluator.screen_score(candidate, subset)
            study.set_user_attr(key, scores[stage, ratio])
            bar.update(1)
            bar.set_postfix_str(f"{key.removeprefix(CURVE_PREFIX)} mAP50-95 {scores[stage, ratio]:.3f}")
    base = scores["base", 0.0]
    curves: dict[str, list[tuple[float, float]]] = {}
    for name in stages:
        drops, worst = [], 0.0
        for ratio, score in sorted((r, v) for (s, r), v in scores.items() if s == name):
            worst = max(worst, 1.0 - score / base if base > 0 else 0.0)
            drops.append((ratio, worst))
        curves[name] = drops
        LOGGER.info("stage %s: mAP50-95 drop %s", name, ", ".join(f"{100 * d:.1f}% at {r}" for r, d in drops))
    return curves
