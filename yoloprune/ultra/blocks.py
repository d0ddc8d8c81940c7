"""Make Ultralytics blocks traceable by Torch-Pruning, and fold them back to stock classes afterwards.

``C2f`` (and ``C3k2``, its subclass in YOLO11) runs ``self.cv1(x).chunk(2, 1)``; Torch-Pruning 1.6's
dependency graph cannot map channel indices through ``chunk`` (IndexError in importance estimation,
../shared/FINDINGS.md). :func:`split_c2f_blocks` replaces each such block by :class:`SplitC2f`, whose
``cv1`` is two 1x1 convs (one per half, numerically the same output), and :func:`fold_c2f_blocks`
merges the halves back into the original stock module, so a saved checkpoint holds Ultralytics classes
only and plain ``ultralytics.YOLO(path)`` loads it in a process that never imported yoloprune.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from yoloprune.errors import InternalError
from yoloprune.offline import configure_offline

configure_offline()

from ultralytics.nn.modules import C2f, Conv  # noqa: E402

# Attributes Ultralytics' DetectionModel._predict_once and save logic route on.
_ROUTING_ATTRS = ("f", "i", "type", "np")

# Layers holding self-attention whose head layout Torch-Pruning cannot keep consistent: left whole.
ATTENTION_CLASS_NAMES = frozenset({"C2PSA", "PSA", "PSABlock", "Attention", "AAttn", "ABlock", "A2C2f"})


class SplitC2f(nn.Module):
    """A ``C2f`` whose ``cv1`` is split into ``cv1a`` (first half) and ``cv1b`` (second half).

    Only lives between :func:`split_c2f_blocks` and :func:`fold_c2f_blocks`.
    """

    def __init__(self, block: C2f) -> None:
        super().__init__()
        half = block.cv1.conv.out_channels // 2
        self.cv1a = _slice_conv_out(block.cv1, slice(0, half))
        self.cv1b = _slice_conv_out(block.cv1, slice(half, 2 * half))
        self.cv2 = block.cv2
        self.m = block.m
        for name in _ROUTING_ATTRS:
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))
        self._original = [block]  # a list, so the stock module is not registered as a child twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def fold(self) -> C2f:
        """Return the original stock block with ``cv1`` rebuilt from the (possibly pruned) halves."""
        a, b = self.cv1a.conv.out_channels, self.cv1b.conv.out_channels
        if a != b:
            raise InternalError(
                f"the two halves of C2f layer {getattr(self, 'i', '?')} were pruned to "
                f"{a} and {b} channels; stock C2f needs equal halves."
            )
        block = self._original[0]
        block.cv1 = _concat_conv_out(self.cv1a, self.cv1b)
        block.cv2, block.m = self.cv2, self.m
        block.c = a
        return block


def split_c2f_blocks(model: nn.Module) -> int:
    """Replace every C2f-family block in ``model`` (in place) by :class:`SplitC2f`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, C2f):
                setattr(parent, name, SplitC2f(child))
                count += 1
    return count


def fold_c2f_blocks(model: nn.Module) -> int:
    """Replace every :class:`SplitC2f` in ``model`` (in place) by its stock block; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SplitC2f):
                setattr(parent, name, child.fold())
                count += 1
    return count


def attention_layers(layers: nn.Sequential) -> list[int]:
    """Indices of top-level layers that hold an attention block (kept whole by the pruner)."""
    return [i for i, layer in enumerate(layers) if _has_attention(layer)]


def _has_attention(module: nn.Module) -> bool:
    return any(type(m).__name__ in ATTENTION_CLASS_NAMES for m in module.modules())


def _slice_conv_out(conv: Conv, index: slice) -> Conv:
    """A copy of an Ultralytics ``Conv`` (conv + BN + act) keeping output channels ``index``."""
    new = copy.deepcopy(conv)
    c = new.conv
    c.weight = nn.Parameter(conv.conv.weight.data[index].clone())
    if conv.conv.bias is not None:
        c.bias = nn.Parameter(conv.conv.bias.data[index].clone())
    c.out_channels = c.weight.shape[0]
    _set_bn(new.bn, conv.bn, index)
    return new


def _concat_conv_out(a: Conv, b: Conv) -> Conv:
    """One ``Conv`` whose output channels are those of ``a`` followed by those of ``b``."""
    new = copy.deepcopy(a)
    c = new.conv
    c.weight = nn.Parameter(torch.cat([a.conv.weight.data, b.conv.weight.data]))
    if a.conv.bias is not None and b.conv.bias is not None:
        c.bias = nn.Parameter(torch.cat([a.conv.bias.data, b.conv.bias.data]))
    c.out_channels = c.weight.shape[0]
    bn = new.bn
    bn.weight = nn.Parameter(torch.cat([a.bn.weight.data, b.bn.weight.data]))
    bn.bias = nn.Parameter(torch.cat([a.bn.bias.data, b.bn.bias.data]))
    bn.running_mean = torch.cat([a.bn.running_mean, b.bn.running_mean])
    bn.running_var = torch.cat([a.bn.running_var, b.bn.running_var])
    bn.num_features = bn.weight.shape[0]
    return new


def _set_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d, index: slice) -> None:
    target.weight = nn.Parameter(source.weight.data[index].clone())
    target.bias = nn.Parameter(source.bias.data[index].clone())
    mean, var = source.running_mean, source.running_var
    if mean is None or var is None:
        raise InternalError("a BatchNorm without running statistics cannot be split.")
    target.running_mean = mean[index].clone()
    target.running_var = var[index].clone()
    target.num_features = target.weight.shape[0]
