"""Tables that describe a model's stages and a pruning result."""

from __future__ import annotations

import pandas as pd
from torch import nn

from yoloprune.pruning.costs import flops_by_module
from yoloprune.pruning.stages import find_stages, layer_output_shapes
from yoloprune.ultra.models import layers


def stage_table(model: nn.Module, imgsz: int = 640) -> pd.DataFrame:
    """One row per stage: layer indices, module types, output channels, parameter and FLOPs share."""
    stages = find_stages(model)
    flops = flops_by_module(model, imgsz)
    total_flops = flops[""] or 1.0
    shapes = layer_output_shapes(model)
    total_params = sum(p.numel() for p in model.parameters()) or 1
    rows = []
    for stage in stages:
        params = sum(p.numel() for i in stage.layers for p in layers(model)[i].parameters())
        stage_flops = sum(flops.get(f"model.{i}", 0.0) for i in stage.layers)
        rows.append(
            {
                "stage": stage.name,
                "layers": _span(stage.layers),
                "modules": ",".join(sorted({type(layers(model)[i]).__name__ for i in stage.layers})),
                "out_channels": " ".join(_channels(shapes[i]) for i in stage.layers),
                "params": params,
                "params_%": round(100 * params / total_params, 1),
                f"GFLOPs@{imgsz}": round(stage_flops / 1e9, 3),
                "flops_%": round(100 * stage_flops / total_flops, 1),
                "prunable": "yes" if stage.prunable else "opt-in" if stage.opt_in else "no",
            }
        )
    return pd.DataFrame(rows)


def _span(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _channels(shape: tuple[int, int, int] | None) -> str:
    return "-" if shape is None else str(shape[0])
