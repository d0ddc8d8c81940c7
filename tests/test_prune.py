"""Per-stage pruning of YOLOv5nu, YOLOv8n and YOLO11n: parameters drop where the ratios say, the head and
unpruned stages keep their widths, outputs keep their shapes, channel rounding holds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import MODELS
from yoloprune.errors import ModelError
from yoloprune.pruning import count_params, find_stages, measure_costs, prune, prune_like
from yoloprune.ultra.blocks import SplitC2f, fold_c2f_blocks, split_c2f_blocks
from yoloprune.ultra.models import load_detector

RATIO_SETS = {
    "p3 only": {"backbone.p3": 0.5},
    "deep and neck": {"backbone.p4": 0.3, "backbone.p5": 0.4, "neck": 0.5},
    "uniform 0.3": "uniform",
}


@pytest.fixture(scope="module", params=MODELS)
def base(request):
    torch.manual_seed(0)
    model = load_detector(request.param, nc=6).eval()
    # Random BN scales, so importance criteria see something other than the init's all-ones.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
    return model


def _conv_widths(layer: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in layer.named_modules() if isinstance(m, nn.Conv2d)}


def _ratios(base, spec):
    if spec == "uniform":
        return {s.name: 0.3 for s in find_stages(base) if s.prunable}
    return spec


@pytest.mark.parametrize("label", list(RATIO_SETS))
@pytest.mark.parametrize("round_to", [1, 8])
def test_prune_follows_ratios(base, label, round_to):
    ratios = _ratios(base, RATIO_SETS[label])
    pruned = prune(base, ratios, importance="l1", round_to=round_to)
    stages = find_stages(base)
    for stage in stages:
        before = sum(p.numel() for i in stage.layers for p in base.model[i].parameters())
        after = sum(p.numel() for i in stage.layers for p in pruned.model[i].parameters())
        if ratios.get(stage.name, 0) > 0:
            assert after < 0.9 * before, f"{stage.name}: {before} -> {after}"
        else:  # its own widths stay; only its inputs may follow a pruned stage before it
            for i in stage.layers:
                assert _conv_widths(pruned.model[i]) == _conv_widths(base.model[i]), f"layer {i} of {stage.name}"
        if round_to > 1:
            for i in stage.layers:
                old, new = _conv_widths(base.model[i]), _conv_widths(pruned.model[i])
                changed = [n for n in new if new[n] != old[n]]
                assert all(new[n] % round_to == 0 for n in changed), f"layer {i}: {[(n, new[n]) for n in changed]}"
    assert count_params(pruned) < count_params(base)
    # Outputs keep their shapes, in inference and training mode.
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        y0, y1 = base.eval()(x), pruned.eval()(x)
        assert y0[0].shape == y1[0].shape
        t0, t1 = base.train()(x), pruned.train()(x)
    base.eval()
    flat0 = t0 if isinstance(t0, (list, tuple)) else list(t0.values())
    flat1 = t1 if isinstance(t1, (list, tuple)) else list(t1.values())
    assert [getattr(a, "shape", None) for a in flat0] == [getattr(a, "shape", None) for a in flat1]
    # Stock Ultralytics classes only.
    assert not any(isinstance(m, SplitC2f) for m in pruned.modules())
    assert all(type(m).__module__.startswith(("ultralytics.", "torch.")) for m in pruned.modules())


def test_head_keeps_its_widths(base):
    pruned = prune(base, {s.name: 0.5 for s in find_stages(base) if s.prunable})
    head_before, head_after = base.model[-1], pruned.model[-1]
    widths_before, widths_after = _conv_widths(head_before), _conv_widths(head_after)
    assert widths_before == widths_after


def test_opt_in_head_prunes_hidden_convs_only(base):
    from yoloprune.pruning.prune import head_outputs

    pruned = prune(base, {"head": 0.5}, round_to=8)
    head_before, head_after = base.model[-1], pruned.model[-1]
    fixed = {id(m) for m in head_outputs(head_before)}
    names_fixed = {n for n, m in head_before.named_modules() if id(m) in fixed}
    before, after = _conv_widths(head_before), _conv_widths(head_after)
    narrowed = {n for n in before if after[n] < before[n]}
    assert narrowed, "the head's hidden convs were not pruned"
    assert not any(n == f or n.startswith(f + ".") for n in narrowed for f in names_fixed)
    assert _conv_widths(base.model[-2]) == _conv_widths(pruned.model[-2])  # nothing outside the head changes
    with torch.no_grad():
        assert pruned.eval()(torch.zeros(1, 3, 64, 64))[0].shape == base.eval()(torch.zeros(1, 3, 64, 64))[0].shape


def test_attention_block_left_whole(base, caplog):
    names = [type(m).__name__ for m in base.model]
    if "C2PSA" not in names:
        pytest.skip("no attention block in this family")
    i = names.index("C2PSA")
    pruned = prune(base, {s.name: 0.5 for s in find_stages(base) if s.prunable})
    assert _conv_widths(pruned.model[i]) == _conv_widths(base.model[i])


def test_ratios_reduce_flops_monotonically(base):
    stages = [s.name for s in find_stages(base) if s.prunable]
    flops = [measure_costs(prune(base, {s: r for s in stages}), 320).gflops for r in (0.0, 0.2, 0.4, 0.6)]
    assert flops == sorted(flops, reverse=True) and flops[-1] < 0.6 * flops[0]


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random"])
def test_importance_criteria_choose_different_channels(base, importance):
    pruned = prune(base, {"neck": 0.5}, importance=importance)
    ref = prune(base, {"neck": 0.5}, importance="l1")
    assert count_params(pruned) == count_params(ref)  # same widths, whichever channels go
    if importance in ("random", "bn_scale"):
        differs = any(not torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), ref.state_dict().values()))
        assert differs


def test_round_to_never_prunes_a_layer_away(base):
    pruned = prune(base, {"backbone.p1": 0.9, "backbone.p2": 0.9}, round_to=16)
    assert min(_conv_widths(pruned.model[0]).values()) >= 16


def test_split_and_fold_are_exact(base):
    import copy

    model = copy.deepcopy(base).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)[0]
        n = split_c2f_blocks(model)
        split = model(x)[0]
        assert fold_c2f_blocks(model) == n
        folded = model(x)[0]
    assert torch.allclose(ref, split, atol=1e-4) and torch.allclose(ref, folded, atol=1e-4)


def test_zero_ratios_return_an_unchanged_copy(base):
    pruned = prune(base, {"neck": 0.0})
    assert pruned is not base and count_params(pruned) == count_params(base)


@pytest.mark.parametrize("round_to", [1, 8])
def test_progressive_rounds_end_at_the_one_shot_architecture(base, round_to):
    """prune_like reaches the one-shot widths exactly from a milder round, keeping its own important channels."""
    ratios = {s.name: 0.45 for s in find_stages(base) if s.prunable}
    one_shot = prune(base, ratios, round_to=round_to)
    first = prune(base, {s: r / 2 for s, r in ratios.items()}, round_to=round_to)
    with torch.no_grad():  # pretend a fine-tune changed what matters: a progressive round must follow it
        for m in first.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = m.weight.data.flip(0)
    second = prune_like(first, one_shot)
    assert _conv_widths(second) == _conv_widths(one_shot) and count_params(second) == count_params(one_shot)
    assert not all(
        torch.equal(a, b) for a, b in zip(second.state_dict().values(), one_shot.state_dict().values(), strict=True)
    )  # other channels kept than the base's ranking picks
    second(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ModelError, match="not a narrower copy"):
        prune_like(one_shot, first)  # the reference is wider


@pytest.mark.parametrize("cfg", ["yolov3-tinyu.yaml", "yolov6n.yaml", "yolov10n.yaml", "yolo12n.yaml", "yolo26n.yaml"])
def test_other_detector_families_prune(cfg):
    base = load_detector(cfg, nc=6).eval()
    stages = [s.name for s in find_stages(base) if s.prunable]
    pruned = prune(base, dict.fromkeys(stages, 0.3), round_to=8).eval()
    assert measure_costs(pruned, 320).gflops < 0.85 * measure_costs(base, 320).gflops
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b = base(x), pruned(x)
    first = lambda y: y[0] if isinstance(y, (list, tuple)) else next(iter(y.values())) if isinstance(y, dict) else y  # noqa: E731
    assert first(a).shape == first(b).shape


def test_unsupported_architecture_gets_a_clear_error():
    from yoloprune.errors import ModelError

    base = load_detector("yolov9t.yaml", nc=6)
    with pytest.raises(ModelError, match="YOLOv9's ELAN/ADown blocks are not"):
        prune(base, {"neck": 0.3})
