"""Check a split's image headers and label files before any training, by the rules of Ultralytics' cache step.

Ultralytics drops an image whose file it cannot read, or whose label file has a class id out of range or a
box outside [0, 1], with one warning line, and trains or validates on what is left. yoloprune refuses such a
dataset instead: a search compares every candidate with a baseline measured on the same images, and a
silently smaller validation split (or a conversion bug that dropped half the labels) would make every number
wrong. What Ultralytics accepts is accepted here too, by the same rules (``verify_image_label``): values are
float32; a polygon row is judged by its bounding box, not its vertices; a keypoint row of a YAML with
``kpt_shape`` counts as its box; an empty label file is a background image (no objects), and so is an image
without a label file (counted and reported as a warning, since it is often a layout mistake).

The check reads every label file, matches each image's first bytes against OpenCV's decoders, then opens it with
Pillow as Ultralytics does (the header, plus Pillow's ``verify``, which decodes no pixels but reads a PNG's
chunks to check their CRCs): 0.2-0.4 ms an image on a local disk, measured on 3,500 128-px images (2 busy CPU
cores). A split that passed is remembered (:mod:`yoloprune.data.check_cache`), so the next process skips it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Ultralytics' tolerance on normalised coordinates (``verify_image_label``): up to 1.01, and down to -0.01
#: for the centre when width and height are not negative.
COORD_MAX = 1.01
COORD_MIN = -0.01
#: Ultralytics' image formats (Pillow's format names); an image smaller than this is dropped too.
PIL_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpeg2000", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)
MIN_SIDE = 10
#: Suffixes OpenCV does not recognise by their first bytes; Pillow (with a plugin for HEIF) reads them.
PLUGIN_SUFFIXES = frozenset({".avif", ".dng", ".heic", ".heif"})
#: Problems shown in full in one error message; the rest are counted.
SHOWN = 12

#: What to do about each kind of problem (``{nc}`` and ``{last}`` are filled in).
FIXES = {
    "image": "replace each unreadable image, or delete it together with its label file",
    "listed": "every line of a split's .txt list must name an existing image: a path starting with './' is "
    "relative to the list's folder, any other relative path to the current directory (Ultralytics' rules); "
    "absolute paths are safest",
    "class": "class ids are 0-based indices into the YAML's names ({nc} classes: 0-{last}); correct the id, "
    "or add the missing class to names",
    "box": "each row is 'class x_center y_center width height', normalised to [0, 1] by the image's width and "
    "height (divide pixel values by them)",
    "row": "each row is 'class x_center y_center width height' (or 'class x1 y1 x2 y2 ...' for a polygon), "
    "numbers separated by spaces",
    "text": "a label file is UTF-8 text, one object per line",
}


@dataclass(frozen=True)
class Problem:
    """One unusable image or label line."""

    path: Path
    line: int | None
    kind: str
    detail: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.detail}"


@dataclass
class SplitCheck:
    """What one split's check found.

    Attributes:
        images: image files in the split.
        boxes: label rows (objects) read.
        backgrounds: images whose label file is empty (legal: no objects).
        unlabelled: images without a label file (Ultralytics takes them as backgrounds too).
        unlabelled_example: the first of them.
        problems: what Ultralytics would drop, file by file.
    """

    images: int = 0
    boxes: int = 0
    backgrounds: int = 0
    unlabelled: int = 0
    unlabelled_example: Path | None = None
    problems: list[Problem] = field(default_factory=list)


def label_path(image: Path) -> Path:
    """Ultralytics' label file for ``image``: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    return Path(label_name(str(image)))


def label_name(image: str) -> str:
    """:func:`label_path` on strings (a ``Path`` costs more than the ``stat`` of the cache's digest)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def check_split(images: Iterable[Path], nc: int, pose_columns: int = 0) -> SplitCheck:
    """Check every image of a split and its label file against ``nc`` classes (``pose_columns``: see
    :func:`check_label_file`)."""
    result = SplitCheck()
    for image in images:
        result.images += 1
        if not image.is_file():
            # Ultralytics does not strip a list's lines: "x.jpg " names no image it reads
            padded = any(part != part.strip() for part in image.parts)
            spaces = " (the line has spaces around the path)" if padded else ""
            result.problems.append(Problem(image, None, "listed", f"listed in the split but does not exist{spaces}"))
            continue
        bad_image = check_image(image)
        if bad_image is not None:
            result.problems.append(bad_image)
        labels = label_path(image)
        if not labels.is_file():
            result.unlabelled += 1
            result.unlabelled_example = result.unlabelled_example or image
            continue
        rows, problems = check_label_file(labels, nc, pose_columns)
        result.problems.extend(problems)
        result.boxes += rows
        result.backgrounds += rows == 0 and not problems
    return result


def check_image(path: Path) -> Problem | None:
    """None if Pillow reads ``path``'s header as an image Ultralytics takes, else the problem."""
    import cv2
    from PIL import Image

    if path.suffix.lower() not in PLUGIN_SUFFIXES and not cv2.haveImageReader(str(path)):
        # Checked first: Ultralytics' patched Image.open tries to install a HEIF plugin for any unknown file.
        return Problem(path, None, "image", "not an image: its first bytes match no image format (a text file or "
                       "a partial download under an image's name?)")  # fmt: skip
    try:
        with Image.open(path) as im:
            im.verify()
            fmt, (width, height) = (im.format or "").lower(), im.size
    except Exception as e:  # Pillow raises many types for a file that is not an image
        reason = type(e).__name__ if str(path) in str(e) else f"{type(e).__name__}: {e}"  # no path twice
        return Problem(path, None, "image", f"not a readable image ({reason})")
    if fmt not in PIL_FORMATS:
        return Problem(path, None, "image", f"image format '{fmt}' is not one Ultralytics reads")
    if min(width, height) < MIN_SIDE:
        return Problem(path, None, "image", f"image is {width}x{height} px; Ultralytics drops images under 10 px")
    return None


def check_label_file(path: Path, nc: int, pose_columns: int = 0) -> tuple[int, list[Problem]]:
    """The number of rows of a label file and its problems (every bad line, by number).

    ``pose_columns`` is the width of a keypoint row (``5 + nkpt * ndim`` for a YAML with ``kpt_shape``, else 0):
    Ultralytics' detection loader keeps such a row's first 5 columns, its box, and drops the keypoints.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        return 0, [Problem(path, None, "text", f"cannot be read as text ({type(e).__name__})")]
    rows = [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if pose_columns:
        rows = [(number, f[:5] if len(f) == pose_columns else f) for number, f in rows]
    polygons = any(len(f) > 6 for _, f in rows)  # Ultralytics' test for a segmentation label file
    problems = []
    for number, fields in rows:
        problem = _check_row(fields, nc, polygons, pose_columns)
        if problem is not None:
            problems.append(Problem(path, number, *problem))
    if polygons and any(len(f) == 5 for _, f in rows):  # Ultralytics refuses a file that mixes them
        problems.append(Problem(path, None, "row", "mixes box rows (5 columns) and polygon rows"))
    return len(rows), problems


def _box_passes(fields: list[str], nc: int) -> bool:
    """A fast test of one 5-column row, in float64: a pass implies :func:`_check_row`'s float32 pass (rounding is
    monotonic), a failure is decided there."""
    try:
        cls, x, y, w, h = map(float, fields)
    except ValueError:
        return False
    inside = COORD_MIN <= x <= COORD_MAX and COORD_MIN <= y <= COORD_MAX and 0 <= w <= COORD_MAX and 0 <= h <= COORD_MAX
    return inside and cls % 1 == 0 and 0 <= cls < nc


def _check_row(fields: list[str], nc: int, polygons: bool, pose_columns: int) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one label row, or None.

    Ultralytics parses with float32, turns a polygon (in a file with any row over 6 columns) into its bounding
    box, and applies the box rules to that box: centre in [-0.01, 1.01], width and height in [0, 1.01].
    """
    polygon = polygons and len(fields) != 5
    pose = f" (or {pose_columns} for a keypoint row)" if pose_columns else ""
    if polygon and (len(fields) < 3 or len(fields) % 2 == 0):
        pose = pose or "; a keypoint row needs the YAML's kpt_shape"
        return "row", f"{len(fields)} columns; a polygon row is 'class x1 y1 x2 y2 ...' (an odd number){pose}"
    if not polygon and len(fields) != 5:
        return "row", f"{len(fields)} columns; a box row has 5{pose}"
    if not polygon and _box_passes(fields, nc):
        return None
    try:
        values = np.array(fields, dtype=np.float32)
    except ValueError:
        return "row", f"not numbers: '{_shown(fields)}'"
    cls = float(values[0])
    if cls % 1 or cls < 0:
        return "class", f"class id {fields[0]} is not a non-negative integer"
    if cls >= nc:
        return "class", f"class id {int(cls)} >= nc {nc} (the YAML's names has {nc} classes)"
    if polygon:
        points = values[1:].reshape(-1, 2)
        low, high = points.min(0), points.max(0)
        box = np.concatenate(((low + high) / 2, high - low))
    else:
        box = values[1:]
    inside = (box <= COORD_MAX) & (box >= np.array([COORD_MIN, COORD_MIN, 0.0, 0.0]))
    if inside.all():
        return None
    if polygon:
        xywh = " ".join(f"{float(v):g}" for v in box)
        return "box", f"the polygon's bounding box (x_center y_center width height {xywh}) is outside [0, 1] in " \
            f"'{_shown(fields)}'"  # fmt: skip
    return "box", f"value {float(box[~inside][0]):g} outside [0, 1] in '{' '.join(fields)}'"


def _shown(fields: list[str], most: int = 9) -> str:
    return " ".join(fields[:most]) + (" ..." if len(fields) > most else "")


def describe_problems(problems: list[Problem], nc: int) -> str:
    """The problems (the first :data:`SHOWN`, then a count) and one fix per kind found."""
    shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    kinds = Counter(p.kind for p in problems)
    fixes = "\n".join(f"  - {FIXES[k].format(nc=nc, last=nc - 1)}" for k in kinds)
    files = len({p.path for p in problems})
    return f"{len(problems)} problem(s) in {files} file(s):\n{shown}{more}\nTo fix:\n{fixes}"
