"""Params and GFLOPs at 640 px of yolov8n and yolov8s (80 classes, built from YAML) before and after uniform
pruning at 0.3 and 0.5 with channel rounding 1 and 8.

    .venv/bin/python experiments/prune_table.py
"""

from __future__ import annotations

import time

import pandas as pd

from yoloprune.pruning import find_stages, measure_costs, prune
from yoloprune.ultra.models import load_detector


def main() -> None:
    rows = []
    for cfg in ("yolov8n.yaml", "yolov8s.yaml"):
        base = load_detector(cfg)
        b = measure_costs(base, 640)
        rows.append(
            {
                "model": cfg.removesuffix(".yaml"),
                "ratio": 0.0,
                "round_to": "-",
                "params_M": b.params / 1e6,
                "GFLOPs": b.gflops,
                "params_x": 1.0,
                "flops_x": 1.0,
                "prune_s": 0.0,
            }
        )
        stages = [s.name for s in find_stages(base) if s.prunable]
        for ratio in (0.3, 0.5):
            for round_to in (1, 8):
                t = time.perf_counter()
                pruned = prune(base, {s: ratio for s in stages}, round_to=round_to)
                dt = time.perf_counter() - t
                c = measure_costs(pruned, 640)
                rows.append(
                    {
                        "model": cfg.removesuffix(".yaml"),
                        "ratio": ratio,
                        "round_to": round_to,
                        "params_M": c.params / 1e6,
                        "GFLOPs": c.gflops,
                        "params_x": c.params / b.params,
                        "flops_x": c.gflops / b.gflops,
                        "prune_s": dt,
                    }
                )
    table = pd.DataFrame(rows).round(3)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
