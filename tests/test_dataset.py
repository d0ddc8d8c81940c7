"""The built-in synthetic dataset: deterministic, Ultralytics-shaped, with small objects and clutter."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from yoloprune.data import CLASS_NAMES, SyntheticSpec, generate_dataset, inspect_dataset
from yoloprune.data.synthetic import render_image
from yoloprune.errors import DatasetError

SPEC = SyntheticSpec(n_train=30, n_val=10, imgsz=160, seed=3)


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".txt", ".yaml")):
        if f.suffix == ".yaml":
            continue  # holds the absolute root
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_spec_same_files(tmp_path):
    a = generate_dataset(tmp_path / "a", SPEC).parent
    b = generate_dataset(tmp_path / "b", SPEC).parent
    assert _digest(a) == _digest(b)
    c = generate_dataset(tmp_path / "c", SyntheticSpec(n_train=30, n_val=10, imgsz=160, seed=4)).parent
    assert _digest(a) != _digest(c)


def test_layout_and_yaml(tmp_path):
    path = generate_dataset(tmp_path / "d", SPEC)
    data = yaml.safe_load(path.read_text())
    assert data["names"] == dict(enumerate(CLASS_NAMES)) and len(CLASS_NAMES) >= 5
    info = inspect_dataset(path)
    assert (info.n_train, info.n_val) == (30, 10)
    labels = list((path.parent / "labels" / "train").glob("*.txt"))
    assert len(labels) == 30


def test_reuses_a_complete_set_and_refuses_foreign_folders(tmp_path):
    path = generate_dataset(tmp_path / "e", SPEC)
    stamp = path.stat().st_mtime_ns
    assert generate_dataset(tmp_path / "e", SPEC) == path and path.stat().st_mtime_ns == stamp
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not a yoloprune synthetic dataset"):
        generate_dataset(foreign, SPEC)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_objects_span_sizes_classes_and_clutter():
    spec = SyntheticSpec(n_train=200, n_val=1, imgsz=256, seed=0)
    boxes = []
    for i in range(200):
        image, labels = render_image(spec, 0, i)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        boxes.extend(labels)
    arr = np.array(boxes)
    sides = np.maximum(arr[:, 3], arr[:, 4]) * 256
    assert (sides < 16).mean() > 0.1, "too few small objects"  # small objects matter for mAP50-95
    assert (sides > 64).mean() > 0.1, "too few large objects"
    counts = np.bincount(arr[:, 0].astype(int), minlength=len(CLASS_NAMES))
    assert counts.min() > 0 and counts[-1] < counts[0] / 2  # every class present, "cross" is rare
    assert ((arr[:, 1:3] > 0) & (arr[:, 1:3] < 1)).all()


@pytest.mark.parametrize("bad", [dict(imgsz=100), dict(n_val=0), dict(min_size=0.5, max_size=0.4)])
def test_invalid_spec(bad):
    with pytest.raises(DatasetError, match="invalid synthetic dataset spec"):
        SyntheticSpec(**bad)
