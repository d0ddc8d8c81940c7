"""Built-in data: a deterministic synthetic detection dataset in Ultralytics format."""

from yoloprune.data.check import DatasetInfo, inspect_dataset
from yoloprune.data.synthetic import CLASS_NAMES, SyntheticSpec, generate_dataset

__all__ = ["CLASS_NAMES", "DatasetInfo", "SyntheticSpec", "generate_dataset", "inspect_dataset"]
