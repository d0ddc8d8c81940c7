"""The search space: a ratio range per stage plus categorical knobs, as in an experiment YAML::

space:
  ratios:
    backbone.p3: {low: 0.2, high: 0.6, step: 0.05}
    backbone.p4: {low: 0.2, high: 0.6}
    neck: 0.4                      # a fixed value
  importance: [l1, bn_scale]       # categorical, or one value
  round_to: [1, 8]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from yoloprune.errors import SearchSpaceError, did_you_mean
from yoloprune.registry import IMPORTANCES

if TYPE_CHECKING:
    from yoloprune.storage.record import TrialRecord

MAX_RATIO = 0.95


class Suggester(Protocol):
    """What a search engine offers to sample one value (Optuna's Trial fits it)."""

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None) -> float: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


class RatioRange(BaseModel):
    """A pruning-ratio range ``[low, high]``, optionally on a grid of ``step``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    step: float | None = None

    @model_validator(mode="after")
    def _check(self) -> RatioRange:
        if not (0.0 <= self.low < MAX_RATIO and 0.0 <= self.high < MAX_RATIO):
            raise ValueError(f"ratio range [{self.low}, {self.high}] must lie inside [0, {MAX_RATIO})")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is greater than high {self.high}")
        if self.step is not None and not 0 < self.step <= max(self.high - self.low, self.step):
            raise ValueError(f"step {self.step} must be > 0")
        return self

    def values(self) -> list[float]:
        """Grid values (with ``step``), or low/mid/high without one."""
        if self.step is None:
            return sorted({self.low, round((self.low + self.high) / 2, 4), self.high})
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + i * self.step, 6) for i in range(n + 1)]


class SearchSpace(BaseModel):
    """Per-stage ratio ranges and categorical knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratios: dict[str, RatioRange | float]
    importance: list[str] | str = "l1"
    round_to: list[int] | int = 1

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v: dict[str, RatioRange | float]) -> dict[str, RatioRange | float]:
        if not v:
            raise ValueError("give at least one stage ratio range")
        for name, r in v.items():
            if isinstance(r, float) and not 0.0 <= r < MAX_RATIO:
                raise ValueError(f"fixed ratio {r} for '{name}' is outside [0, {MAX_RATIO})")
        return v

    @field_validator("importance")
    @classmethod
    def _importance(cls, v: list[str] | str) -> list[str] | str:
        for name in [v] if isinstance(v, str) else v:
            IMPORTANCES.check(name)
        return v

    @field_validator("round_to")
    @classmethod
    def _round_to(cls, v: list[int] | int) -> list[int] | int:
        if any(r < 1 for r in ([v] if isinstance(v, int) else v)):
            raise ValueError("round_to values must be >= 1")
        return v

    def searched(self) -> dict[str, RatioRange]:
        """The stages a search allocates: ratio ranges with ``low < high``."""
        return {n: r for n, r in self.ratios.items() if isinstance(r, RatioRange) and r.low != r.high}

    def fixed(self) -> dict[str, float]:
        """The stages every candidate prunes at one value."""
        return {
            n: (r.low if isinstance(r, RatioRange) else float(r))
            for n, r in self.ratios.items()
            if n not in self.searched()
        }

    @property
    def importances(self) -> list[str]:
        """The importance criteria a candidate may use (the first is the default)."""
        return [self.importance] if isinstance(self.importance, str) else list(self.importance)

    @property
    def round_tos(self) -> list[int]:
        """The ``round_to`` values a candidate may use (the first is the default)."""
        return [self.round_to] if isinstance(self.round_to, int) else list(self.round_to)

    def check_stages(self, stage_names: Sequence[str]) -> None:
        """Raise :class:`SearchSpaceError` for a stage the model does not have (or the head)."""
        for name in self.ratios:
            if name not in stage_names:
                hint = did_you_mean(name, stage_names)
                raise SearchSpaceError(
                    f"search space names stage '{name}', which this model does not have.{hint} "
                    f"Valid stages: {', '.join(stage_names)}."
                )

    def suggest(self, trial: Suggester) -> Candidate:
        """Sample one candidate through ``trial`` (parameter names ``ratio.<stage>``, ``importance``, ``round_to``)."""
        ratios: dict[str, float] = {}
        for name, r in self.ratios.items():
            if isinstance(r, RatioRange):
                ratios[name] = (
                    r.low if r.low == r.high else trial.suggest_float(f"ratio.{name}", r.low, r.high, step=r.step)
                )
            else:
                ratios[name] = float(r)
        importance = (
            self.importance
            if isinstance(self.importance, str)
            else trial.suggest_categorical("importance", self.importance)
        )
        round_to = (
            self.round_to if isinstance(self.round_to, int) else trial.suggest_categorical("round_to", self.round_to)
        )
        return Candidate(ratios, str(importance), int(round_to))

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter's grid values, for a grid sampler."""
        grid: dict[str, list[Any]] = {f"ratio.{n}": r.values() for n, r in self.searched().items()}
        if isinstance(self.importance, list):
            grid["importance"] = list(self.importance)
        if isinstance(self.round_to, list):
            grid["round_to"] = list(self.round_to)
        return grid

    def snap(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` from another engine (NNI) moved onto this space's grid and bounds.

        Raises :class:`SearchSpaceError` for a missing parameter or a categorical value not in the space.
        """
        out: dict[str, Any] = {}
        for name, r in self.searched().items():
            key = f"ratio.{name}"
            if key not in params:
                raise SearchSpaceError(f"parameters {sorted(params)} lack '{key}'; they do not come from this space.")
            value = min(max(float(params[key]), r.low), r.high)
            if r.step is not None:
                steps = math.floor((r.high - r.low) / r.step + 1e-9)
                value = r.low + min(round((value - r.low) / r.step), steps) * r.step
            out[key] = round(value, 6)
        for key, choices in (("importance", self.importance), ("round_to", self.round_to)):
            if isinstance(choices, list):
                if params.get(key) not in choices:
                    raise SearchSpaceError(f"'{key}' = {params.get(key)!r} is not one of {choices}.")
                out[key] = params[key]
        return out

    def candidate_from_params(self, params: dict[str, Any]) -> Candidate:
        """Rebuild the candidate a trial sampled from its stored parameters."""
        return self.suggest(_Replay(params))

    def candidate_of(self, params: dict[str, Any], record: TrialRecord) -> Candidate:
        """The candidate a trial evaluated: the one its record holds (landed on a cost target, say), else its
        parameters'."""
        recorded = record.candidate
        if isinstance(recorded, dict) and "ratios" in recorded:
            return Candidate(
                {k: float(v) for k, v in recorded["ratios"].items()},
                str(recorded.get("importance", "l1")),
                int(recorded.get("round_to", 1)),
                bool(recorded.get("global_ranking", False)),
            )
        return self.candidate_from_params(params)


@dataclass(frozen=True)
class Candidate:
    """One point of the space: what to prune and how."""

    ratios: dict[str, float]
    importance: str = "l1"
    round_to: int = 1
    global_ranking: bool = False  # Torch-Pruning's global pruning over the stages named (the tp_global method)

    def key(self) -> str:
        """A stable text key of the candidate (same candidate, same key)."""
        return json.dumps(
            {
                "ratios": {k: round(v, 6) for k, v in sorted(self.ratios.items())},
                "importance": self.importance,
                "round_to": self.round_to,
                **({"global_ranking": True} if self.global_ranking else {}),
            },
            sort_keys=True,
        )

    def as_dict(self) -> dict[str, Any]:
        """What a trial records (and :meth:`SearchSpace.candidate_of` reads back)."""
        out: dict[str, Any] = {"ratios": self.ratios, "importance": self.importance, "round_to": self.round_to}
        return {**out, "global_ranking": True} if self.global_ranking else out


class _Replay:
    """A Suggester that answers from stored parameters."""

    def __init__(self, params: dict[str, Any]) -> None:
        self._params = params

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None) -> float:
        return float(self._params[name])

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._params[name]
