"""The experiment layer: one checked experiment (:func:`prepare`), a process's evaluators and baseline
(:func:`start_session`), and the built-in data and models (:mod:`.builtin`)."""

from yoloprune.experiment.session import (
    OUTPUT_FIX,
    Experiment,
    Session,
    experiment_baseline,
    open_session,
    prepare,
    start_session,
)

__all__ = ["OUTPUT_FIX", "Experiment", "Session", "experiment_baseline", "open_session", "prepare", "start_session"]
