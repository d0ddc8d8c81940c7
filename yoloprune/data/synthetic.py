"""A deterministic synthetic detection dataset that is hard enough for pruning damage to show.

Six shape classes whose colour says nothing about the class, with a skewed class balance (``cross`` is
rare), objects from a few pixels to ~40% of the image, rotation, textured backgrounds, unlabelled
look-alike clutter (irregular polygons, arcs, strokes, dots), partial occlusion, blur and noise. Boxes
are exact (computed from the drawn geometry), so mAP50-95 rewards precise localisation.

Every image is drawn from its own RNG stream ``(seed, split, index)``: the same spec gives the same
files on any machine with the same OpenCV, and a larger set extends a smaller one.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from yoloprune.errors import DatasetError

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
CLASS_WEIGHTS: tuple[float, ...] = (0.24, 0.22, 0.2, 0.16, 0.12, 0.06)
_SPLITS = {"train": 0, "val": 1}
_DONE = ".complete.json"


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate.

    Attributes:
        n_train: training images.
        n_val: validation images.
        imgsz: square image side in pixels.
        seed: master seed.
        max_objects: labelled objects per image are drawn from 1..max_objects.
        clutter: mean number of unlabelled distractors per image.
        min_size: smallest object side as a fraction of ``imgsz`` (0.04 at 256 px is ~10 px).
        max_size: largest object side as a fraction of ``imgsz``.
    """

    n_train: int = 400
    n_val: int = 100
    imgsz: int = 256
    seed: int = 0
    max_objects: int = 8
    clutter: float = 6.0
    min_size: float = 0.04
    max_size: float = 0.4

    def __post_init__(self) -> None:
        problems = []
        if self.n_train < 1 or self.n_val < 1:
            problems.append(f"n_train and n_val must be >= 1 (got {self.n_train}, {self.n_val})")
        if self.imgsz < 32 or self.imgsz % 32:
            problems.append(f"imgsz must be a multiple of 32 and >= 32 (got {self.imgsz})")
        if not 0 < self.min_size < self.max_size <= 0.9:
            problems.append(f"need 0 < min_size < max_size <= 0.9 (got {self.min_size}, {self.max_size})")
        if self.max_objects < 1 or self.clutter < 0:
            problems.append("max_objects must be >= 1 and clutter >= 0")
        if problems:
            raise DatasetError("invalid synthetic dataset spec: " + "; ".join(problems) + ".")


def generate_dataset(root: str | Path, spec: SyntheticSpec | None = None, *, overwrite: bool = False) -> Path:
    """Write the dataset under ``root`` and return the path of its ``data.yaml``.

    A folder already holding the same complete spec is reused as it is. The set is written to a
    temporary sibling folder and moved into place at the end, so an interrupted run leaves nothing.
    """
    spec = spec or SyntheticSpec()
    root = Path(root).resolve()
    marker = root / _DONE
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec) and not overwrite:
        return root / "data.yaml"
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise DatasetError(f"'{root}' exists and is not a yoloprune synthetic dataset; choose an empty folder.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, split_id in _SPLITS.items():
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            count = spec.n_train if split == "train" else spec.n_val
            for index in range(count):
                image, labels = render_image(spec, split_id, index)
                stem = f"{split}_{index:05d}"
                cv2.imwrite(str(tmp / "images" / split / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
                lines = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
                (tmp / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        data = {
            "path": str(root),
            "train": "images/train",
            "val": "images/val",
            "names": dict(enumerate(CLASS_NAMES)),
        }
        (tmp / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        (tmp / _DONE).write_text(json.dumps(asdict(spec)))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / "data.yaml"


def render_image(spec: SyntheticSpec, split_id: int, index: int) -> tuple[np.ndarray, list[tuple]]:
    """Draw one image; returns (BGR uint8 image, [(class, x, y, w, h) normalised])."""
    rng = np.random.default_rng([spec.seed, split_id, index])
    s = spec.imgsz
    image = _background(rng, s)
    boxes: list[tuple[float, float, float, float]] = []
    labels: list[tuple] = []

    n_objects = int(rng.integers(1, spec.max_objects + 1))
    n_clutter = int(rng.poisson(spec.clutter))
    # Distractors go under and over the objects, so some objects are partly occluded.
    under = n_clutter // 2
    for _ in range(under):
        _draw_clutter(image, rng, spec)
    for _ in range(n_objects):
        cls = int(rng.choice(len(CLASS_NAMES), p=CLASS_WEIGHTS))
        size = s * math.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size)))
        for _attempt in range(10):
            cx, cy = rng.uniform(size / 2, s - size / 2, size=2)
            points = _shape_points(CLASS_NAMES[cls], cx, cy, size, rng)
            box = _bbox(points, s)
            if box[2] - box[0] >= 3 and box[3] - box[1] >= 3 and all(_iou(box, b) < 0.2 for b in boxes):
                break
        else:
            continue
        _draw_shape(image, CLASS_NAMES[cls], points, size, rng)
        boxes.append(box)
        x0, y0, x1, y1 = box
        labels.append((cls, (x0 + x1) / 2 / s, (y0 + y1) / 2 / s, (x1 - x0) / s, (y1 - y0) / s))
    for _ in range(n_clutter - under):
        _draw_clutter(image, rng, spec, small=True)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 1.0))
    noise = rng.normal(0, rng.uniform(2, 10), image.shape)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return image, labels


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    base = rng.uniform(40, 215, size=3)
    gradient = rng.uniform(-60, 60, size=(2, 3))
    yy, xx = np.mgrid[0:s, 0:s] / s
    image = base + xx[..., None] * gradient[0] + yy[..., None] * gradient[1]
    low = cv2.resize(rng.normal(0, 18, size=(8, 8, 3)), (s, s), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image + low, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(3, 10))):  # background strokes
        p0, p1 = rng.integers(0, s, size=(2, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(image, tuple(int(v) for v in p0), tuple(int(v) for v in p1), colour, 1, cv2.LINE_AA)
    return image


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _rotate(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = points - (cx, cy)
    return np.stack([d[:, 0] * c - d[:, 1] * s + cx, d[:, 0] * s + d[:, 1] * c + cy], axis=1)


def _shape_points(name: str, cx: float, cy: float, size: float, rng: np.random.Generator) -> np.ndarray:
    r = size / 2
    angle = rng.uniform(0, 2 * math.pi)
    if name in ("circle", "ring"):
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    if name == "square":
        k = r / math.sqrt(2)
        pts = np.array([[-k, -k], [k, -k], [k, k], [-k, k]]) + (cx, cy)
    elif name == "triangle":
        t = np.array([0, 2, 4]) * math.pi / 3 - math.pi / 2
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    elif name == "star":
        t = np.arange(10) * math.pi / 5 - math.pi / 2
        radius = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)
    else:  # cross: a plus sign of arm width 0.36 r
        w = 0.36 * r
        pts = np.array(
            [
                [-w, -r],
                [w, -r],
                [w, -w],
                [r, -w],
                [r, w],
                [w, w],
                [w, r],
                [-w, r],
                [-w, w],
                [-r, w],
                [-r, -w],
                [-w, -w],
            ]
        ) + (cx, cy)
    return _rotate(pts, cx, cy, angle)


def _draw_shape(image: np.ndarray, name: str, points: np.ndarray, size: float, rng: np.random.Generator) -> None:
    poly = np.round(points * 16).astype(np.int32)  # 4 fractional bits for sub-pixel accuracy
    if name == "ring":
        thickness = max(1, round(size * rng.uniform(0.08, 0.18)))
        cv2.polylines(image, [poly], True, _colour(rng), thickness, cv2.LINE_AA, shift=4)
    else:
        cv2.fillPoly(image, [poly], _colour(rng), cv2.LINE_AA, shift=4)
        if rng.random() < 0.4:  # an outline in another colour
            cv2.polylines(image, [poly], True, _colour(rng), 1, cv2.LINE_AA, shift=4)


def _draw_clutter(image: np.ndarray, rng: np.random.Generator, spec: SyntheticSpec, small: bool = False) -> None:
    s = spec.imgsz
    kind = rng.integers(0, 4)
    size = s * rng.uniform(spec.min_size, spec.max_size * (0.4 if small else 0.8))
    cx, cy = rng.uniform(0, s, size=2)
    colour = _colour(rng)
    if kind == 0:  # irregular polygon: not a class, but close to several
        n = int(rng.integers(4, 8))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        radius = size / 2 * rng.uniform(0.4, 1.0, n)
        pts = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)
        cv2.fillPoly(image, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)
    elif kind == 1:  # open arc: a broken ring
        start = rng.uniform(0, 360)
        cv2.ellipse(
            image,
            (int(cx), int(cy)),
            (int(size / 2), int(size / 2 * rng.uniform(0.5, 1))),
            0,
            start,
            start + rng.uniform(90, 250),
            colour,
            max(1, int(size * 0.1)),
            cv2.LINE_AA,
        )
    elif kind == 2:  # thick stroke
        p1 = (cx + rng.uniform(-size, size), cy + rng.uniform(-size, size))
        cv2.line(image, (int(cx), int(cy)), (int(p1[0]), int(p1[1])), colour, max(1, int(size * 0.12)), cv2.LINE_AA)
    else:  # a few dots
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, s, size=2)
            cv2.circle(image, (int(x), int(y)), max(1, int(s * 0.008)), colour, -1, cv2.LINE_AA)


def _bbox(points: np.ndarray, s: int) -> tuple[float, float, float, float]:
    x0, y0 = np.clip(points.min(axis=0), 0, s)
    x1, y1 = np.clip(points.max(axis=0), 0, s)
    return float(x0), float(y0), float(x1), float(y1)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
