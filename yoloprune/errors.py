"""One root exception for every error a user can act on.

Each message names the bad value and says what is valid or what to do next. A broken invariant of
yoloprune's own is an :class:`InternalError` instead, outside that root: a bug to report, not an input to fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class YoloPruneError(Exception):
    """Root of all errors raised by yoloprune on bad input or an unusable environment."""


class ConfigError(YoloPruneError):
    """An experiment config or a command-line value is invalid."""


class SearchSpaceError(ConfigError):
    """A pruning ratio, stage name or knob is outside what the model or space allows."""


class ModelError(YoloPruneError):
    """A model or checkpoint cannot be used (missing, not a YOLO checkpoint, not a detector)."""


class DatasetError(YoloPruneError):
    """A dataset YAML or its files are missing or unusable."""


class EvaluatorError(YoloPruneError):
    """Fine-tuning, validation or measurement of a candidate failed."""


class LatencyTargetError(EvaluatorError):
    """Measuring a latency target failed; ``stop_search`` says whether the whole search should stop."""

    def __init__(self, message: str, *, stop_search: bool = False) -> None:
        super().__init__(message)
        self.stop_search = stop_search


class BackendUnavailableError(YoloPruneError):
    """An optional backend's package is not installed; the message names the extra to install."""


class StorageError(YoloPruneError):
    """The database cannot be reached or holds an unexpected schema."""


#: Ends every InternalError's message.
REPORT_HINT = "This is a bug in yoloprune, not in your input; please report it with the full traceback."


class InternalError(Exception):
    """A bug in yoloprune: one of its own invariants broke. Deliberately not a YoloPruneError: no input fixes it.

    The message names the broken invariant; :data:`REPORT_HINT` is added when it is shown.
    """

    def __str__(self) -> str:
        return f"{super().__str__()} {REPORT_HINT}"  # added here, not in args: a pickled copy keeps one hint


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
