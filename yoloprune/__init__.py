"""yoloprune: automated per-stage structured-pruning search for Ultralytics YOLO detectors.

The Python API, shaped like Ultralytics' and Optuna's (the CLI's commands, composed the same way)::

    import yoloprune
    from ultralytics import YOLO

    result = yoloprune.search("experiments/demo.yaml", budget={"trials": 20})  # or **{"budget.trials": 20}
    print(result.front[["trial", "map50_95", "gflops", "flops_reduction"]])  # the feasible Pareto front
    print(result.best.number, result.best.ratios)  # the trial `yoloprune export` ships
    result.report()  # <output>/report.html and trials.csv
    shipped = result.export(epochs=30)  # .pt, .onnx and a model card, in <output>/export

    pruned = yoloprune.prune(YOLO("best.pt"), {"backbone.p4": 0.3, "neck": 0.5})  # a pruned DetectionModel
    detector = yoloprune.load_detector(YOLO("best.pt"))  # or a .pt path, a model YAML, a module

``yoloprune.search`` is also the package of search engines: called, it runs a search (:mod:`yoloprune.api`).
``import yoloprune`` loads no ML library; each function imports what it needs when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from yoloprune.api import SearchResult, TrialResult, prune

__version__ = "0.1.0"

__all__ = ["SearchResult", "TrialResult", "__version__", "load_detector", "prune", "search"]

if TYPE_CHECKING:
    from yoloprune.ultra.models import load_detector


def __getattr__(name: str) -> Any:
    if name == "load_detector":  # from the Ultralytics adapter, which loads torch: on first use
        from yoloprune.ultra.models import load_detector

        return load_detector
    raise AttributeError(f"module 'yoloprune' has no attribute '{name}'")
