"""The package logger tree (``yoloprune.*``), a verbosity switch, and progress bars that log lines print above."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

_ROOT = "yoloprune"
_PROGRESS = {"enabled": True}


def get_logger(name: str) -> logging.Logger:
    """Return a child of the package logger for module ``name``."""
    logger = logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
    _ensure_handler()
    return logger


def set_verbosity(level: int | str) -> None:
    """Set the package log level (e.g. ``logging.DEBUG`` or ``"WARNING"``)."""
    _ensure_handler()
    logging.getLogger(_ROOT).setLevel(level)


def _ensure_handler() -> None:
    root = logging.getLogger(_ROOT)
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[yoloprune] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def set_progress(enabled: bool) -> None:
    """Show (the default) or hide the progress bars of long steps (``--no-progress``)."""
    _PROGRESS["enabled"] = enabled


@contextmanager
def progress(total: int, desc: str, unit: str = "epoch") -> Iterator[tqdm]:
    """A progress bar for one long step (fine-tunes, scans, validation); the package's log lines print above it."""
    with logging_redirect_tqdm(loggers=[logging.getLogger(_ROOT)]):
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not _PROGRESS["enabled"], dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()


def epoch_progress(bar: tqdm) -> Callable[[int, dict[str, float]], None]:
    """A fine-tune's ``on_epoch`` callback advancing ``bar`` and showing the epoch's mAP50-95."""

    def on_epoch(_epoch: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"mAP50-95 {metrics['map50_95']:.3f}")

    return on_epoch
