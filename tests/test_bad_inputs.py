"""Bad inputs through the real CLI: each gets exit code 2 and one `error:` message naming the file (and the line,
for labels) and the fix, with no traceback, before any training. An empty label file is legal (a background).

Each case copies a tiny synthetic dataset (or writes a bad .pt), runs the command a user runs first on their
own model and data (`stages`, `prune`, `val`, `finetune`, `search`), and reads what the user sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from yoloprune.cli import main
from yoloprune.data import SyntheticSpec, generate_dataset

CLI = [sys.executable, "-m", "yoloprune.cli"]


@dataclass(frozen=True)
class Given:
    """What a case may use: the good checkpoint, the good dataset's folder, and a folder of its own."""

    good_pt: Path
    data: Path
    tmp: Path

    def dataset(self) -> Path:
        """A fresh copy of the good dataset (its YAML pointing at the copy); returns the copy's folder."""
        copy = self.tmp / "ds"
        shutil.copytree(self.data, copy)
        yaml_path = copy / "data.yaml"
        raw = yaml.safe_load(yaml_path.read_text())
        yaml_path.write_text(yaml.safe_dump({**raw, "path": str(copy)}))
        return copy


@dataclass(frozen=True)
class Case:
    """A bad input: ``make`` writes it and returns (argv, the path the message must name, the fix's words)."""

    id: str
    make: Callable[[Given], tuple[list[str], str, str]]


def _val(g: Given, ds: Path) -> list[str]:
    return ["val", str(g.good_pt), "--data", str(ds / "data.yaml"), "--imgsz", "64", "--device", "cpu"]


def _finetune(g: Given, ds: Path) -> list[str]:
    out = ["-o", str(g.tmp / "tuned.pt"), "--project", str(g.tmp / "runs")]
    return ["finetune", str(g.good_pt), "--data", str(ds / "data.yaml"), "--epochs", "1", "--imgsz", "64", *out]


def _search(g: Given, data_yaml: Path, model: Path | None = None) -> list[str]:
    """`search` of the smallest experiment on ``data_yaml``."""
    raw = {
        "name": "bad-input",
        "model": str(model or g.good_pt),
        "data": str(data_yaml),
        "imgsz": 64,
        "device": "cpu",
        "space": {"ratios": {"neck": {"low": 0.1, "high": 0.5}}},
        "finetune": {"epochs": 1, "batch": 4, "bn_batches": 1},
        "budget": {"trials": 1},
        "output": str(g.tmp / "out"),
    }
    path = g.tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return ["search", str(path), "--no-progress"]


def _write_pt(g: Given, name: str, obj: object) -> Path:
    path = g.tmp / name
    torch.save(obj, path)
    return path


def _truncated_pt(g: Given) -> tuple[list[str], str, str]:
    path = g.tmp / "truncated.pt"
    path.write_bytes(g.good_pt.read_bytes()[: g.good_pt.stat().st_size // 2])
    return ["stages", str(path), "--imgsz", "64"], str(path), "Copy or download it again"


def _empty_pt(g: Given) -> tuple[list[str], str, str]:
    path = g.tmp / "empty.pt"
    path.write_bytes(b"")
    return ["prune", str(path), "--uniform", "0.3", "-o", str(g.tmp / "pruned.pt")], str(path), "download it again"


def _text_pt(g: Given) -> tuple[list[str], str, str]:
    path = g.tmp / "notes.pt"
    path.write_text("these are my notes, not a model\n")
    return ["stages", str(path)], str(path), "Pass the .pt the Ultralytics trainer wrote"


def _dict_pt(g: Given) -> tuple[list[str], str, str]:
    path = _write_pt(g, "dict.pt", {"epoch": 3, "lr": 0.01})
    return ["stages", str(path)], str(path), "Pass the .pt the Ultralytics trainer wrote"


def _tensor_pt(g: Given) -> tuple[list[str], str, str]:
    path = _write_pt(g, "tensor.pt", torch.zeros(3))
    return ["prune", str(path), "--uniform", "0.3", "-o", str(g.tmp / "pruned.pt")], str(path), "holds a Tensor"


def _state_dict_pt(g: Given) -> tuple[list[str], str, str]:
    weights = torch.load(g.good_pt, map_location="cpu", weights_only=False)["model"].state_dict()
    path = _write_pt(g, "state_dict.pt", {"model": weights})
    return _search(g, g.data / "data.yaml", model=path), str(path), "weights without the architecture"


def _classifier_pt(g: Given) -> tuple[list[str], str, str]:
    from ultralytics.nn.tasks import ClassificationModel

    path = _write_pt(g, "classifier.pt", {"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)})
    return ["stages", str(path)], str(path), "classification models are not supported"


def _foreign_class_pt(g: Given) -> tuple[list[str], str, str]:
    """A checkpoint pickling a class from code this environment lacks (another project, another Ultralytics)."""
    import importlib

    (g.tmp / "their_project.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    sys.path.insert(0, str(g.tmp))
    try:
        path = _write_pt(g, "foreign.pt", {"model": importlib.import_module("their_project").Net()})
    finally:
        sys.path.remove(str(g.tmp))
        del sys.modules["their_project"]
    (g.tmp / "their_project.py").unlink()
    return ["stages", str(path)], str(path), "Load it where it was made and re-save it"


def _text_as_image(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    image = ds / "images" / "val" / "val_00001.jpg"
    image.write_text("<html>404 Not Found</html>\n")
    return _val(g, ds), str(image), "replace each unreadable image, or delete it together with its label file"


def _random_bytes_image(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    image = ds / "images" / "train" / "train_00002.jpg"
    image.write_bytes(os.urandom(3000))
    return _finetune(g, ds), str(image), "replace each unreadable image"


def _append_row(ds: Path, split: str, stem: str, row: str, *, first: bool = False) -> tuple[Path, int]:
    """Add ``row`` to a label file; return the file and the row's line number."""
    path = ds / "labels" / split / f"{stem}.txt"
    lines = path.read_text().splitlines()
    lines = [row, *lines] if first else [*lines, row]
    path.write_text("\n".join(lines) + "\n")
    return path, 1 if first else len(lines)


def _class_out_of_range(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    label, line = _append_row(ds, "val", "val_00001", "6 0.5 0.5 0.1 0.1")  # nc is 6: ids 0-5
    return _search(g, ds / "data.yaml"), f"{label}:{line}", "class ids are 0-based indices into the YAML's names"


def _box_outside(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    label, line = _append_row(ds, "val", "val_00002", "1 1.4 0.5 0.1 0.1")
    return _val(g, ds), f"{label}:{line}", "normalised to [0, 1] by the image's width and height"


def _negative_box(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    label, line = _append_row(ds, "train", "train_00003", "2 0.5 -0.3 0.1 0.1", first=True)
    return _finetune(g, ds), f"{label}:{line}", "divide pixel values by them"


def _pixel_box(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    label, line = _append_row(ds, "val", "val_00000", "0 32 30 12 12")  # pixels, not normalised
    return _val(g, ds), f"{label}:{line}", "normalised to [0, 1]"


def _short_row(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    label, line = _append_row(ds, "val", "val_00003", "3 0.5 0.5 0.2")
    return _val(g, ds), f"{label}:{line}", "each row is 'class x_center y_center width height'"


def _missing_split_key(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    raw = yaml.safe_load((ds / "data.yaml").read_text())
    del raw["val"]
    (ds / "data.yaml").write_text(yaml.safe_dump(raw))
    return _search(g, ds / "data.yaml"), str(ds / "data.yaml"), "lacks val; an Ultralytics data YAML needs train, val"


def _missing_split_path(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    raw = yaml.safe_load((ds / "data.yaml").read_text())
    (ds / "data.yaml").write_text(yaml.safe_dump({**raw, "val": "images/valid"}))
    return _val(g, ds), str(ds / "images" / "valid"), "fix the path or the 'val' key"


def _empty_split(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    shutil.rmtree(ds / "images" / "val")
    (ds / "images" / "val").mkdir()
    return _search(g, ds / "data.yaml"), str(ds / "data.yaml"), "Put the images there"


def _no_labels(g: Given) -> tuple[list[str], str, str]:
    ds = g.dataset()
    shutil.rmtree(ds / "labels" / "val")
    return _val(g, ds), str(ds / "labels" / "val" / "val_00000.txt"), "labels of images/val/x.jpg from labels/val/x.txt"


CASES = [
    Case("truncated_pt", _truncated_pt),
    Case("empty_pt", _empty_pt),
    Case("text_file_pt", _text_pt),
    Case("dict_pt", _dict_pt),
    Case("tensor_pt", _tensor_pt),
    Case("state_dict_pt", _state_dict_pt),
    Case("classifier_pt", _classifier_pt),
    Case("pt_from_other_code", _foreign_class_pt),
    Case("text_file_as_image", _text_as_image),
    Case("random_bytes_as_image", _random_bytes_image),
    Case("class_id_ge_nc", _class_out_of_range),
    Case("box_x_above_1", _box_outside),
    Case("box_y_negative", _negative_box),
    Case("box_in_pixels", _pixel_box),
    Case("label_row_4_columns", _short_row),
    Case("split_key_missing", _missing_split_key),
    Case("split_path_missing", _missing_split_path),
    Case("split_folder_empty", _empty_split),
    Case("split_without_labels", _no_labels),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 6-class yolov8n checkpoint and an 8/4-image 64 px dataset it fits."""
    from yoloprune.ultra.checkpoint import save_checkpoint
    from yoloprune.ultra.models import load_detector

    root = tmp_path_factory.mktemp("good")
    data = generate_dataset(root / "ds", SyntheticSpec(n_train=8, n_val=4, imgsz=64, seed=2)).parent
    return save_checkpoint(load_detector("yolov8n.yaml", nc=6), root / "base.pt"), data


def _given(good: tuple[Path, Path], tmp_path: Path) -> Given:
    return Given(good[0], good[1], tmp_path)


def _assert_clear_error(code: int, err: str, named: str, fix: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    message = err[err.rindex("error: ") :]
    assert named in message, message
    assert fix in message, message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_clear_error(case, good, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    argv, named, fix = case.make(_given(good, tmp_path))
    code = main(argv)
    _assert_clear_error(code, capfd.readouterr().err, named, fix)
    assert not list(tmp_path.glob("pruned.pt")) and not list(tmp_path.glob("tuned.pt"))  # nothing written
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out" / "runs").exists()  # nothing trained


@pytest.mark.parametrize("case_id", ["truncated_pt", "class_id_ge_nc"])
def test_the_console_script_prints_the_same(case_id, good, tmp_path):
    """The same, through a fresh `python -m yoloprune.cli` process (what the `yoloprune` script runs)."""
    case = next(c for c in CASES if c.id == case_id)
    argv, named, fix = case.make(_given(good, tmp_path))
    proc = subprocess.run([*CLI, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    _assert_clear_error(proc.returncode, proc.stderr, named, fix)


def test_empty_label_file_is_a_background_image(good, tmp_path):
    """Legal in YOLO: an empty label file is an image with no objects. A missing one counts the same, with a warning."""
    ds = _given(good, tmp_path).dataset()
    (ds / "labels" / "val" / "val_00001.txt").write_text("")
    (ds / "labels" / "val" / "val_00002.txt").unlink()
    proc = subprocess.run([*CLI, *_val(_given(good, tmp_path), ds)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mAP50" in proc.stdout
    assert "1 val images have an empty label file: backgrounds" in proc.stderr
    assert f"1 of 4 val images have no label file and count as backgrounds (no objects), e.g. '{ds}" in proc.stderr
    assert "2 backgrounds, 0 corrupt" in proc.stdout + proc.stderr  # Ultralytics kept all four, two as backgrounds
