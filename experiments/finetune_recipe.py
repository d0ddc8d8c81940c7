"""Which short fine-tune recipe recovers a pruned detector best? Prunes the difficulty study's base yolov8n
(400/100 images, 256 px, 40 epochs) uniformly at 0.2 with round_to 8, re-estimates BN, and fine-tunes
2 epochs with each optimiser setting.

    .venv/bin/python experiments/finetune_recipe.py
"""

from __future__ import annotations

import time

from yoloprune.data import SyntheticSpec
from yoloprune.experiment.builtin import DemoSetup, base_model_path, demo_dataset
from yoloprune.offline import ultralytics_quiet
from yoloprune.pruning import find_stages, prune
from yoloprune.ultra.models import load_detector
from yoloprune.ultra.train import finetune
from yoloprune.ultra.val import recalibrate_bn

RECIPES = {
    "auto (Ultralytics: AdamW, lr ~1e-3)": {"optimizer": "auto"},
    "SGD lr0 0.01": {"optimizer": "SGD", "lr0": 0.01},
    "SGD lr0 0.002": {"optimizer": "SGD", "lr0": 0.002},
    "AdamW lr0 3e-4": {"optimizer": "AdamW", "lr0": 0.0003},
}


def main() -> None:
    setup = DemoSetup(SyntheticSpec(n_train=400, n_val=100, imgsz=256), base_epochs=40)
    data = demo_dataset(setup)
    base = load_detector(base_model_path(setup))
    stages = [s.name for s in find_stages(base) if s.prunable]
    with ultralytics_quiet():
        for name, overrides in RECIPES.items():
            pruned = prune(base, dict.fromkeys(stages, 0.2), round_to=8)
            recalibrate_bn(pruned, data, imgsz=setup.imgsz)
            start = time.perf_counter()
            result = finetune(
                pruned,
                data,
                epochs=2,
                imgsz=setup.imgsz,
                project="outputs/recipe",
                name="r",
                keep_run=False,
                **overrides,
            )
            curve = [round(e["map50_95"], 4) for e in result.epochs]
            print(f"{name:40s} mAP50-95 by epoch {curve}  {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
