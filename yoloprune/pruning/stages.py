"""Named stages of an Ultralytics detection model.

The backbone is split at each stride-2 downsampling (``backbone.p1`` ... ``backbone.p5``, named by the
stride level ``2**k`` of their output); everything between the backbone and the head is ``neck``; the
``Detect`` layer is ``head``, an opt-in stage: pruned only when named with a ratio, and then only its hidden
box and class convolutions (never the final prediction convolutions or the DFL). Strides are measured with a forward pass, so any
Ultralytics detection YAML works, not only the ones named in the README.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from yoloprune.errors import SearchSpaceError, did_you_mean
from yoloprune.ultra.models import check_detector, layers

HEAD = "head"
NECK = "neck"


@dataclass(frozen=True)
class Stage:
    """A contiguous run of model layers pruned with one ratio.

    Attributes:
        name: e.g. ``backbone.p3``, ``neck`` or ``head``.
        layers: indices into ``model.model``.
        prunable: pruned by default (uniform sweeps, ``prune --uniform``); False for the head.
        opt_in: may be given a ratio although not pruned by default (the head).
    """

    name: str
    layers: tuple[int, ...]
    prunable: bool = True
    opt_in: bool = False

    @property
    def named_ok(self) -> bool:
        """True when a ratio may be given for this stage."""
        return self.prunable or self.opt_in


def find_stages(model: nn.Module, probe_size: int = 128) -> list[Stage]:
    """Derive the named stages of ``model`` (a DetectionModel)."""
    model = check_detector(model)
    n_layers = len(layers(model))
    spec = getattr(model, "yaml", None)
    n_backbone = len(spec.get("backbone", [])) if isinstance(spec, dict) else 0
    if not 0 < n_backbone < n_layers:
        raise SearchSpaceError("cannot tell the backbone from the head: the model carries no Ultralytics yaml.")
    strides = _layer_strides(model, probe_size)

    stages: list[Stage] = []
    current: list[int] = []
    current_name = ""
    for i in range(n_backbone):
        name = f"backbone.p{round(math.log2(strides[i]))}"
        if name != current_name and current:
            stages.append(Stage(current_name, tuple(current)))
            current = []
        current_name = name
        current.append(i)
    if current:
        stages.append(Stage(current_name, tuple(current)))
    stages.append(Stage(NECK, tuple(range(n_backbone, n_layers - 1))))
    stages.append(Stage(HEAD, (n_layers - 1,), prunable=False, opt_in=True))
    return stages


def prunable_stage_names(model: nn.Module, *, opt_in: bool = False) -> list[str]:
    """Names of the stages pruned by default (all but the head); with ``opt_in``, every stage a ratio may name."""
    return [s.name for s in find_stages(model) if s.prunable or (opt_in and s.opt_in)]


def check_ratios(ratios: dict[str, float], stages: Sequence[Stage]) -> None:
    """Raise :class:`SearchSpaceError` for an unknown stage or a ratio outside [0, 0.95)."""
    names = [s.name for s in stages if s.named_ok]
    for name, ratio in ratios.items():
        if name not in names:
            raise SearchSpaceError(
                f"unknown stage '{name}'.{did_you_mean(name, names)} Valid stages for this model: {', '.join(names)}."
            )
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 0.95:
            raise SearchSpaceError(f"ratio {ratio!r} for stage '{name}' is outside [0, 0.95).")


@torch.no_grad()
def layer_output_shapes(model: nn.Module, size: int = 128) -> list[tuple[int, int, int] | None]:
    """``(channels, height, width)`` of each layer's output for a ``size`` x ``size`` input (None: not a map)."""
    shapes: dict[int, tuple[int, int, int]] = {}
    hooks = []
    for i, layer in enumerate(layers(model)):

        def hook(_m: nn.Module, _inp: object, out: object, i: int = i) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                shapes[i] = (int(out.shape[1]), int(out.shape[2]), int(out.shape[3]))

        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [shapes.get(i) for i in range(len(layers(model)))]


def _layer_strides(model: nn.Module, size: int) -> list[float]:
    return [size / shape[1] if shape else float("nan") for shape in layer_output_shapes(model, size)]
