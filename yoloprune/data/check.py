"""Read and check a user's Ultralytics dataset YAML before any training starts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from yoloprune.errors import DatasetError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


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
        p = Path(str(item))
        p = p if p.is_absolute() else info.root / p
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            lines = [line.strip() for line in p.read_text().splitlines() if line.strip()]
            files.extend((info.root / line) if not Path(line).is_absolute() else Path(line) for line in lines)
    return files


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
        raise DatasetError(f"dataset YAML '{path}' lacks {', '.join(missing)}; an Ultralytics data YAML needs them.")
    names = data["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise DatasetError(f"dataset YAML '{path}': names must be a non-empty list or mapping of class names.")
    names = {int(k): str(v) for k, v in names.items()}

    root = _root(path, data.get("path"))
    n_train = _count_images(root, data["train"], "train", path)
    n_val = _count_images(root, data["val"], "val", path)
    resolved = {**data, "path": str(root), "names": names}
    resolved.pop("download", None)  # never let Ultralytics try to fetch a dataset
    return DatasetInfo(path.resolve(), root, names, n_train, n_val, resolved)


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


def _count_images(root: Path, entry: Any, split: str, yaml_path: Path) -> int:
    entries = entry if isinstance(entry, list) else [entry]
    total = 0
    for item in entries:
        p = Path(str(item))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            total += sum(1 for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            total += sum(1 for line in p.read_text().splitlines() if line.strip())
        else:
            raise DatasetError(
                f"dataset YAML '{yaml_path}': {split} path '{p}' does not exist. Paths are resolved against "
                f"'{root}' (the YAML's 'path' key)."
            )
    if total == 0:
        raise DatasetError(f"dataset YAML '{yaml_path}': the {split} split holds no images ({entries}).")
    return total
