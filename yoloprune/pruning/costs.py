"""Cost metrics: parameters, FLOPs at an image size, checkpoint size. One counter for base and pruned."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Costs:
    """Cost of one model at one image size.

    Attributes:
        params: number of parameters.
        gflops: forward FLOPs in billions for one ``imgsz`` x ``imgsz`` image (2 FLOPs per multiply-add,
            the convention of Ultralytics' GFLOPs figures).
        imgsz: image size the FLOPs were counted at.
        size_mb: size of the fp16 checkpoint in MB (10**6 bytes).
    """

    params: int
    gflops: float
    imgsz: int
    size_mb: float


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, imgsz: int) -> float:
    """FLOPs of one forward pass on a ``1x3ximgszximgsz`` input, counted by ``torch.utils.flop_counter``."""
    return flops_by_module(model, imgsz)[""]


@torch.no_grad()
def flops_by_module(model: nn.Module, imgsz: int) -> dict[str, float]:
    """``{module name: FLOPs}`` of one forward pass (names relative to ``model``; ``""`` is the total)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(torch.zeros(1, 3, imgsz, imgsz, device=device))
    finally:
        model.train(was_training)
    root = type(model).__name__
    out: dict[str, float] = {"": float(counter.get_total_flops())}
    for name, counts in counter.get_flop_counts().items():
        if name not in ("Global", root):
            out[name.removeprefix(f"{root}.")] = float(sum(counts.values()))
    return out


def checkpoint_size_mb(model: nn.Module) -> float:
    """Size in MB of the model pickled in fp16, as Ultralytics and yoloprune store checkpoints."""
    buffer = io.BytesIO()
    torch.save({"model": copy.deepcopy(model).half()}, buffer)
    return buffer.tell() / 1e6


def measure_costs(model: nn.Module, imgsz: int) -> Costs:
    """Parameters, GFLOPs at ``imgsz`` and fp16 checkpoint size of ``model``."""
    return Costs(
        params=count_params(model),
        gflops=count_flops(model, imgsz) / 1e9,
        imgsz=imgsz,
        size_mb=checkpoint_size_mb(model),
    )
