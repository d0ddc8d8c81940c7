"""Switch off every network touch of Ultralytics, in one place.

Must run before ``ultralytics`` is imported (its import probes DNS and reads settings).
What it switches off, measured in ../shared/FINDINGS.md:

* ``YOLO_OFFLINE=1``: the import-time DNS probe (``ONLINE``) and pip update checks;
* ``YOLO_AUTOINSTALL=0``: no ``pip install`` of missing requirements at export time;
* ``YOLO_CONFIG_DIR`` points at a folder we own; its ``Ultralytics/`` holds ``Arial.ttf`` and
  ``Arial.Unicode.ttf`` copied from matplotlib's DejaVuSans, because ``check_font`` runs
  on every train/val and downloads the font otherwise (not covered by YOLO_OFFLINE);
* settings: ``sync`` (analytics) and every integration (clearml, comet, dvc, mlflow,
  raytune, tensorboard, wandb, platform) set to False.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

_FONTS = ("Arial.ttf", "Arial.Unicode.ttf")
_done = False


def yoloprune_home() -> Path:
    """Folder for caches and the Ultralytics config (``$YOLOPRUNE_HOME`` or ``~/.cache/yoloprune``)."""
    return Path(os.environ.get("YOLOPRUNE_HOME") or Path.home() / ".cache" / "yoloprune")


def ultralytics_config_dir() -> Path:
    """The ``YOLO_CONFIG_DIR`` this package gives Ultralytics."""
    return Path(os.environ.get("YOLO_CONFIG_DIR") or yoloprune_home() / "ultralytics")


def configure_offline() -> Path:
    """Make Ultralytics fully offline; idempotent. Returns the Ultralytics config dir."""
    global _done
    config_dir = ultralytics_config_dir()
    if _done:
        return config_dir
    if "ultralytics" in sys.modules:
        LOGGER.warning(
            "ultralytics was imported before yoloprune; its import-time network probe may already have run. "
            "Import yoloprune first (or set YOLO_OFFLINE=1) to avoid it."
        )
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    config_dir.mkdir(parents=True, exist_ok=True)

    import ultralytics.utils as uu
    import ultralytics.utils.checks as uc
    import ultralytics.utils.torch_utils as ut

    _install_fonts(Path(uu.USER_CONFIG_DIR))  # YOLO_CONFIG_DIR/Ultralytics, where check_font looks
    uu.ONLINE = False
    uc.ONLINE = False
    uc.AUTOINSTALL = False
    # Ultralytics leaves one core idle for data loading; with workers=0 that only halves CPU speed.
    ut.NUM_THREADS = max(1, os.cpu_count() or 1)
    off = {k: False for k, v in uu.SETTINGS.items() if isinstance(v, bool) and v}
    if off:
        uu.SETTINGS.update(off)
    _done = True
    return config_dir


def _install_fonts(config_dir: Path) -> None:
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in _FONTS:
        target = config_dir / name
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)


@contextlib.contextmanager
def ultralytics_quiet(quiet: bool = True) -> Iterator[None]:
    """Silence Ultralytics' log lines and progress bars (its TQDM follows its logger's level)."""
    logger = logging.getLogger("ultralytics")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
