"""Per-stage structured pruning on Torch-Pruning's dependency graph."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.errors import InternalError, ModelError, SearchSpaceError
from yoloprune.log import get_logger
from yoloprune.pruning.stages import HEAD, Stage, check_ratios, find_stages
from yoloprune.registry import IMPORTANCES, UnknownNameError
from yoloprune.ultra.blocks import SplitC2f, attention_layers, fold_c2f_blocks, split_c2f_blocks
from yoloprune.ultra.models import DetectionModel, check_detector, detect_head, layers

if TYPE_CHECKING:
    from yoloprune.spaces import Candidate

LOGGER = get_logger(__name__)


#: Importance criteria by name: channel-group scores that decide which channels go.
def l1_importance() -> tp.importance.Importance:
    """Group L1 magnitude (``importance: l1``)."""
    return tp.importance.GroupMagnitudeImportance(p=1)


def l2_importance() -> tp.importance.Importance:
    """Group L2 magnitude (``importance: l2``)."""
    return tp.importance.GroupMagnitudeImportance(p=2)


def bn_scale_importance() -> tp.importance.Importance:
    """Network slimming's BN gamma (``importance: bn_scale``)."""
    return tp.importance.BNScaleImportance()


def random_importance() -> tp.importance.Importance:
    """Random channels (``importance: random``): a control, not for real use."""
    return tp.importance.RandomImportance()


_TRACE_SIZE = 64  # small input for graph tracing; any multiple of the max stride works


def prune(
    model: nn.Module,
    ratios_by_stage: Mapping[str, float],
    importance: str = "l1",
    round_to: int = 1,
    *,
    inplace: bool = False,
    seed: int | None = 0,
    global_ranking: bool = False,
) -> DetectionModel:
    """Prune a detection model structurally, one ratio per stage.

    Each stage's ratio is the fraction of output channels removed from every prunable conv group whose
    root lies in that stage: a layer of ``c`` channels keeps ``c * (1 - ratio)`` rounded to the nearest
    multiple of ``round_to`` (at least ``round_to``; see :func:`kept_width`). Channels coupled by residual
    adds or splits are removed together and neck concats stay consistent. The ``Detect`` head keeps its
    own widths (its inputs follow the neck) unless the opt-in stage ``head`` has a ratio: then its hidden
    box and class convolutions are pruned, never its final prediction convolutions or the DFL.
    Layers holding self-attention (YOLO11's ``C2PSA``) are left whole, with a logged notice.

    Args:
        model: an Ultralytics ``DetectionModel``.
        ratios_by_stage: e.g. ``{"backbone.p3": 0.3, "neck": 0.5}``; stages not named are not pruned.
            See :func:`~yoloprune.pruning.stages.find_stages` for names.
        importance: a name in :data:`yoloprune.registry.IMPORTANCES` (``l1``, ``l2``, ``bn_scale``, ``random``).
        round_to: keep every pruned layer's channel count a multiple of this (8 suits tensor cores).
        inplace: prune ``model`` itself instead of a copy.
        seed: seeds the ``random`` criterion.
        global_ranking: Torch-Pruning's global pruning instead: the named stages share one ratio (their
            largest), the fraction of all their channels removed, ranked across their layers at once
            (importance normalised per layer), so some layers lose more than others. Widths are floored to
            ``round_to`` as Torch-Pruning does, no layer loses more than 90%, and a C2f's two halves keep the
            narrower one's width. A reference baseline.

    Returns:
        The pruned model, built from stock Ultralytics modules only.

    Raises:
        SearchSpaceError: unknown stage, a ratio outside [0, 0.95), an unknown importance, a ``round_to``
            below 1, or ``head`` on a head with one-to-one branches. Nothing is modified in that case.
    """
    model = check_detector(model)
    stages = find_stages(model)
    check_ratios(dict(ratios_by_stage), stages)
    ratios = {k: float(v) for k, v in ratios_by_stage.items()}
    _check_importance(importance)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SearchSpaceError(f"round_to must be a whole number >= 1, got {round_to!r}.")

    if _head(ratios):
        check_head_prunable(model)
    work = model if inplace else copy.deepcopy(model)
    if not any(ratios.values()):
        for p in work.parameters():
            p.requires_grad_(True)  # as a pruned model would be: trainable
        return work
    if global_ranking:
        return _pruned_global(work, stages, ratios, importance, round_to, seed)
    return _pruned(
        work, lambda split: ratio_per_conv(split, stages, ratios, round_to), importance, seed, prune_head=_head(ratios)
    )


def kept_width(channels: int, ratio: float, round_to: int = 1) -> int:
    """Output channels a layer of ``channels`` keeps at ``ratio``: ``channels * (1 - ratio)`` rounded to the
    nearest multiple of ``round_to``, at least ``round_to``.

    Nearest, not floor: Torch-Pruning's own ``round_to`` floors the kept width, so 32 channels at ratio
    0.25 keep 24 but at 0.2500488 keep 16, and a ratio becomes a discontinuous handle on small layers.
    Rounding to the nearest multiple never lands more than half a step away from the ratio.
    """
    if ratio <= 0.0 or channels <= round_to:
        return channels
    kept = math.floor(channels * (1.0 - ratio) / round_to + 0.5) * round_to
    return max(round_to, min(channels, kept))


def prune_candidate(model: nn.Module, candidate: Candidate, ratios: Mapping[str, float] | None = None) -> nn.Module:
    """``model`` pruned as a search-space candidate says (``ratios``: other ratios with the candidate's knobs)."""
    return prune(
        model,
        candidate.ratios if ratios is None else ratios,
        importance=candidate.importance,
        round_to=candidate.round_to,
        global_ranking=candidate.global_ranking,
    )


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
        return {m: _exact_ratio(m.out_channels, target[n]) for n, m in mine.items() if target[n] < m.out_channels}

    work = _pruned(copy.deepcopy(model), keep_ratios, importance, seed, prune_head=_head_changed(model, reference))
    if _conv_widths(work) != _conv_widths(reference):
        raise InternalError("pruning to the reference's widths left different widths.")
    return work


def _check_importance(importance: str) -> None:
    try:
        IMPORTANCES.check(importance)
    except UnknownNameError as e:
        raise SearchSpaceError(str(e)) from None


def _conv_widths(model: nn.Module, *, split: bool = False) -> dict[str, int]:
    """Output channels of every conv by module name (of the C2f-split form when ``split``)."""
    if split:
        model = copy.deepcopy(model)
        split_c2f_blocks(model)
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _exact_ratio(channels: int, kept: int) -> float:
    """The ratio at which Torch-Pruning (no ``round_to``) keeps exactly ``kept`` of ``channels``.

    It keeps ``int(channels * (1 - ratio))``: aim half a channel above the target.
    """
    return 1.0 - (kept + 0.5) / channels


def _head(ratios: Mapping[str, float]) -> bool:
    return ratios.get(HEAD, 0.0) > 0.0


def _head_changed(model: nn.Module, reference: nn.Module) -> bool:
    """True when ``reference`` has narrower Detect-head convolutions than ``model``."""
    mine = {n: m.out_channels for n, m in detect_head(model).named_modules() if isinstance(m, nn.Conv2d)}
    theirs = {n: m.out_channels for n, m in detect_head(reference).named_modules() if isinstance(m, nn.Conv2d)}
    return any(theirs.get(n, c) < c for n, c in mine.items())


def dependency_pruner(
    split: DetectionModel,
    ratio_dict: dict[nn.Module, float],
    importance: str = "l1",
    *,
    prune_head: bool = False,
    also_ignored: Sequence[nn.Module] = (),
    **options: Any,
) -> tp.pruner.BasePruner:
    """Torch-Pruning's pruner over a C2f-split model (in eval mode), with this project's ignored layers.

    One place builds it, so pruning, global pruning and the cost model (:mod:`yoloprune.pruning.widths`)
    see the same dependency groups. ``options`` override the defaults (no ratio for layers not in
    ``ratio_dict``, no Torch-Pruning rounding: :func:`kept_width` rounds to the nearest multiple).
    """
    device = next(split.parameters()).device
    settings: dict[str, Any] = {"pruning_ratio": 0.0, "round_to": None, **options}
    return tp.pruner.BasePruner(
        split,
        example_inputs=torch.zeros(1, 3, _TRACE_SIZE, _TRACE_SIZE, device=device),
        importance=IMPORTANCES.get(importance)(),
        pruning_ratio_dict=ratio_dict,
        ignored_layers=[*ignored_layers(split, prune_head=prune_head), *also_ignored],
        output_transform=_flatten_outputs,
        **settings,
    )


def _pruned(
    work: DetectionModel,
    ratios_for: Callable[[DetectionModel], dict[nn.Module, float]],
    importance: str,
    seed: int | None,
    *,
    prune_head: bool = False,
) -> DetectionModel:
    """Prune ``work`` in place with Torch-Pruning; ``ratios_for`` gives each conv's ratio on the C2f-split model."""
    was_training = work.training
    work.eval()  # tracing must not update BN statistics
    for p in work.parameters():
        p.requires_grad_(True)  # the dependency graph is traced through autograd
    split_c2f_blocks(work)  # before the ignored layers are listed, so the split halves are ignored too
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            pruner = dependency_pruner(work, ratios_for(work), importance, prune_head=prune_head)
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


def _pruned_global(
    work: DetectionModel,
    stages: list[Stage],
    ratios: dict[str, float],
    importance: str,
    round_to: int,
    seed: int | None,
) -> DetectionModel:
    """Torch-Pruning's global pruning over the convs of the stages named (see :func:`prune`).

    Its global ranking decides each layer's width on a copy (nothing applied); the two halves of a split
    C2f then keep the narrower of their two widths (stock C2f needs equal halves), and the layers are
    pruned to those widths with the same importance, layer by layer.
    """
    named = {s.name for s in stages if ratios.get(s.name, 0.0) > 0}
    probe = copy.deepcopy(work).eval()
    for p in probe.parameters():
        p.requires_grad_(True)
    split_c2f_blocks(probe)
    outside = [
        conv
        for s in stages
        if s.name not in named
        for i in s.layers
        for conv in layers(probe)[i].modules()
        if isinstance(conv, nn.Conv2d)
    ]
    names = {m: n for n, m in probe.named_modules()}
    kept: dict[str, int] = {}
    members: dict[str, list[str]] = {}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        pruner = dependency_pruner(
            probe,
            {},
            importance,
            prune_head=HEAD in named,
            also_ignored=outside,
            pruning_ratio=max(ratios[n] for n in named),
            global_pruning=True,
            max_pruning_ratio=0.9,
            round_to=round_to if round_to > 1 else None,
        )
        try:
            for group in pruner.step(interactive=True):  # the widths only: the groups are never pruned
                root = group[0].dep.target.module
                width = root.out_channels - len(group[0].idxs)
                coupled = [
                    names[dep.target.module]
                    for dep, _ in group
                    if isinstance(dep.target.module, nn.Conv2d) and pruner.DG.is_out_channel_pruning_fn(dep.handler)
                ]
                for name in coupled:
                    kept[name] = width
                    members[name] = coupled
        except (IndexError, RuntimeError, ValueError) as e:
            raise ModelError(
                f"Torch-Pruning's global pruning failed on this architecture ({type(e).__name__}: {e})."
            ) from e
    for name, module in probe.named_modules():
        if isinstance(module, SplitC2f):
            a, b = f"{name}.cv1a.conv", f"{name}.cv1b.conv"
            if a in kept or b in kept:
                width = min(kept.get(a, module.cv1a.conv.out_channels), kept.get(b, module.cv1b.conv.out_channels))
                for half in (a, b):
                    for other in members.get(half, [half]):  # with everything its channels are coupled to
                        kept[other] = width

    def by_width(split: DetectionModel) -> dict[nn.Module, float]:
        return {
            m: _exact_ratio(m.out_channels, kept[n])
            for n, m in split.named_modules()
            if isinstance(m, nn.Conv2d) and n in kept and kept[n] < m.out_channels
        }

    return _pruned(work, by_width, importance, seed, prune_head=HEAD in named)


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One filter per channel: its width is its input's."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def head_outputs(head: nn.Module) -> list[nn.Module]:
    """The Detect head's modules whose output widths the ``head`` stage does not choose: each branch's final
    prediction conv, the DFL, and a depthwise conv on the head's input (YOLO11's class branch), whose width
    is the neck's."""
    fixed: list[nn.Module] = [m for m in (getattr(head, "dfl", None),) if isinstance(m, nn.Module)]
    for child in head.children():
        if isinstance(child, nn.ModuleList):
            for branch in child:
                last = list(branch.children())[-1] if isinstance(branch, nn.Sequential) else branch
                fixed.append(last)
                first = next((m for m in branch.modules() if isinstance(m, nn.Conv2d)), None)
                if first is not None and is_depthwise(first):
                    fixed.append(first)
    return fixed


def check_head_prunable(model: DetectionModel) -> None:
    """Raise :class:`SearchSpaceError` where the opt-in ``head`` stage cannot be pruned safely."""
    head = detect_head(model)
    if hasattr(head, "one2one_cv2"):
        raise SearchSpaceError(
            f"the '{HEAD}' stage cannot be pruned on {type(head).__name__} heads with one-to-one branches "
            "(YOLOv10, YOLO26): their training-only branches are not traced. Remove 'head' from the ratios."
        )


def ignored_layers(model: DetectionModel, *, prune_head: bool = False) -> list[nn.Module]:
    """Modules Torch-Pruning must not narrow: the Detect head (or, with ``prune_head``, its prediction
    convs and DFL only) and self-attention layers."""
    head = detect_head(model)
    if prune_head:
        check_head_prunable(model)
    ignored = head_outputs(head) if prune_head else [head]
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


def ratio_per_conv(
    model: DetectionModel, stages: list[Stage], ratios: Mapping[str, float], round_to: int
) -> dict[nn.Module, float]:
    """Torch-Pruning's ratio for every conv of each stage named, so that it keeps :func:`kept_width` channels."""
    per_conv: dict[nn.Module, float] = {}
    for stage in stages:
        ratio = ratios.get(stage.name, 0.0)
        if not stage.named_ok or ratio <= 0.0:
            continue
        for i in stage.layers:
            for conv in layers(model)[i].modules():
                if isinstance(conv, nn.Conv2d):
                    kept = kept_width(conv.out_channels, ratio, round_to)
                    if kept < conv.out_channels:
                        per_conv[conv] = _exact_ratio(conv.out_channels, kept)
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
        raise InternalError(f"the pruned model does not run ({type(e).__name__}: {e}).") from e
