"""Proxy fidelity: how far to trust a short fine-tune's ranking of candidates.

Re-trains the top trials (by reward) and a random sample of the others with a long fine-tune, and
reports the Kendall rank correlation between the proxy's mAP50-95 and the long fine-tune's. Stored on
the study (user attribute ``fidelity``), so ``results`` and the report show it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from yoloprune.config import ExperimentConfig
from yoloprune.errors import ConfigError
from yoloprune.log import get_logger
from yoloprune.storage.record import TrialRecord

LOGGER = get_logger(__name__)

STUDY_ATTR = "fidelity"


@dataclass(frozen=True)
class Fidelity:
    tau: float
    n: int
    epochs: int
    proxy_epochs: int
    trials: dict[int, dict[str, float]]  # trial -> {"proxy": mAP50-95, "long": mAP50-95[, "screen": score]}
    p: float = float("nan")
    screen: dict[str, float] | None = None  # the screening score's tau, p, n against the long fine-tune


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b (SciPy's)."""
    return rank_agreement(x, y)["tau"]


def rank_agreement(x: list[float], y: list[float]) -> dict[str, float]:
    """Kendall's tau-b between two rankings, with its two-sided p-value and the number of pairs of values.

    With 5 values a perfect agreement already has p = 0.017 and tau 0.8 has p = 0.08: small n says little.
    """
    from scipy.stats import kendalltau

    if len(x) != len(y) or len(x) < 2:
        raise ValueError("kendall_tau needs two lists of the same length, at least 2")
    result = kendalltau(x, y)
    return {"tau": float(result.statistic), "p": float(result.pvalue), "n": len(x)}


def choose(study: optuna.Study, top: int, sample: int, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """The ``top`` complete trials by reward and ``sample`` others at random (duplicates excluded)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    records = {t.number: TrialRecord.from_frozen(t) for t in finished}
    complete = [t for t in finished if records[t.number].duplicate_of is None and records[t.number].was_finetuned]
    if len(complete) < 3:
        raise ConfigError(
            f"proxy fidelity needs at least 3 complete, fine-tuned trials; '{study.study_name}' has {len(complete)}."
        )
    ranked = sorted(complete, key=lambda t: _reward(records[t.number]), reverse=True)
    chosen, rest = ranked[:top], ranked[top:]
    chosen += random.Random(seed).sample(rest, min(sample, len(rest)))
    if len(chosen) < 3:
        raise ConfigError(f"--top {top} and --random {sample} choose {len(chosen)} trials; choose at least 3.")
    return chosen


def _reward(record: TrialRecord) -> float:
    """The trial's reward, for ranking (a trial without one last)."""
    return record.reward if record.reward is not None else float("-inf")


def measure(config: ExperimentConfig, *, top: int = 3, sample: int = 3, epochs: int = 20) -> Fidelity:
    """Re-train the chosen trials for ``epochs`` (each stored as it finishes), compute Kendall's tau, store it."""
    from yoloprune.search.calibration import measure_long
    from yoloprune.search.optuna_engine import open_study

    study = open_study(config, create=False)
    chosen = choose(study, top, sample, seed=config.engine.seed or 0)
    measured = measure_long(config, chosen, epochs)  # refuses epochs not above the proxy's
    results: dict[int, dict[str, float]] = {}
    for number, r in measured.items():
        results[number] = {
            "proxy": r["proxy"],
            "long": r["final"],
            **({"screen": r["screen"]} if "screen" in r else {}),
        }
    agreement = rank_agreement([r["proxy"] for r in results.values()], [r["long"] for r in results.values()])
    screened = [r for r in results.values() if "screen" in r]
    screen = (
        rank_agreement([r["screen"] for r in screened], [r["long"] for r in screened]) if len(screened) >= 3 else None
    )
    fidelity = Fidelity(agreement["tau"], len(results), epochs, config.finetune.epochs, results, agreement["p"], screen)
    study.set_user_attr(STUDY_ATTR, {**asdict(fidelity), "trials": {str(k): v for k, v in results.items()}})
    return fidelity


def stored(study: optuna.Study) -> dict[str, Any] | None:
    return study.user_attrs.get(STUDY_ATTR)


def describe_agreement(tau: float, p: float, n: int) -> str:
    """``Kendall tau 0.80 (p = 0.08, n = 5)``: every place that shows a tau shows its p-value and n with it."""
    if not math.isfinite(tau):
        return f"Kendall tau n/a (p n/a, n = {n}: every value tied)"
    return f"Kendall tau {tau:.2f} ({format_p(p)}, n = {n})"


def format_p(p: float) -> str:
    """A p-value as text: two decimals, three under 0.01, ``p < 0.001`` below that."""
    if not math.isfinite(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def describe(record: dict[str, Any]) -> str:
    """The stored fidelity as one line, tau with its p-value and n (recomputed from the stored trials for a
    record written before the p-value was stored)."""
    pairs = [(float(r["proxy"]), float(r["long"])) for r in record.get("trials", {}).values()]
    p = record.get("p")
    if (p is None or not math.isfinite(p)) and len(pairs) >= 2:
        p = rank_agreement([a for a, _ in pairs], [b for _, b in pairs])["p"]
    text = (
        f"proxy fidelity: {describe_agreement(record['tau'], math.nan if p is None else p, record['n'])} between "
        f"{record['proxy_epochs']}-epoch proxy and {record['epochs']}-epoch mAP50-95 over {record['n']} trials"
    )
    if p is not None and math.isfinite(p) and p >= 0.05:
        text += " (not significant: too few trials to trust the ranking; `fidelity --top/--random` measures more)"
    screen = record.get("screen")
    if screen:
        text += (
            f"; screening score vs {record['epochs']}-epoch: "
            f"{describe_agreement(screen['tau'], screen['p'], screen['n']).removeprefix('Kendall ')}"
        )
    return text
