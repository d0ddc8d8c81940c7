"""Device selection shared by the CLI and the search."""

from __future__ import annotations


def default_device(device: str | None) -> str:
    """``device`` if given, else ``"0"`` (the first GPU) when CUDA is available, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "0" if torch.cuda.is_available() else "cpu"
