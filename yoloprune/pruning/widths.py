"""Exact params and FLOPs of any per-stage allocation, in microseconds and without pruning.

Pruning a yolov8n takes about a second; a projection onto a cost target evaluates dozens of allocations
and screening evaluates hundreds. :class:`CostModel` traces Torch-Pruning's dependency graph of the base
once, with the same ignored layers and the same channel rounding as :func:`~yoloprune.pruning.prune`, and
then computes, for an allocation, how many channels each dependency group keeps and what that does to
every convolution and batch norm: a conv's FLOPs and weights scale with its kept input and output
channels (output only for depthwise convs). Everything else in the network keeps its cost.

The model is exact for the convolutional detectors this project prunes (tested against pruning and
counting for real on YOLOv5u, v8 and 11; checked by hand on v8s, v10 and 26); :meth:`CostModel.verify` checks one allocation against
a real pruning. An architecture with a module it cannot account for (YOLOv6's transposed convolutions,
grouped convolutions) is costed by pruning for real instead, about a second per allocation.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from yoloprune.errors import InternalError, ModelError
from yoloprune.log import get_logger
from yoloprune.pruning.costs import count_params, flops_by_module, measure_costs
from yoloprune.pruning.prune import dependency_pruner, is_depthwise, prune, ratio_per_conv
from yoloprune.pruning.stages import HEAD, check_ratios, find_stages
from yoloprune.ultra.blocks import split_c2f_blocks
from yoloprune.ultra.models import DetectionModel, check_detector

LOGGER = get_logger(__name__)


@dataclass(frozen=True)
class _Group:
    """One Torch-Pruning dependency group: its channels, who decides its ratio, and what it narrows."""

    channels: int
    scope: tuple[nn.Module, ...]  # out-channel modules in dependency order; the first with a ratio decides
    outs: tuple[int, ...]  # indices (into CostModel._mods) whose output channels shrink with this group
    ins: tuple[int, ...]  # ... whose input channels shrink


@dataclass(frozen=True)
class _Mod:
    name: str
    kind: str  # "conv", "dwconv" or "bn"
    out_channels: int
    in_channels: int
    flops: float
    weight: int  # weight elements (conv) or affine parameters (bn)
    bias: int


@dataclass(frozen=True)
class AllocationCost:
    """Params and FLOPs of one allocation, and the base's, at the model's image size."""

    params: int
    gflops: float
    base_params: int
    base_gflops: float

    @property
    def flops_reduction(self) -> float:
        return 1.0 - self.gflops / self.base_gflops

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params / self.base_params


class CostModel:
    """Params and FLOPs of ``prune(model, ratios, round_to=...)`` for any ratios, without pruning.

    Args:
        model: the base detection model (not modified).
        imgsz: image size the FLOPs are counted at.
    """

    def __init__(self, model: nn.Module, imgsz: int) -> None:
        self.model = check_detector(model)
        self.imgsz = imgsz
        self.stages = find_stages(self.model)
        base = measure_costs(self.model, imgsz)
        self.base_params, self.base_gflops = base.params, base.gflops
        self._traced: dict[bool, tuple[DetectionModel, list[_Group], list[_Mod]] | None] = {}
        self._pruned: dict[str, AllocationCost] = {}

    def cost(self, ratios: Mapping[str, float], round_to: int = 1) -> AllocationCost:
        """Params and GFLOPs after pruning each stage by its ratio (see :func:`~yoloprune.pruning.prune`)."""
        check_ratios(dict(ratios), self.stages)
        if not any(r > 0 for r in ratios.values()):
            return AllocationCost(self.base_params, self.base_gflops, self.base_params, self.base_gflops)
        traced = self._trace(ratios.get(HEAD, 0.0) > 0)
        if traced is None:
            return self._measured(ratios, round_to)
        split, groups, mods = traced
        per_conv = ratio_per_conv(split, self.stages, ratios, round_to)
        out_cut = [0] * len(mods)
        in_cut = [0] * len(mods)
        for g in groups:
            ratio = next((per_conv[m] for m in g.scope if m in per_conv), None)
            if ratio is None:
                continue
            cut = g.channels - int(g.channels * (1 - ratio))  # what Torch-Pruning removes at that ratio
            for i in g.outs:
                out_cut[i] += cut
            for i in g.ins:
                in_cut[i] += cut
        flops = self.base_gflops * 1e9
        params = self.base_params
        for i, m in enumerate(mods):
            if not (out_cut[i] or in_cut[i]):
                continue
            keep_out = (m.out_channels - out_cut[i]) / m.out_channels
            keep_in = 1.0 if m.kind != "conv" else (m.in_channels - in_cut[i]) / m.in_channels
            flops += m.flops * (keep_out * keep_in - 1.0)
            params += round(m.weight * keep_out * keep_in) - m.weight
            params += round(m.bias * keep_out) - m.bias
        return AllocationCost(params, flops / 1e9, self.base_params, self.base_gflops)

    @property
    def exact_without_pruning(self) -> bool:
        """False when this architecture is costed by pruning for real (about a second per allocation)."""
        return self._trace(False) is not None

    def verify(self, ratios: Mapping[str, float], round_to: int = 1) -> tuple[AllocationCost, AllocationCost]:
        """(predicted, measured on a real pruning) for one allocation."""
        return self.cost(ratios, round_to), self._measured(ratios, round_to, cache=False)

    def _measured(self, ratios: Mapping[str, float], round_to: int, *, cache: bool = True) -> AllocationCost:
        key = json.dumps([sorted(ratios.items()), round_to])
        if key not in self._pruned or not cache:
            real = measure_costs(prune(self.model, ratios, round_to=round_to), self.imgsz)
            self._pruned[key] = AllocationCost(real.params, real.gflops, self.base_params, self.base_gflops)
        return self._pruned[key]

    def _trace(self, prune_head: bool) -> tuple[DetectionModel, list[_Group], list[_Mod]] | None:
        if prune_head not in self._traced:
            try:
                self._traced[prune_head] = _trace(self.model, self.imgsz, prune_head)
            except _Unsupported as e:
                LOGGER.info("%s; allocations are costed by pruning for real (slower)", e)
                self._traced[prune_head] = None
        return self._traced[prune_head]


class _Unsupported(ModelError):
    """The cost model cannot account for a module of this architecture."""


def _trace(model: DetectionModel, imgsz: int, prune_head: bool) -> tuple[DetectionModel, list[_Group], list[_Mod]]:
    """Dependency groups of the C2f-split base and the cost of every module they narrow."""
    split = copy.deepcopy(model).eval()
    for p in split.parameters():
        p.requires_grad_(True)
    split_c2f_blocks(split)
    if count_params(split) != count_params(model):
        raise InternalError("the C2f split changed the parameter count.")
    by_name = flops_by_module(split, imgsz)
    names = {m: n for n, m in split.named_modules()}
    with torch.random.fork_rng(devices=[]):
        pruner = dependency_pruner(split, {}, prune_head=prune_head)
    graph = pruner.DG
    index: dict[nn.Module, int] = {}
    mods: list[_Mod] = []

    def mod_index(module: nn.Module) -> int:
        if module not in index:
            index[module] = len(mods)
            mods.append(_describe(names[module], module, by_name.get(names[module], 0.0)))
        return index[module]

    groups = []
    for group in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        if not channels or channels == 1:
            continue  # Torch-Pruning skips these groups too
        scope: list[nn.Module] = []
        outs: set[int] = set()
        ins: list[int] = []
        for dep, idxs in group:
            for module, fn in ((dep.source.module, dep.trigger), (dep.target.module, dep.handler)):
                if graph.is_out_channel_pruning_fn(fn) and module not in scope:
                    scope.append(module)
            target, handler = dep.target.module, dep.handler
            if not isinstance(target, (nn.Conv2d, nn.BatchNorm2d)):
                if isinstance(target, nn.Module) and any(True for _ in target.parameters(recurse=False)):
                    raise _Unsupported(
                        f"the cost model cannot account for {type(target).__name__} ('{names.get(target)}')"
                    )
                continue
            if graph.is_out_channel_pruning_fn(handler):
                outs.add(mod_index(target))
            elif graph.is_in_channel_pruning_fn(handler) and isinstance(target, nn.Conv2d) and not is_depthwise(target):
                # (a depthwise conv narrows through its output channels.) One group may feed a conv several
                # times (SPPF, C2f concats): one input slice per copy.
                copies, rest = divmod(len(idxs), channels)
                if rest:
                    raise _Unsupported(f"the cost model cannot map group indices onto '{names.get(target)}'")
                ins.extend([mod_index(target)] * copies)
        groups.append(_Group(channels, tuple(scope), tuple(sorted(outs)), tuple(ins)))
    return split, groups, mods


def _describe(name: str, module: nn.Module, flops: float) -> _Mod:
    if isinstance(module, nn.BatchNorm2d):
        affine = module.weight.numel() if module.weight is not None else 0
        bias = module.bias.numel() if module.bias is not None else 0
        return _Mod(name, "bn", module.num_features, module.num_features, 0.0, affine, bias)
    if not isinstance(module, nn.Conv2d):
        raise InternalError(f"the cost model got '{name}', a {type(module).__name__}, not a Conv2d or BatchNorm2d.")
    if module.groups > 1 and not is_depthwise(module):
        raise _Unsupported(f"the cost model does not handle grouped convolutions ('{name}')")
    bias = module.bias.numel() if module.bias is not None else 0
    kind = "dwconv" if is_depthwise(module) else "conv"
    return _Mod(name, kind, module.out_channels, module.in_channels, flops, module.weight.numel(), bias)
