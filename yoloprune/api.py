"""The Python facade, shaped like Ultralytics' and Optuna's: ``yoloprune.search``, ``yoloprune.prune`` and
``yoloprune.load_detector``, composing the functions the CLI composes (nothing here is computed twice).

``yoloprune.search`` is also the name of the package of search engines, so that package is made callable here:
``yoloprune.search("exp.yaml")`` runs :func:`search`, and ``yoloprune.search.results`` is still the module.
A function bound to the name instead would break ``import yoloprune.search.results as r``.

Nothing heavy is imported until a function is called: ``import yoloprune`` loads no ML library.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yoloprune.search as _search_package
from yoloprune.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    from optuna.trial import FrozenTrial
    from torch import nn

    from yoloprune.config import ExperimentConfig
    from yoloprune.deploy.export import ExportResult
    from yoloprune.search.report import Report
    from yoloprune.search.selection import Policy
    from yoloprune.spaces import Candidate
    from yoloprune.storage.record import TrialRecord
    from yoloprune.ultra.models import DetectionModel


def search(
    config: str | Path | ExperimentConfig,
    *,
    progress: bool = True,
    verbose: bool = False,
    uniform: Sequence[float] = (),
    warm_start: int = 0,
    **overrides: Any,
) -> SearchResult:
    """Run (or resume) the search a config describes, as ``yoloprune search`` does; returns its result.

    Args:
        config: an experiment YAML, or an :class:`~yoloprune.config.ExperimentConfig` (then no overrides).
        progress: progress bars. ``verbose``: Ultralytics' and Optuna's own output.
        uniform: ratios of the uniform-pruning baseline, evaluated first (``--uniform``).
        warm_start: candidates from the per-stage sensitivity scan, evaluated first (``--warm-start``).
        **overrides: config changes. A section as a mapping merges into it (``budget={"trials": 5}``); a dotted
            key sets one value (``**{"finetune.epochs": 1}``), as ``key=value`` on the command line does.

    Example:
        >>> import yoloprune
        >>> result = yoloprune.search("experiments/demo.yaml", budget={"trials": 20})  # doctest: +SKIP
        >>> result.front[["trial", "map50_95", "gflops"]]  # doctest: +SKIP
    """
    from yoloprune.search.runner import run_search

    cfg = _config(config, overrides)
    study = run_search(cfg, progress=progress, verbose=verbose, uniform=uniform, warm_start=warm_start)
    return SearchResult(cfg, study)


def prune(
    model: str | Path | nn.Module,
    ratios: Mapping[str, float] | float,
    *,
    importance: str = "l1",
    round_to: int = 1,
    global_ranking: bool = False,
    seed: int | None = 0,
) -> DetectionModel:
    """A pruned copy of a detector, one ratio per stage (a float: the same ratio on every prunable stage).

    Args:
        model: an ``ultralytics.YOLO``, a ``.pt`` path, a model YAML, or a ``DetectionModel``; never modified.
        ratios: e.g. ``{"backbone.p4": 0.3, "neck": 0.5}`` (stage names: ``yoloprune stages MODEL``), or ``0.3``.
        importance, round_to, global_ranking, seed: as :func:`yoloprune.pruning.prune`.

    Returns:
        The pruned ``DetectionModel``, stock Ultralytics modules only; fine-tune it before use.

    Example:
        >>> from ultralytics import YOLO
        >>> pruned = yoloprune.prune(YOLO("best.pt"), {"backbone.p4": 0.3, "neck": 0.5})  # doctest: +SKIP
    """
    from yoloprune.pruning import find_stages
    from yoloprune.pruning import prune as prune_model
    from yoloprune.ultra.models import load_detector

    detector = load_detector(model)
    if not isinstance(ratios, Mapping):
        ratios = {s.name: float(ratios) for s in find_stages(detector) if s.prunable}
    return prune_model(detector, ratios, importance, round_to, seed=seed, global_ranking=global_ranking)


@dataclass(frozen=True)
class TrialResult:
    """One trial of a search: its number, measured metrics, the candidate it evaluated, and its stored record."""

    number: int
    metrics: dict[str, float]
    candidate: Candidate
    record: TrialRecord
    trial: FrozenTrial

    @property
    def ratios(self) -> dict[str, float]:
        return self.candidate.ratios


@dataclass(frozen=True)
class SearchResult:
    """A search's trials in storage, read on each access (a search still running elsewhere shows its progress)."""

    config: ExperimentConfig
    study: optuna.Study

    @classmethod
    def load(cls, config: str | Path | ExperimentConfig, **overrides: Any) -> SearchResult:
        """The result of a search run earlier (by the CLI, a worker, or :func:`search`)."""
        from yoloprune.search.optuna_engine import open_study

        cfg = _config(config, overrides)
        return cls(cfg, open_study(cfg, create=False))

    @property
    def trials(self) -> pd.DataFrame:
        """Every trial, one row each, feasibility judged as ``yoloprune results`` judges it."""
        from yoloprune.search.results import judged_frame

        return judged_frame(self.study, self.config)

    @property
    def front(self) -> pd.DataFrame:
        """The feasible Pareto front on the config's objectives, best reward first (``yoloprune results``)."""
        from yoloprune.search.results import pareto_front

        return pareto_front(self.trials, self.config, self.study)

    @property
    def best(self) -> TrialResult:
        """The trial ``export --trial best`` ships: the fastest feasible one (see :meth:`select`); a
        :class:`~yoloprune.errors.ConfigError` when no trial is feasible."""
        return self.select()

    def select(
        self, trial: int | str = "best", *, policy: Policy = "fastest", latency_budget_ms: float | None = None
    ) -> TrialResult:
        """A trial by number, or ``best`` by ``policy`` (:func:`yoloprune.search.selection.select_trial`)."""
        from yoloprune.search.selection import select_trial
        from yoloprune.storage.record import TrialRecord

        chosen = select_trial(self.study, self.config, str(trial), policy=policy, latency_budget_ms=latency_budget_ms)
        record = TrialRecord.from_frozen(chosen)
        candidate = self.config.space.candidate_of(chosen.params, record)
        return TrialResult(chosen.number, dict(record.metrics or {}), candidate, record, chosen)

    def report(self, path: str | Path | None = None, *, trial: int | None = None) -> Report:
        """Write the HTML report (default ``<output>/report.html``) and ``trials.csv`` (``yoloprune report``)."""
        from yoloprune.search.report import write_report

        return write_report(self.config, output=Path(path) if path else None, trial=trial)

    def export(
        self,
        trial: int | str = "best",
        *,
        epochs: int = 30,
        output: str | Path | None = None,
        policy: Policy = "fastest",
        latency_budget_ms: float | None = None,
        dynamic: bool = False,
        engine: bool = False,
        int8: bool = False,
        fresh: bool = False,
    ) -> ExportResult:
        """Rebuild a trial's model, fine-tune it ``epochs``, write ``.pt``, ``.onnx`` and a model card, as
        ``yoloprune export`` does (default folder ``<output>/export``); the options are the command's flags."""
        from yoloprune.deploy.export import export_trial

        chosen = self.select(trial, policy=policy, latency_budget_ms=latency_budget_ms).trial
        folder = Path(output) if output else self.config.output_dir / "export"
        return export_trial(
            self.config, chosen, epochs=epochs, output=folder, dynamic=dynamic, engine=engine, int8=int8, fresh=fresh
        )

    def __repr__(self) -> str:
        return (
            f"SearchResult({self.config.name!r}, {len(self.study.trials)} trials, storage {self.config.storage_url!r})"
        )


def _config(config: str | Path | ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """The config, with ``overrides``: sections merged (:func:`load_config`'s ``overrides``), dotted keys assigned."""
    from yoloprune.config import ExperimentConfig, load_config

    if isinstance(config, ExperimentConfig):
        if overrides:
            raise ConfigError(
                f"overrides ({', '.join(overrides)}) apply to a config file: pass its path, or change the "
                "ExperimentConfig with config.model_copy(update={...})."
            )
        return config
    sections = {k: v for k, v in overrides.items() if "." not in k}
    assignments = [(k, v) for k, v in overrides.items() if "." in k]
    return load_config(config, sections, assignments)


class _CallableSearchPackage(types.ModuleType):
    """The ``yoloprune.search`` package, which called runs :func:`yoloprune.api.search`."""

    def __call__(self, config: str | Path | ExperimentConfig, /, **kwargs: Any) -> SearchResult:
        return search(config, **kwargs)


_search_package.__class__ = _CallableSearchPackage
