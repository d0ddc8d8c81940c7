"""Check a split's image headers and label files before any training, by the rules of Ultralytics' cache step.

Ultralytics drops an image whose file it cannot read, or whose label file has a class id out of range or a
box outside [0, 1], with one warning line, and trains or validates on what is left. yoloprune refuses such a
dataset instead: a search compares every candidate with a baseline measured on the same images, and a
silently smaller validation split (or a conversion bug that dropped half the labels) would make every number
wrong. What Ultralytics accepts is accepted here too: an empty label file is a background image (no objects),
and so is an image without a label file (counted and reported as a warning, since it is often a layout mistake).

The check reads every label file, matches each image's first bytes against OpenCV's decoders, then opens it with
Pillow as Ultralytics does (the header, plus Pillow's ``verify``, which checks a PNG's chunks and decodes nothing);
it never decodes pixels: about 0.15 ms an image on a local disk.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
    "listed": "every path in a split's .txt list must name an existing image (relative to the YAML's 'path')",
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
        problems: what Ultralytics would drop, file by file.
    """

    images: int = 0
    boxes: int = 0
    backgrounds: int = 0
    unlabelled: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def label_path(image: Path) -> Path:
    """Ultralytics' label file for ``image``: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def check_split(images: Iterable[Path], nc: int) -> SplitCheck:
    """Check every image of a split and its label file against ``nc`` classes."""
    result = SplitCheck()
    for image in images:
        result.images += 1
        if not image.is_file():
            result.problems.append(Problem(image, None, "listed", "listed in the split but does not exist"))
            continue
        bad_image = check_image(image)
        if bad_image is not None:
            result.problems.append(bad_image)
        labels = label_path(image)
        if not labels.is_file():
            result.unlabelled.append(image)
            continue
        rows, problems = check_label_file(labels, nc)
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


def check_label_file(path: Path, nc: int) -> tuple[int, list[Problem]]:
    """The number of rows of a label file and its problems (every bad line, by number)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as e:
        return 0, [Problem(path, None, "text", f"cannot be read as text ({type(e).__name__})")]
    rows, problems, widths = 0, [], set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows += 1
        fields = line.split()
        widths.add(len(fields) == 5)
        problem = _check_row(fields, nc)
        if problem is not None:
            problems.append(Problem(path, number, *problem))
    if len(widths) == 2 and not problems:  # Ultralytics refuses a file that mixes them
        problems.append(Problem(path, None, "row", "mixes box rows (5 columns) and polygon rows"))
    return rows, problems


def _check_row(fields: list[str], nc: int) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong with one label row, or None."""
    segment = len(fields) >= 7 and len(fields) % 2 == 1
    if len(fields) != 5 and not segment:
        return "row", f"{len(fields)} columns; a box row has 5"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return "row", f"not numbers: '{' '.join(fields)}'"
    cls, coords = values[0], values[1:]
    if cls % 1 or cls < 0:
        return "class", f"class id {fields[0]} is not a non-negative integer"
    if cls >= nc:
        return "class", f"class id {int(cls)} >= nc {nc} (the YAML's names has {nc} classes)"
    low = COORD_MIN if segment or min(coords[2:4]) >= 0 else 0.0
    outside = [v for v in coords if not low <= v <= COORD_MAX]
    if outside:
        return "box", f"value {outside[0]:g} outside [0, 1] in '{' '.join(fields)}'"
    return None


def describe_problems(problems: list[Problem], nc: int) -> str:
    """The problems (the first :data:`SHOWN`, then a count) and one fix per kind found."""
    shown = "\n".join(f"  {p}" for p in problems[:SHOWN])
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    kinds = Counter(p.kind for p in problems)
    fixes = "\n".join(f"  - {FIXES[k].format(nc=nc, last=nc - 1)}" for k in kinds)
    files = len({p.path for p in problems})
    return f"{len(problems)} problem(s) in {files} file(s):\n{shown}{more}\nTo fix:\n{fixes}"
