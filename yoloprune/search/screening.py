"""Cheap screening (EagleEye's adaptive-BN evaluation): score many candidates on their cost target in seconds
each, fine-tune only the best.

``engine.screen.candidates`` allocations are drawn at random from the space (seeded), put on the cost
target (values taken in turn), pruned, their BN statistics re-estimated and validated on a fixed subset of
``images`` held-out training images (not those BN re-estimation reads, and never the validation set). The
best ``keep`` at each target value are queued as the search's first trials after uniform, tagged with their
screening rank and score. Every score is stored on the study as it is computed (user attributes
``screen:<i>``), so an interrupted screening resumes where it stopped. After the search, the screening's
rank agreement with the proxy (Kendall tau, p-value, n) is stored as ``screen_fidelity``; ``yoloprune
fidelity`` adds its agreement with a long fine-tune.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from yoloprune.config import ExperimentConfig
from yoloprune.data.check import DatasetInfo
from yoloprune.errors import InternalError
from yoloprune.log import get_logger
from yoloprune.search.methods import TARGET_PARAM
from yoloprune.search.targeting import Targeting
from yoloprune.spaces import SearchSpace
from yoloprune.storage.optuna_adapter import enqueue
from yoloprune.storage.record import TrialRecord

if TYPE_CHECKING:
    from yoloprune.evaluators.proxy import ProxyEvaluator

LOGGER = get_logger(__name__)

PREFIX = "screen:"
FIDELITY_ATTR = "screen_fidelity"


def random_params(space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    """One allocation drawn uniformly from the space (on each stage's grid where it has a step)."""
    params: dict[str, Any] = {}
    for name, r in space.searched().items():
        params[f"ratio.{name}"] = rng.choice(r.values()) if r.step is not None else round(rng.uniform(r.low, r.high), 6)
    for key, choices in (("importance", space.importance), ("round_to", space.round_to)):
        if isinstance(choices, list):
            params[key] = rng.choice(choices)
    return params


def screen(
    config: ExperimentConfig,
    targeting: Targeting,
    evaluator: ProxyEvaluator,
    study: optuna.Study,
    subset: DatasetInfo,
    *,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score every screening candidate (resuming from the study's stored scores); returns their records."""
    cfg = config.engine.screen
    if cfg is None:
        raise InternalError("screening without engine.screen in the config.")
    rng = random.Random(cfg.seed)
    proposals = [random_params(config.space, rng) for _ in range(cfg.candidates)]
    values = targeting.values
    stored = study.user_attrs
    records: list[dict[str, Any]] = []
    todo = sum(1 for i in range(len(proposals)) if f"{PREFIX}{i}" not in stored)
    bar = tqdm(total=len(proposals), initial=len(proposals) - todo, desc="screening", unit="cand",
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    with bar:
        for i, params in enumerate(proposals):
            key = f"{PREFIX}{i}"
            record = stored.get(key)
            if record is None:
                record = _score(config, targeting, evaluator, subset, params, values[i % len(values)])
                study.set_user_attr(key, record)
                bar.update(1)
                if record["score"] is not None:
                    bar.set_postfix_str(f"mAP50-95 {record['score']:.3f}")
            records.append({**record, "index": i})
    return records


def _score(
    config: ExperimentConfig,
    targeting: Targeting,
    evaluator: ProxyEvaluator,
    subset: DatasetInfo,
    params: dict[str, Any],
    value: float,
) -> dict[str, Any]:
    proposal = config.space.candidate_from_params(params)
    landing = targeting.land(config.engine.sampler, proposal, value)
    record: dict[str, Any] = {"params": params, "value": value, "achieved": landing.achieved, "score": None}
    if not landing.on_target:
        return record
    candidate = targeting.landed(config.engine.sampler, proposal, landing)
    score, seconds = evaluator.screen_score(candidate, subset)
    return {**record, "ratios": candidate.ratios, "score": score, "seconds": seconds}


def enqueue_best(study: optuna.Study, config: ExperimentConfig, records: list[dict[str, Any]]) -> list[int]:
    """Queue the best ``keep`` screened candidates at each target value (once); returns their indices."""
    cfg = config.engine.screen
    if cfg is None:
        raise InternalError("screening without engine.screen in the config.")
    queued_before = {TrialRecord.from_frozen(t).screen_index for t in study.get_trials(deepcopy=False)}
    several = config.cost_target is not None and len(config.cost_target.values) > 1
    queued = []
    for value in sorted({r["value"] for r in records}):
        scored = [r for r in records if r["value"] == value and r["score"] is not None]
        for rank, r in enumerate(sorted(scored, key=lambda r: r["score"], reverse=True)[: cfg.keep], start=1):
            if r["index"] in queued_before:
                continue
            params = {**r["params"], **({TARGET_PARAM: value} if several else {})}
            enqueue(study, params, TrialRecord(screen_index=r["index"], screen_rank=rank, screen_score=r["score"]))
            queued.append(r["index"])
    return queued


def agreement(study: optuna.Study) -> list[dict[str, float]]:
    """Kendall tau (p-value, n) between screening score and proxy mAP50-95, per target value, over the
    complete trials that were screened; stored on the study."""
    from yoloprune.search.fidelity import rank_agreement

    by_value: dict[float, list[tuple[float, float]]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rec = TrialRecord.from_frozen(t)
        score = rec.screen_score
        if score is None or rec.duplicate_of is not None:
            continue
        value = float((rec.target or {}).get("value", 0.0))
        by_value.setdefault(value, []).append((score, rec.metric("map50_95")))
    out = []
    for value, pairs in sorted(by_value.items()):
        if len(pairs) >= 3:
            out.append({"value": value, **rank_agreement([p[0] for p in pairs], [p[1] for p in pairs])})
    if out:
        study.set_user_attr(FIDELITY_ATTR, out)
    return out


def describe(records: list[dict[str, Any]]) -> str:
    """One line per target value: the screening's rank agreement with the proxy."""
    from yoloprune.search.fidelity import describe_agreement

    return "; ".join(
        f"screening vs proxy at {r['value']}: {describe_agreement(r['tau'], r['p'], r['n'])}" for r in records
    )
