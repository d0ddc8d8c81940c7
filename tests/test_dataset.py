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


# Differential checks: the same rows and folders through Ultralytics' own loader code and through yoloprune's.


def _ultralytics_keeps(tmp_path: Path, text: str, nc: int = 6, kpt_shape: tuple[int, int] = (0, 0)) -> bool:
    """Whether Ultralytics' detection cache step keeps an image whose label file holds ``text``."""
    import cv2
    from ultralytics.data.utils import verify_image_label

    image, label = tmp_path / "images" / "a.jpg", tmp_path / "labels" / "a.txt"
    image.parent.mkdir(exist_ok=True)
    label.parent.mkdir(exist_ok=True)
    cv2.imwrite(str(image), np.full((32, 32, 3), 127, np.uint8))
    label.write_text(text)
    result = verify_image_label((str(image), str(label), "", False, nc, *kpt_shape, False))
    return result[8] == 0  # the corrupt count


@pytest.mark.parametrize(
    ("rows", "kinds"),
    [
        (["0 -0.05 0.2 0.5 0.2 0.5 0.6"], []),  # a vertex outside, its box (0.225 0.4 0.55 0.4) inside
        (["0 -0.5 0.2 0.4 0.2 0.4 0.6"], ["box"]),  # the box's centre x is -0.05
        (["0 -0.03 0.5 1.02 0.5 0.5 0.6"], ["box"]),  # the box's width is 1.05
        (["0 1.015 0.1 1.015 0.2 1.0 0.2"], []),  # inside the 1% tolerance
        (["1 0.1 0.1 0.3 0.1 0.3 0.4", "2 0.5 0.5"], []),  # a one-point polygon beside a polygon: a 0x0 box
        (["1 0.1 0.1 0.3 0.1 0.3 0.4", "2 0.5 0.5 0.6"], ["row"]),  # an odd number of coordinates
        (["1 0.1 0.1 0.3 0.1 0.3 0.4", "2"], ["row"]),
        (["1 0.1 0.1 0.3 0.1 0.3 0.4", "7 0.1 0.1 0.3 0.1 0.3 0.4"], ["class"]),
        (["1 0.1 0.1 0.3 0.1 0.3 nan"], ["box"]),
        (["1 0.1 0.1 0.3 0.1 0.3 0.4", "0 0.5 0.5 0.2 0.2"], ["row"]),  # mixed
        (["0 0.5 0.5 0.2 0.2", "0 0.5 0.5 0.2"], ["row"]),
        (["0 1.01000001 0.5 0.2 0.2"], []),  # float32 rounds it to 1.01, as in Ultralytics
        (["0 0.5 0.5 0 0"], []),
    ],
)
def test_polygon_and_box_rows_follow_ultralytics(tmp_path, rows, kinds):
    from yoloprune.data.verify import check_label_file

    text = "".join(f"{r}\n" for r in rows)
    path = tmp_path / "x.txt"
    path.write_text(text)
    assert [p.kind for p in check_label_file(path, nc=6)[1]] == kinds
    assert _ultralytics_keeps(tmp_path, text) == (not kinds)


@pytest.mark.parametrize(
    ("rows", "kinds"),
    [
        (["0 0.5 0.5 0.2 0.2 0.4 0.4 2 0.6 0.6 1"], []),  # a keypoint row: its box is kept
        (["0 0.5 0.5 0.2 0.2 1.4 0.4 2 -0.6 0.6 0"], []),  # keypoints are not looked at
        (["0 0.5 0.5 0.2 0.2 0.4 0.4 2 0.6 0.6 1", "1 0.5 0.5 0.1 0.1"], []),
        (["0 1.5 0.5 0.2 0.2 0.4 0.4 2 0.6 0.6 1"], ["box"]),
        (["0 0.5 0.5 0.2 0.2 0.4 0.4 2 0.6 0.6"], ["row"]),  # 10 columns: neither a keypoint row nor a polygon
    ],
)
def test_keypoint_rows_of_a_pose_dataset_count_as_boxes(tmp_path, rows, kinds):
    from yoloprune.data.verify import check_label_file

    text = "".join(f"{r}\n" for r in rows)
    path = tmp_path / "x.txt"
    path.write_text(text)
    assert [p.kind for p in check_label_file(path, nc=6, pose_columns=5 + 2 * 3)[1]] == kinds
    assert _ultralytics_keeps(tmp_path, text, kpt_shape=(2, 3)) == (not kinds)


def test_pose_yaml_for_detection(tmp_path, tiny_data):
    root = _copy(tmp_path, tiny_data)
    for label in (root / "labels").rglob("*.txt"):
        label.write_text("".join(f"{row.strip()} 0.5 0.5 2\n" for row in label.read_text().splitlines()))
    raw = yaml.safe_load((root / "data.yaml").read_text())
    with pytest.raises(DatasetError, match=r"8 columns; a polygon row .* a keypoint row needs the YAML's kpt_shape"):
        inspect_dataset(root / "data.yaml")
    (root / "data.yaml").write_text(yaml.safe_dump({**raw, "kpt_shape": [1, 3]}))
    assert inspect_dataset(root / "data.yaml").n_val == len(list((root / "images" / "val").glob("*.jpg")))
    for bad in ([1], "1 3", None, [1.5, 3]):
        (root / "data.yaml").write_text(yaml.safe_dump({**raw, "kpt_shape": bad}))
        with pytest.raises(DatasetError, match=r"kpt_shape is .*e.g. 'kpt_shape: \[17, 3\]'"):
            inspect_dataset(root / "data.yaml")


def _ultralytics_images(path: Path) -> list[str]:
    from types import SimpleNamespace

    from ultralytics.data.base import BaseDataset

    return BaseDataset.get_img_files(SimpleNamespace(prefix="", fraction=1.0), str(path))  # type: ignore[arg-type]


def test_folder_listing_follows_ultralytics(tmp_path, tiny_data):
    root = _copy(tmp_path, tiny_data)
    train = root / "images" / "train"
    (train / "._train_00000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata: skipped
    (train / ".thumbs").mkdir()
    (train / ".thumbs" / "t.jpg").write_text("not an image")  # a hidden folder: skipped
    (train / "notes.md").write_text("not an image either")
    (train / "README").write_text("no suffix")
    moved = root / "elsewhere" / "images" / "more"
    moved.parent.mkdir(parents=True)
    (root / "images" / "val").rename(moved)
    (root / "elsewhere" / "labels").mkdir()
    (root / "labels" / "val").rename(root / "elsewhere" / "labels" / "more")
    (root / "images" / "val").mkdir()
    (root / "images" / "val" / "linked").symlink_to(moved)  # a split made only of a symlinked folder
    (root / "labels" / "val").mkdir()
    (root / "labels" / "val" / "linked").symlink_to(root / "elsewhere" / "labels" / "more")
    info = inspect_dataset(root / "data.yaml")
    from yoloprune.data.check import split_images

    for split, folder in (("train", train), ("val", root / "images" / "val")):
        assert [str(p) for p in split_images(info, split)] == _ultralytics_images(folder)
    assert (info.n_train, info.n_val) == (len(list(train.glob("[!.]*.jpg"))), len(list(moved.glob("*.jpg"))))


def test_list_lines_follow_ultralytics(tmp_path, tiny_data, monkeypatch):
    root = _copy(tmp_path, tiny_data)
    images = sorted((root / "images" / "val").glob("*.jpg"))
    lines = [f"./images/val/{images[0].name}", "./images/val/notes.md", "", str(images[1])]
    lines += [f"images/val/{p.name}" for p in images[2:]]  # relative to the current directory
    (root / "val.txt").write_text("\ufeff" + "\n".join(lines) + "\n")  # with a byte-order mark
    raw = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump({**raw, "val": "val.txt"}))
    monkeypatch.chdir(root)
    from yoloprune.data.check import split_images

    info = inspect_dataset(root / "data.yaml")
    assert info.n_val == len(images)
    assert [str(p) for p in split_images(info, "val")] == [
        str(Path(p).absolute()) for p in _ultralytics_images(root / "val.txt")
    ]
    monkeypatch.chdir(tmp_path)  # the relative lines now name nothing, in Ultralytics as here
    with pytest.raises(DatasetError, match="listed in the split but does not exist"):
        inspect_dataset(root / "data.yaml")
    (root / "val.txt").write_text(f"{images[0]} \n{images[1]}\n")  # Ultralytics skips "x.jpg ": refused
    with pytest.raises(DatasetError, match=r"does not exist \(the line has spaces around the path\)"):
        inspect_dataset(root / "data.yaml")


def test_image_formats_are_ultralytics(tmp_path):
    from ultralytics.data.utils import IMG_FORMATS

    from yoloprune.data.check import IMAGE_FORMATS

    assert IMAGE_FORMATS == IMG_FORMATS


# The check's cache: a split that passed is not read again until one of its files changes.


def _age(root: Path, seconds: float = 60) -> None:
    import os
    import time

    for f in root.rglob("*"):
        os.utime(f, (time.time() - seconds,) * 2)


def test_a_passing_split_is_not_checked_again_until_a_file_changes(tmp_path, tiny_data, monkeypatch):
    import os

    from yoloprune.data import check

    root = _copy(tmp_path, tiny_data)
    _age(root)
    cache = tmp_path / "cache"
    calls = []
    real = check.check_split
    monkeypatch.setattr(check, "check_split", lambda *a: calls.append(a) or real(*a))
    before = sorted(root.rglob("*"))
    info = inspect_dataset(root / "data.yaml", cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2
    assert sorted(root.rglob("*")) == before  # nothing written in the dataset's folder
    assert inspect_dataset(root / "data.yaml", cache_dir=cache) == info and len(calls) == 2
    label = sorted((root / "labels" / "val").glob("*.txt"))[0]
    stat = label.stat()
    label.write_text(label.read_text().replace("0.", "9.", 1).replace(" 0.", " 9.", 1))  # same size, new mtime
    assert label.stat().st_size == stat.st_size
    with pytest.raises(DatasetError, match=rf"{label.name}:1: value 9\..* outside"):
        inspect_dataset(root / "data.yaml", cache_dir=cache)
    assert len(calls) == 3  # the val split only
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: trusted, by design
    assert inspect_dataset(root / "data.yaml", cache_dir=cache).n_val == info.n_val


def test_the_cache_is_keyed_by_nc_and_skips_fresh_files(tmp_path, tiny_data, monkeypatch):
    from yoloprune.data import check

    root = _copy(tmp_path, tiny_data)
    for f in root.rglob("*"):  # copytree kept the fixture's times: make every file just written
        f.touch()
    cache = tmp_path / "cache"
    inspect_dataset(root / "data.yaml", cache_dir=cache)
    assert not list(cache.glob("*.json"))  # just written files may change again within the clock's tick
    _age(root)
    inspect_dataset(root / "data.yaml", cache_dir=cache)
    raw = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump({**raw, "names": raw["names"] | {99: "extra"}}))
    calls = []
    monkeypatch.setattr(check, "check_split", lambda *a: calls.append(a) or check.SplitCheck(problems=[]))
    with pytest.raises(DatasetError):  # a check ran (and found nothing): not the stored verdict
        inspect_dataset(root / "data.yaml", cache_dir=cache)
    assert calls
    for entry in cache.glob("*.json"):
        entry.write_text("{not json")
    calls.clear()
    (root / "data.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(DatasetError):
        inspect_dataset(root / "data.yaml", cache_dir=cache)
    assert calls  # a damaged entry is checked again
