"""The package logger tree (``yoloprune.*``) and a verbosity switch."""

from __future__ import annotations

import logging

_ROOT = "yoloprune"


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
