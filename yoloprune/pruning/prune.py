"""Per-stage structured pruning on Torch-Pruning's dependency graph."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.errors import ModelError, SearchSpaceError, YoloPruneError, did_you_mean
from yoloprune.log import get_logger
from yoloprune.pruning.stages import Stage, check_ratios, find_stages
from yoloprune.ultra.blocks import attention_layers, fold_c2f_blocks, split_c2f_blocks
from yoloprune.ultra.models import DetectionModel, check_detector, detect_head, layers

LOGGER = get_logger(__name__)

#: Importance criteria by name: channel-group scores that decide which channels go.
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),  # network slimming's BN gamma
    "random": lambda: tp.importance.RandomImportance(),  # a control, not for real use
}

_TRACE_SIZE = 64  # small input for graph tracing; any multiple of the max stride works


def prune(
    model: nn.Module,
    ratios_by_stage: Mapping[str, float],
    importance: str = "l1",
    round_to: int = 1,
    *,
    inplace: bool = False,
    seed: int | None = 0,
) -> DetectionModel:
    """Prune a detection model structurally, one ratio per stage.

    Each stage's ratio is the fraction of output channels removed from every prunable conv group whose
    root lies in that stage; channels coupled by residual adds or splits are removed together, neck
    concats stay consistent, and the ``Detect`` head keeps its own widths (its inputs follow the neck).
    Layers holding self-attention (YOLO11's ``C2PSA``) are left whole, with a logged notice.

    Args:
        model: an Ultralytics ``DetectionModel``.
        ratios_by_stage: e.g. ``{"backbone.p3": 0.3, "neck": 0.5}``; stages not named are not pruned.
            See :func:`~yoloprune.pruning.stages.find_stages` for names.
        importance: one of :data:`IMPORTANCES` (``l1``, ``l2``, ``bn_scale``, ``random``).
        round_to: keep every pruned layer's channel count a multiple of this (8 suits tensor cores).
        inplace: prune ``model`` itself instead of a copy.
        seed: seeds the ``random`` criterion.

    Returns:
        The pruned model, built from stock Ultralytics modules only.

    Raises:
        SearchSpaceError: unknown stage, the head, a ratio outside [0, 0.95), an unknown importance or a
            ``round_to`` below 1. Nothing is modified in that case.
    """
    model = check_detector(model)
    stages = find_stages(model)
    check_ratios(dict(ratios_by_stage), stages)
    ratios = {k: float(v) for k, v in ratios_by_stage.items()}
    _check_importance(importance)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SearchSpaceError(f"round_to must be a whole number >= 1, got {round_to!r}.")

    work = model if inplace else copy.deepcopy(model)
    if not any(ratios.values()):
        for p in work.parameters():
            p.requires_grad_(True)  # as a pruned model would be: trainable
        return work
    return _pruned(work, lambda split: _ratio_per_conv(split, stages, ratios, round_to), importance, round_to, seed)


def prune_like(
    model: nn.Module, reference: nn.Module, importance: str = "l1", *, seed: int | None = 0
) -> DetectionModel:
    """Prune a copy of ``model`` to the exact channel widths of ``reference``, a pruned copy of the same network.

    The channels kept are chosen by ``model``'s own weights (``importance``), so a model fine-tuned after
    an earlier, milder round keeps what that fine-tune made important: progressive pruning prunes the base
    to ratios x 1/n, fine-tunes, then ``prune_like(tuned, prune(base, ratios x 2/n))``, and so on, and ends
    with exactly the architecture that one-shot ``prune(base, ratios)`` gives.

    Raises:
        ModelError: ``reference`` is not a narrower copy of ``model``'s architecture.
    """
    model = check_detector(model)
    _check_importance(importance)
    target = _conv_widths(reference, split=True)

    def keep_ratios(split: DetectionModel) -> dict[nn.Module, float]:
        mine = {name: m for name, m in split.named_modules() if isinstance(m, nn.Conv2d)}
        if mine.keys() != target.keys() or any(target[n] > m.out_channels for n, m in mine.items()):
            raise ModelError(
                "cannot prune to the reference's widths: it is not a narrower copy of this model's architecture."
            )
        # Torch-Pruning keeps int(channels * (1 - ratio)) channels: aim half a channel above the target.
        return {m: 1 - (target[n] + 0.5) / m.out_channels for n, m in mine.items() if target[n] < m.out_channels}

    work = _pruned(copy.deepcopy(model), keep_ratios, importance, 1, seed)
    if _conv_widths(work) != _conv_widths(reference):
        raise YoloPruneError("internal error: pruning to the reference's widths left different widths.")
    return work


def _check_importance(importance: str) -> None:
    if importance not in IMPORTANCES:
        raise SearchSpaceError(
            f"unknown importance '{importance}'.{did_you_mean(importance, IMPORTANCES)} "
            f"Valid: {', '.join(IMPORTANCES)}."
        )


def _conv_widths(model: nn.Module, *, split: bool = False) -> dict[str, int]:
    """Output channels of every conv by module name (of the C2f-split form when ``split``)."""
    if split:
        model = copy.deepcopy(model)
        split_c2f_blocks(model)
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _pruned(
    work: DetectionModel,
    ratios_for: Callable[[DetectionModel], dict[nn.Module, float]],
    importance: str,
    round_to: int,
    seed: int | None,
) -> DetectionModel:
    """Prune ``work`` in place with Torch-Pruning; ``ratios_for`` gives each conv's ratio on the C2f-split model."""
    was_training = work.training
    work.eval()  # tracing must not update BN statistics
    for p in work.parameters():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    split_c2f_blocks(work)
    ignored = _ignored_layers(work)  # after the split, so the split halves are ignored too
    try:
        device = next(work.parameters()).device
        example = torch.zeros(1, 3, _TRACE_SIZE, _TRACE_SIZE, device=device)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            pruner = tp.pruner.BasePruner(
                work,
                example_inputs=example,
                importance=IMPORTANCES[importance](),
                pruning_ratio=0.0,  # stages not named are not pruned
                pruning_ratio_dict=ratios_for(work),
                ignored_layers=ignored,
                round_to=round_to if round_to > 1 else None,
                output_transform=_flatten_outputs,
            )
            try:
                pruner.step()
            except (IndexError, RuntimeError, ValueError) as e:
                raise ModelError(
                    f"Torch-Pruning could not prune this architecture ({type(e).__name__}: {e}). Supported: YOLOv3u, "
                    "YOLOv5u, YOLOv6, YOLOv8, YOLOv10, YOLO11, YOLO12 and YOLO26 detectors; YOLOv9's ELAN/ADown blocks are not."
                ) from e
    finally:
        fold_c2f_blocks(work)
    _check_forward(work)
    return work.train(was_training)


def _ignored_layers(model: DetectionModel) -> list[nn.Module]:
    ignored = [detect_head(model)]
    for i in attention_layers(layers(model)):
        layer = layers(model)[i]
        LOGGER.info(
            "layer %d (%s) holds self-attention; it is left whole (its input channels may still follow "
            "the previous layer).",
            i,
            type(layer).__name__,
        )
        ignored.append(layer)
    return ignored


def _ratio_per_conv(
    model: DetectionModel, stages: list[Stage], ratios: dict[str, float], round_to: int
) -> dict[nn.Module, float]:
    """Ratio for every conv of each stage named, capped so ``round_to`` never rounds a layer to zero."""
    per_conv: dict[nn.Module, float] = {}
    for stage in stages:
        ratio = ratios.get(stage.name, 0.0)
        if not stage.prunable or ratio <= 0.0:
            continue
        for i in stage.layers:
            for conv in layers(model)[i].modules():
                if not isinstance(conv, nn.Conv2d):
                    continue
                channels = conv.out_channels
                if channels <= round_to:
                    continue  # rounding would leave nothing
                cap = (channels - round_to) / channels - 1e-9  # keeps at least round_to channels
                per_conv[conv] = min(ratio, cap)
    return per_conv


def _flatten_outputs(outputs: object) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, for tracing heads that return tuples, lists or dicts."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat: list[torch.Tensor] = []
    if isinstance(outputs, (list, tuple)):
        for item in outputs:
            flat.extend(_flatten_outputs(item))
    return flat


@torch.no_grad()
def _check_forward(model: DetectionModel) -> None:
    try:
        model(torch.zeros(1, 3, _TRACE_SIZE, _TRACE_SIZE, device=next(model.parameters()).device))
    except Exception as e:  # a broken graph would otherwise surface much later, in training
        raise YoloPruneError(f"internal error: the pruned model does not run ({type(e).__name__}: {e}).") from e
