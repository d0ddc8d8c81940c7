"""Read and check a user's Ultralytics dataset YAML before any training starts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from yoloprune.data.verify import check_split, describe_problems, label_path
from yoloprune.errors import DatasetError
from yoloprune.log import get_logger

LOGGER = get_logger(__name__)

#: Ultralytics' image suffixes (``IMG_FORMATS``); an image Pillow cannot open (HEIF without pi-heif) fails the check.
IMAGE_SUFFIXES = frozenset(
    {".avif", ".bmp", ".dng", ".heic", ".heif", ".jp2", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}
)
#: A split this large gets a log line before its check (about 0.15 ms an image on a local disk).
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
    """Every image file of the dataset's ``split`` (``train`` or ``val``), in a stable order."""
    entries = info.resolved[split]
    files: list[Path] = []
    for item in entries if isinstance(entries, list) else [entries]:
        files.extend(_entry_images(info.root, item) or [])
    return files


def _entry_images(root: Path, item: Any) -> list[Path] | None:
    """The images one split entry names (a folder, or a .txt list of image paths); None if it does not exist.

    A listed path starting with ``./`` is relative to the list's folder (Ultralytics' rule); any other relative
    path is relative to the dataset root.
    """
    p = Path(str(item))
    p = p if p.is_absolute() else root / p
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if p.is_file() and p.suffix == ".txt":
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        return [_listed(root, p.parent, line) for line in lines]
    return None


def _listed(root: Path, folder: Path, line: str) -> Path:
    if line.startswith("./"):
        return folder / line[2:]
    return Path(line) if Path(line).is_absolute() else root / line


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


def inspect_dataset(data_yaml: str | Path) -> DatasetInfo:
    """Load ``data_yaml``, resolve its paths, count images, and raise :class:`DatasetError` on any gap."""
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
    names = data["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"dataset YAML '{path}': names must be a non-empty list or mapping of class names.")
    try:
        names = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError) as e:
        raise DatasetError(f"dataset YAML '{path}': names keys must be class indices 0, 1, ... ({e}).") from e

    root = _root(path, data.get("path"))
    splits = {split: _split_files(root, data[split], split, path) for split in ("train", "val")}
    _verify(path, splits, len(names))
    resolved = {**data, "path": str(root), "names": names}
    resolved.pop("download", None)  # never let Ultralytics try to fetch a dataset
    return DatasetInfo(path.resolve(), root, names, len(splits["train"]), len(splits["val"]), resolved)


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
    if not files:
        raise DatasetError(
            f"dataset YAML '{yaml_path}': the {split} split holds no images ({entries}, resolved against '{root}'). "
            f"Put the images there (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}) or point '{split}' at the folder "
            "that holds them."
        )
    return files


def _verify(yaml_path: Path, splits: dict[str, list[Path]], nc: int) -> None:
    """Raise :class:`DatasetError` on any image or label Ultralytics would drop; log backgrounds and unlabelled."""
    problems = []
    for split, files in splits.items():
        if len(files) >= LARGE_SPLIT:
            LOGGER.info("checking the labels and image headers of %d %s images", len(files), split)
        found = check_split(files, nc)
        problems.extend(found.problems)
        if found.boxes == 0 and not found.problems:
            why = f"no '{label_path(found.unlabelled[0])}'" if found.unlabelled else "every label file is empty"
            raise DatasetError(
                f"dataset YAML '{yaml_path}': the {split} split has no labelled object in its {found.images} images "
                f"({why}). Ultralytics reads the labels of images/{split}/x.jpg from labels/{split}/x.txt, one "
                "'class x_center y_center width height' row per object."
            )
        if found.unlabelled:
            LOGGER.warning(
                "%s: %d of %d %s images have no label file and count as backgrounds (no objects), e.g. '%s' has no "
                "'%s'",
                yaml_path,
                len(found.unlabelled),
                found.images,
                split,
                found.unlabelled[0],
                label_path(found.unlabelled[0]),
            )
        if found.backgrounds:
            LOGGER.info("%s: %d %s images have an empty label file: backgrounds", yaml_path, found.backgrounds, split)
    if problems:
        raise DatasetError(
            f"dataset YAML '{yaml_path}': images or labels Ultralytics would silently drop; yoloprune refuses them so "
            f"that every metric covers the whole dataset. {describe_problems(problems, nc)}"
        )
