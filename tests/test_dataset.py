"""The built-in synthetic dataset: deterministic, Ultralytics-shaped, with small objects and clutter."""

from __future__ import annotations

import hashlib
from pathlib import Path

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


# The check before any training (yoloprune/data/verify.py): what Ultralytics' cache step would drop fails.


def _copy(tmp_path, tiny_data):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_data.parent, root)
    raw = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump({**raw, "path": str(root)}))
    return root


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("0 0.5 0.5 0.2 0.2", None),
        ("5 1.005 0.5 0.2 0.2", None),  # Ultralytics' 1% tolerance
        ("1 -0.005 0.5 0.2 0.2", None),
        ("2 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4", None),  # a polygon row
        ("6 0.5 0.5 0.2 0.2", "class"),
        ("1.5 0.5 0.5 0.2 0.2", "class"),
        ("-1 0.5 0.5 0.2 0.2", "class"),
        ("1 0.5 0.5 -0.2 0.2", "box"),
        ("1 0.5 0.5 0.2 1.2", "box"),
        ("1 0.5 0.5 0.2", "row"),
        ("1 0.5 0.5 0.2 0.2 0.1", "row"),
        ("car 0.5 0.5 0.2 0.2", "row"),
    ],
)
def test_label_rows(tmp_path, row, problem):
    from yoloprune.data.verify import check_label_file

    path = tmp_path / "x.txt"
    path.write_text(f"\n{row}\n")
    rows, problems = check_label_file(path, nc=6)
    assert rows == 1
    assert [(p.kind, p.line) for p in problems] == ([] if problem is None else [(problem, 2)])


def test_empty_and_mixed_label_files(tmp_path):
    from yoloprune.data.verify import check_label_file

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert check_label_file(empty, nc=3) == (0, [])
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("0 0.5 0.5 0.1 0.1\n1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n")
    assert [p.detail for p in check_label_file(mixed, nc=3)[1]] == ["mixes box rows (5 columns) and polygon rows"]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert check_label_file(binary, nc=3)[1][0].kind == "text"


def test_label_path_follows_ultralytics():
    from ultralytics.data.utils import img2label_paths

    from yoloprune.data.verify import label_path

    for image in ["/d/images/train/a.jpg", "/d/images/x/images/val/b.v2.png", "/d/pics/c.jpg"]:
        assert str(label_path(Path(image))) == img2label_paths([image])[0]


def test_many_problems_are_counted_and_each_kind_gets_its_fix(tmp_path, tiny_data):
    root = _copy(tmp_path, tiny_data)
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    for label in labels:
        label.write_text(label.read_text() + "9 0.5 0.5 0.1 0.1\n")
    (root / "images" / "val" / "val_00000.jpg").write_text("not an image")
    with pytest.raises(DatasetError) as e:
        inspect_dataset(root / "data.yaml")
    msg = str(e.value)
    assert f"{len(labels) + 1} problem(s) in {len(labels) + 1} file(s)" in msg
    assert f"... and {len(labels) + 1 - 12} more" in msg
    assert "class ids are 0-based" in msg and "replace each unreadable image" in msg


def test_list_file_split_and_a_listed_image_that_is_gone(tmp_path, tiny_data):
    root = _copy(tmp_path, tiny_data)
    images = sorted((root / "images" / "val").glob("*.jpg"))
    (root / "val.txt").write_text("".join(f"./images/val/{p.name}\n" for p in images))
    raw = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump({**raw, "val": "val.txt"}))
    assert inspect_dataset(root / "data.yaml").n_val == len(images)
    images[0].unlink()
    with pytest.raises(DatasetError, match=rf"{images[0]}: listed in the split but does not exist"):
        inspect_dataset(root / "data.yaml")


def test_tiny_image_is_refused(tmp_path, tiny_data):
    import cv2

    root = _copy(tmp_path, tiny_data)
    image = root / "images" / "val" / "val_00000.jpg"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"val_00000.jpg: image is 8x8 px"):
        inspect_dataset(root / "data.yaml")
