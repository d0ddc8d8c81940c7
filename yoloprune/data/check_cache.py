"""Remember the splits that passed the dataset check, so that each process (every worker, every trial) does not
read every image header and label file again.

A split's entry is a small JSON file in ``<yoloprune home>/dataset-checks/`` (never in the user's dataset
folder), named after the dataset YAML and the split. It holds a digest of everything the check's verdict
depends on: each image's and label file's path, size and modification time (or absence), the class count,
the keypoint row width, this check's version and the Ultralytics and Pillow versions whose rules it follows.
Only a passing split is stored, with the counts its log lines report; any change to a file's size or mtime,
an added or removed image or label, changes the digest and the split is checked again.

A split whose newest file changed less than :data:`SETTLE_S` before the check is not stored: a file system
whose clock is coarse (ext4's a few ms, FAT's 2 s) could give a file rewritten within the same tick, at the
same size, the same stamp (git's "racy" index entries, handled the same way).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path

from yoloprune.atomic import write_text
from yoloprune.data.verify import SplitCheck, label_name
from yoloprune.errors import YoloPruneError
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: Bump when the check's rules change, so that no entry written by older rules is trusted.
CHECK_VERSION = 2
#: Seconds a split's files must have been left alone before its verdict is stored.
SETTLE_S = 2.0


def split_digest(images: list[Path], nc: int, pose_columns: int) -> tuple[str, float]:
    """The digest of a split's files and check settings, and the newest modification time among them (s)."""
    versions = [_version(p) for p in ("ultralytics", "pillow", "opencv-python", "opencv-python-headless")]
    h = hashlib.sha256(json.dumps([CHECK_VERSION, nc, pose_columns, versions]).encode())
    newest = 0
    for image in map(str, images):
        for path in (image, label_name(image)):
            try:
                st = os.stat(path)
            except OSError:
                h.update(f"{path}\0-\n".encode("utf-8", "surrogateescape"))
                continue
            newest = max(newest, st.st_mtime_ns)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), newest / 1e9


@functools.cache  # a metadata look-up scans sys.path
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def entry_path(cache_dir: Path, yaml_path: Path, split: str) -> Path:
    """The cache file of ``split`` of the dataset YAML ``yaml_path``."""
    key = hashlib.sha256(f"{yaml_path.resolve()}\0{split}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return cache_dir / f"{key}.json"


def load(entry: Path, digest: str) -> SplitCheck | None:
    """The stored result of a split that passed with this ``digest``, or None (no entry, a stale or bad one)."""
    try:
        stored = json.loads(entry.read_text())
        if stored.get("digest") != digest:
            return None
        example = stored["unlabelled_example"]
        return SplitCheck(
            images=int(stored["images"]),
            boxes=int(stored["boxes"]),
            backgrounds=int(stored["backgrounds"]),
            unlabelled=int(stored["unlabelled"]),
            unlabelled_example=Path(example) if example else None,
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a damaged entry: check again
        LOGGER.debug("ignoring the dataset check cache entry %s (%s)", entry, e)
        return None


def store(entry: Path, digest: str, newest: float, found: SplitCheck) -> None:
    """Store a passing split's result; a write that fails is logged and otherwise ignored."""
    if found.problems or time.time() - newest < SETTLE_S:
        return
    stored = {
        "digest": digest,
        "images": found.images,
        "boxes": found.boxes,
        "backgrounds": found.backgrounds,
        "unlabelled": found.unlabelled,
        "unlabelled_example": str(found.unlabelled_example) if found.unlabelled_example else None,
    }
    try:
        write_text(entry, json.dumps(stored))
    except (OSError, YoloPruneError) as e:  # a read-only home only costs the next process a full check
        LOGGER.debug("cannot write the dataset check cache entry %s (%s)", entry, e)
