"""Save pruned models as Ultralytics checkpoints that plain ``ultralytics.YOLO(path)`` loads."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yoloprune.atomic import DEFAULT_FIX, atomic_file
from yoloprune.errors import InternalError
from yoloprune.offline import configure_offline
from yoloprune.ultra.blocks import SplitC2f

configure_offline()

import ultralytics  # noqa: E402
from ultralytics.cfg import DEFAULT_CFG_DICT  # noqa: E402

#: Key under which yoloprune's own metadata (ratios, base costs...) is stored; plain types only.
METADATA_KEY = "yoloprune"


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    train_args: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    fix: str = DEFAULT_FIX,
) -> Path:
    """Write ``model`` to ``path`` in Ultralytics' checkpoint layout, atomically (:mod:`.atomic`).

    The file holds stock Ultralytics classes only, so it loads in a process that never imported
    yoloprune. ``metadata`` (plain Python types) is kept under :data:`METADATA_KEY`. A write that fails
    (disk full, read-only folder) raises :class:`~yoloprune.atomic.OutputWriteError` with ``fix`` in its
    message, and leaves nothing under ``path``.
    """
    if any(isinstance(m, SplitC2f) for m in model.modules()):
        raise InternalError("the model still holds yoloprune's SplitC2f; fold it before saving.")
    path = Path(path)
    stored = copy.deepcopy(model).half().eval()
    for p in stored.parameters():
        p.requires_grad_(False)
    args = {**DEFAULT_CFG_DICT, **(getattr(model, "args", None) or {}), **(train_args or {})}
    args = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    setattr(stored, "args", args)  # noqa: B010  (Ultralytics reads model.args)
    ckpt = {
        "date": datetime.now(timezone.utc).isoformat(),
        "version": ultralytics.__version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,
        "best_fitness": None,
        "model": stored,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "train_args": args,
        "train_metrics": None,
        METADATA_KEY: metadata or {},
    }
    with atomic_file(path, fix=fix) as f:
        torch.save(ckpt, f)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """yoloprune's metadata stored in a checkpoint (empty for a plain Ultralytics checkpoint)."""
    from yoloprune.ultra.models import load_checkpoint_dict

    return dict(load_checkpoint_dict(path).get(METADATA_KEY) or {})
