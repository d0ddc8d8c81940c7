"""Read and check a user's Ultralytics dataset YAML before any training starts."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

import yoloprune.data.check_cache as check_cache
from yoloprune.data.verify import SplitCheck, check_split, describe_problems, label_path
from yoloprune.errors import DatasetError
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: Ultralytics' image suffixes (``IMG_FORMATS``); an image Pillow cannot open (HEIF without pi-heif) fails the check.
IMAGE_FORMATS = frozenset(
    {"avif", "bmp", "dng", "heic", "heif", "jp2", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp"}
)
#: A split this large gets a log line before its check (0.2-0.4 ms an image on a local disk; see verify.py).
LARGE_SPLIT = 20_000


@dataclass(frozen=True)
class DatasetInfo:
    """A checked dataset.

    Attributes:
        yaml_path: the YAML as given.
        root: the dataset root every relative split path is resolved against.
        names: class index -> name.
        n_train: number of training images found.
        n_val: number of validation images found.
        resolved: the YAML's content with ``path`` made absolute, ready to hand to Ultralytics.
    """

    yaml_path: Path
    root: Path
    names: dict[int, str]
    n_train: int
    n_val: int
    resolved: dict[str, Any] = field(repr=False)

    @property
    def nc(self) -> int:
        return len(self.names)

    def write_resolved(self, folder: Path) -> Path:
        """Write the resolved YAML into ``folder`` (so Ultralytics sees the same paths) and return it."""
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"{self.yaml_path.stem}.resolved.yaml"
        out.write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        return out


def split_images(info: DatasetInfo, split: str) -> list[Path]:
    """Every image file of the dataset's ``split`` (``train`` or ``val``), sorted as Ultralytics sorts them."""
    entries = info.resolved[split]
    files: list[Path] = []
    for item in entries if isinstance(entries, list) else [entries]:
        files.extend(_entry_images(info.root, item) or [])
    return sorted(files, key=str)


def is_image_name(name: str) -> bool:
    """Whether Ultralytics takes ``name`` for an image: the text after its last dot is an image format."""
    return name.rpartition(".")[-1].lower() in IMAGE_FORMATS


def _entry_images(root: Path, item: Any) -> list[Path] | None:
    """The images one split entry names (a folder, or a .txt list of image paths); None if it does not exist.

    As Ultralytics' ``get_img_files``: a folder is globbed recursively for ``*.*`` (so hidden files and folders,
    such as macOS's ``._x.jpg``, are skipped and symlinked folders are followed); a list's line starting with
    ``./`` is relative to the list's folder, any other relative line to the current directory; both keep only
    the names :func:`is_image_name` accepts. A line that is an image's name but for surrounding spaces is kept,
    so that the check refuses the image Ultralytics would silently leave out.
    """
    p = Path(str(item))
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        found = glob.glob(str(Path(glob.escape(str(p))) / "**" / "*.*"), recursive=True)
        return [Path(f) for f in found if is_image_name(f)]
    if p.is_file() and p.suffix == ".txt":
        lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
        parent = str(p.parent) + os.sep
        listed = [line.replace("./", parent, 1) if line.startswith("./") else line for line in lines]
        return [Path(line).absolute() for line in listed if is_image_name(line.strip())]
    return None


def held_out_subset(info: DatasetInfo, images: int, folder: Path, *, skip: int = 0) -> DatasetInfo:
    """The dataset with its val split replaced by ``images`` training images spread evenly over the training
    split after its first ``skip`` (the ones BN re-estimation reads): EagleEye's sub-validation set, so that
    choosing candidates by it never selects on the validation set the proxy reports.

    The subset is a list file in ``folder``; Ultralytics finds each image's label as usual. A training split
    with no image beyond ``skip`` falls back to all of it.
    """
    files = split_images(info, "train")
    files = files[skip:] or files
    if len(files) > images:
        step = len(files) / images
        files = [files[int(i * step)] for i in range(images)]
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / f"held_out_{len(files)}_skip{skip}.txt"
    listing.write_text("".join(f"{f.resolve()}\n" for f in files))
    return replace(info, n_val=len(files), resolved={**info.resolved, "val": str(listing)})


def inspect_dataset(data_yaml: str | Path, *, cache_dir: Path | None = None) -> DatasetInfo:
    """Load ``data_yaml``, resolve its paths, count images, and raise :class:`DatasetError` on any gap.

    A split that passed before, with every image and label file unchanged, is not read again: its result is
    kept in ``cache_dir`` (default ``<yoloprune home>/dataset-checks``; see :mod:`yoloprune.data.check_cache`).
    """
    path = Path(data_yaml)
    if not path.is_file():
        raise DatasetError(f"dataset YAML '{path}' does not exist. Pass the path to an Ultralytics data YAML.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DatasetError(f"dataset YAML '{path}' is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"dataset YAML '{path}' must be a mapping with train, val and names keys.")
    missing = [k for k in ("train", "val", "names") if k not in data]
    if missing:
        example = {"train": "train: images/train", "val": "val: images/val", "names": "names: [cat, dog]"}
        raise DatasetError(
            f"dataset YAML '{path}' lacks {', '.join(missing)}; an Ultralytics data YAML needs train, val and names. "
            f"Add e.g. '{example[missing[0]]}' (a folder of images, or a .txt list of them, relative to 'path')."
        )
    names = _names(path, data["names"])
    pose_columns = _pose_columns(path, data)
    root = _root(path, data.get("path"))
    splits = {split: _split_files(root, data[split], split, path) for split in ("train", "val")}
    if cache_dir is None:
        from yoloprune.offline import yoloprune_home

        cache_dir = yoloprune_home() / "dataset-checks"
    _verify(path, splits, _Rules(len(names), pose_columns, cache_dir))
    resolved = {**data, "path": str(root), "names": names}
    resolved.pop("download", None)  # never let Ultralytics try to fetch a dataset
    return DatasetInfo(path.resolve(), root, names, len(splits["train"]), len(splits["val"]), resolved)


def _names(path: Path, names: Any) -> dict[int, str]:
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"dataset YAML '{path}': names must be a non-empty list or mapping of class names.")
    try:
        return {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"dataset YAML '{path}': names keys must be class indices 0, 1, ... ({e}).") from e


def _pose_columns(path: Path, data: dict[str, Any]) -> int:
    """The width of a keypoint row of a pose YAML (0 without ``kpt_shape``); Ultralytics' detection loader cuts
    such a row to its box."""
    if "kpt_shape" not in data:
        return 0
    shape = data["kpt_shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape)):
        raise DatasetError(
            f"dataset YAML '{path}': kpt_shape is {shape!r}; Ultralytics needs [number of keypoints, dimensions "
            "(2 for x y, 3 for x y visible)], e.g. 'kpt_shape: [17, 3]'. Fix it, or delete it for a detection dataset."
        )
    nkpt, ndim = shape
    return 5 + nkpt * ndim if nkpt else 0


def _root(yaml_path: Path, declared: Any) -> Path:
    if not declared:
        return yaml_path.resolve().parent
    root = Path(str(declared)).expanduser()
    if root.is_absolute():
        return root
    beside = (yaml_path.resolve().parent / root).resolve()
    if beside.exists():
        return beside
    from yoloprune.offline import configure_offline

    configure_offline()
    from ultralytics.utils import DATASETS_DIR  # Ultralytics' own rule for a relative root

    return (Path(DATASETS_DIR) / root).resolve()


def _split_files(root: Path, entry: Any, split: str, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        found = _entry_images(root, item)
        if found is None:
            p = Path(str(item))
            raise DatasetError(
                f"dataset YAML '{yaml_path}': {split} path '{p if p.is_absolute() else root / p}' does not exist. "
                f"Paths are resolved against '{root}' (the YAML's 'path' key); fix the path or the '{split}' key."
            )
        files.extend(found)
    files.sort(key=str)  # Ultralytics' order
    if not files:
        raise DatasetError(
            f"dataset YAML '{yaml_path}': the {split} split holds no images ({entries}, resolved against '{root}'). "
            f"Put the images there (suffixes {', '.join(f'.{x}' for x in sorted(IMAGE_FORMATS))}) or point '{split}' at the folder "
            "that holds them."
        )
    return files


@dataclass(frozen=True)
class _Rules:
    nc: int
    pose_columns: int
    cache_dir: Path


def _verify(yaml_path: Path, splits: dict[str, list[Path]], rules: _Rules) -> None:
    """Raise :class:`DatasetError` on any image or label Ultralytics would drop; log backgrounds and unlabelled."""
    problems = []
    for split, files in splits.items():
        found = _check(yaml_path, split, files, rules)
        problems.extend(found.problems)
        if found.boxes == 0 and not found.problems:
            example = found.unlabelled_example
            why = f"no '{label_path(example)}'" if example else "every label file is empty"
            raise DatasetError(
                f"dataset YAML '{yaml_path}': the {split} split has no labelled object in its {found.images} images "
                f"({why}). Ultralytics reads the labels of images/{split}/x.jpg from labels/{split}/x.txt, one "
                "'class x_center y_center width height' row per object."
            )
        if found.unlabelled_example:
            LOGGER.warning(
                "%s: %d of %d %s images have no label file and count as backgrounds (no objects), e.g. '%s' has no "
                "'%s'",
                yaml_path,
                found.unlabelled,
                found.images,
                split,
                found.unlabelled_example,
                label_path(found.unlabelled_example),
            )
        if found.backgrounds:
            LOGGER.info("%s: %d %s images have an empty label file: backgrounds", yaml_path, found.backgrounds, split)
    if problems:
        raise DatasetError(
            f"dataset YAML '{yaml_path}': images or labels Ultralytics would silently drop; yoloprune refuses them so "
            f"that every metric covers the whole dataset. {describe_problems(problems, rules.nc)}"
        )


def _check(yaml_path: Path, split: str, files: list[Path], rules: _Rules) -> SplitCheck:
    """One split's check, or its stored result when it passed before and no file has changed."""
    digest, newest = check_cache.split_digest(files, rules.nc, rules.pose_columns)
    entry = check_cache.entry_path(rules.cache_dir, yaml_path, split)
    found = check_cache.load(entry, digest)
    if found is not None:
        LOGGER.debug("%s: the %s split passed the check before and is unchanged (%s)", yaml_path, split, entry)
        return found
    if len(files) >= LARGE_SPLIT:
        LOGGER.info("checking the labels and image headers of %d %s images", len(files), split)
    found = check_split(files, rules.nc, rules.pose_columns)
    if found.boxes:
        check_cache.store(entry, digest, newest, found)
    return found
