"""The trial record: every attribute a trial stores in the study, with its type, in one place.

A trial's attributes live in Optuna's storage as JSON user attributes, written in a few steps (what was
queued, what was pruned, what it measured). Every reader and writer goes through :class:`TrialRecord`, so
the keys are spelt once; ``tests/test_record.py`` fails when a module reads or writes a bare key.

Studies written by older versions still read: a missing key is ``None``, and a key this version does not
know is kept in :attr:`TrialRecord.extra` and written back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

#: What a finished trial measured: copied from a twin trial that evaluated the same candidate.
RESULT_FIELDS = ("metrics", "per_class", "feasible", "finetuned", "latency", "reward", "epochs")


@dataclass
class TrialRecord:
    """A trial's stored attributes; ``None`` means not written (yet, or by an older version).

    Attributes:
        candidate: what was pruned (:meth:`yoloprune.spaces.Candidate.as_dict`).
        candidate_key: the candidate's stable text key (twin trials share it).
        worker: the process that ran the trial, ``{"host", "pid"}``.
        engine: ``"nni"`` for a trial NNI proposed (absent: Optuna's).
        nni: NNI's ids for the trial, ``{"experiment", "trial_job"}``.
        method: the search method that proposed the candidate (``uniform``, ``sensitivity``, ``tpe``...).
        target_value: the cost-target value a queued candidate was put on.
        proposal: the ratios proposed before they were landed on the cost target.
        target: where the candidate landed: ``{"metric", "value", "achieved", "tolerance", "on_target", ...}``.
        uniform: the single ratio of a uniform-pruning candidate.
        warm_start: rank of a sensitivity-guided candidate queued first (``--warm-start``).
        screen_index, screen_rank, screen_score: a screened candidate's index among those drawn, its rank and
            its adaptive-BN score.
        retry_of: the interrupted trial this one runs again.
        metrics: the candidate's metrics relative to the baseline (``map50_95``, ``flops_reduction``...).
        per_class: per-class AP.
        feasible: every constraint satisfied.
        finetuned: fine-tuned (False: skipped as infeasible on cost after BN re-estimation).
        reward: the scalar reward.
        latency: per-target latency details.
        constraints: each constraint's violation (<= 0: satisfied), in the config's order.
        epochs: the fine-tune's per-epoch metrics.
        timings: seconds per phase, and ``total``.
        duplicate_of: the twin trial whose results this trial reuses.
        error: why the trial failed.
        interrupted: stopped by the user (Ctrl-C, SIGTERM); queued again on resume.
        stop_search: the trial's failure stopped the search (a latency target's ``on_error: stop``).
        extra: keys this version does not know, kept as they are.
    """

    candidate: dict[str, Any] | None = None
    candidate_key: str | None = None
    worker: dict[str, Any] | None = None
    engine: str | None = None
    nni: dict[str, Any] | None = None
    method: str | None = None
    target_value: float | None = None
    proposal: dict[str, float] | None = None
    target: dict[str, Any] | None = None
    uniform: float | None = None
    warm_start: int | None = None
    screen_index: int | None = None
    screen_rank: int | None = None
    screen_score: float | None = None
    retry_of: int | None = None
    metrics: dict[str, float] | None = None
    per_class: dict[str, Any] | None = None
    feasible: bool | None = None
    finetuned: bool | None = None
    reward: float | None = None
    latency: dict[str, Any] | None = None
    constraints: list[float] | None = None
    epochs: list[dict[str, float]] | None = None
    timings: dict[str, float] | None = None
    duplicate_of: int | None = None
    error: str | None = None
    interrupted: bool | None = None
    stop_search: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """Every attribute name a trial may store."""
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialRecord:
        """The record of stored user attributes (unknown keys go to :attr:`extra`)."""
        known = set(cls.keys())
        return cls(
            **{k: v for k, v in attrs.items() if k in known},
            extra={k: v for k, v in attrs.items() if k not in known},
        )

    @classmethod
    def from_frozen(cls, trial: Any) -> TrialRecord:
        """The record of a trial read from the study (an Optuna ``FrozenTrial`` or ``Trial``)."""
        return cls.from_attrs(dict(trial.user_attrs))

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes to store: the fields that are set, and :attr:`extra`."""
        out = {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}
        return {**self.extra, **out}

    def results(self) -> TrialRecord:
        """Only what the trial measured (:data:`RESULT_FIELDS`): what a twin trial copies."""
        return TrialRecord(**{k: getattr(self, k) for k in RESULT_FIELDS})

    def metric(self, name: str, default: float = math.nan) -> float:
        """One relative metric (``default`` when the trial has none)."""
        return float((self.metrics or {}).get(name, default))

    @property
    def target_on(self) -> bool:
        """The candidate landed on its cost target."""
        return bool((self.target or {}).get("on_target"))

    @property
    def was_finetuned(self) -> bool:
        """Fine-tuned, or written before the flag existed (older records fine-tuned every candidate)."""
        return self.finetuned is not False


#: Study-level attributes (``study.user_attrs``) with one fixed key. Prefixed and module-owned keys
#: (screening, sensitivity, calibration, fidelity) are named by their modules' ``*_ATTR``/``*_PREFIX`` constants.
BASELINE_LATENCY = "baseline_latency"
