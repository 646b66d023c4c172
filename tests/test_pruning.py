"""The pruning engine (units, physical removal, sizes) and the filter criteria."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from icep.models import cifar_resnet
from icep.pruning import (
    L1,
    L2,
    PruningEngine,
    count_macs_params,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.zero_grad()
    return out


def check_prune(engine: PruningEngine, index: int, x: torch.Tensor, ratio: float = 0.6) -> None:
    """Prune one unit and check channels, output shape, forward/backward and sizes."""
    model = engine.model
    unit = engine.units[index]
    before = {name: model.get_submodule(name).out_channels for name in unit.convs}
    macs0, params0 = count_macs_params(model, x[:1])
    out_shape = model.eval()(x).shape

    removed = engine.prune_unit(index, ratio, L1())

    expected = {name: math.ceil(ratio * c) for name, c in before.items()}
    assert removed == sum(expected.values())
    for name, c in before.items():
        assert model.get_submodule(name).out_channels == c - expected[name]
    assert unit.channels == [c - expected[n] for n, c in before.items()]
    assert forward_backward(model, x).shape == out_shape
    macs, params = count_macs_params(model, x[:1])
    assert params < params0 and macs < macs0
    assert params == n_params(model)


# --- CIFAR ResNets -------------------------------------------------------------------------


def test_resnet56_has_27_units_in_forward_order():
    engine = PruningEngine(cifar_resnet(56), torch.randn(1, 3, 32, 32))
    names = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(9)]
    assert [u.name for u in engine.units] == names
    assert [u.index for u in engine.units] == list(range(27))
    assert [u.convs for u in engine.units] == [[f"{n}.conv1"] for n in names]
    assert [u.channels for u in engine.units] == [[w] for w in (16, 32, 64) for _ in range(9)]


def test_resnet56_prune_removes_exactly_the_block_inside():
    model = cifar_resnet(56)
    x = torch.randn(2, 3, 32, 32)
    engine = PruningEngine(model, x[:1])
    # The first block, the first (strided) block of stage 2, and the last block; one after the
    # other on the same engine.
    for index in (0, 9, 26):
        block = model.get_submodule(engine.units[index].name)
        c_in, c, c_out = block.conv1.in_channels, block.conv1.out_channels, block.conv2.out_channels
        n = math.ceil(0.6 * c)
        params0 = n_params(model)
        check_prune(engine, index, x)
        # conv1 filters, bn1 weight and bias, conv2 input channels
        assert params0 - n_params(model) == n * c_in * 9 + 2 * n + n * c_out * 9
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
        assert block.conv2.out_channels == c_out  # the residual width stays


def test_resnet20_prune_every_unit_in_turn():
    model = cifar_resnet(20)
    x = torch.randn(2, 3, 32, 32)
    engine = PruningEngine(model, x[:1])
    assert len(engine.units) == 9
    fractions = [engine.remaining()]
    for unit in engine.units:
        engine.prune_unit(unit.index, 0.6, L1())
        fractions.append(engine.remaining())
    assert fractions[0] == 1.0
    assert all(b < a for a, b in zip(fractions, fractions[1:], strict=False))
    # Every block keeps 40% of its inside (rounded down), so x ends a little below 0.4.
    assert 0.35 < fractions[-1] < 0.4
    assert [u.channels for u in engine.units] == [[6]] * 3 + [[12]] * 3 + [[25]] * 3
    assert forward_backward(model, x).shape == (2, 10)


def test_ratio_never_empties_a_layer():
    model = cifar_resnet(20)
    engine = PruningEngine(model, torch.randn(1, 3, 32, 32))
    assert engine.prune_unit(0, 0.0, L1()) == 0
    assert engine.prune_unit(0, 1.0, L1()) == 15
    assert engine.units[0].channels == [1]
    assert engine.prune_unit(0, 1.0, L1()) == 0  # one channel left: nothing more to take
    # ceil(0.7 * 10) is 7 despite 0.7 * 10 == 7.000000000000001 in floating point
    engine.prune_unit(3, 22 / 32, L1())  # 32 -> 10
    assert engine.prune_unit(3, 0.7, L1()) == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="ratio"):
        engine.prune_unit(1, 1.5, L1())
    with pytest.raises(IndexError):
        engine.prune_unit(9, 0.5, L1())


def test_prune_removes_the_filters_the_criterion_ranks_lowest():
    model = cifar_resnet(20)
    engine = PruningEngine(model, torch.randn(1, 3, 32, 32))
    conv1 = model.layer1[0].conv1
    with torch.no_grad():
        conv1.weight[5].zero_()
    kept = torch.cat([conv1.weight[:5], conv1.weight[6:]]).clone()
    assert engine.prune_unit(0, 1 / 16, L1()) == 1
    assert torch.equal(conv1.weight, kept)
    assert model.layer1[0].conv2.weight.shape[1] == 15


def test_engine_restores_training_flags_and_honours_ignored_layers():
    model = cifar_resnet(20).train()
    model.layer2.eval()  # e.g. a frozen stage
    engine = PruningEngine(model, torch.randn(1, 3, 32, 32), ignored_layers=[model.layer1[1].conv1])
    assert model.training and model.layer1.training and not model.layer2[0].bn1.training
    assert [u.name for u in engine.units][:2] == ["layer1.0", "layer1.2"]
    count_macs_params(model, torch.randn(1, 3, 32, 32))
    assert model.training and not model.layer2.training


def test_frozen_layers_are_traced_and_stay_frozen():
    model = cifar_resnet(20)
    model.conv1.requires_grad_(False)
    model.layer1[0].requires_grad_(False)
    engine = PruningEngine(model, torch.randn(1, 3, 32, 32))
    assert len(engine.units) == 9
    engine.prune_unit(0, 0.5, L1())
    assert not any(p.requires_grad for p in model.layer1[0].parameters())
    assert not model.conv1.weight.requires_grad
    assert model.layer1[1].conv1.weight.requires_grad


@pytest.mark.parametrize("depth", [20, 56])
def test_remaining_counts_the_reference_spatial_convs_on_cifar_resnets(depth):
    """On the paper's models x counts what the reference code counts (METHOD.md section 1): the
    non-zero weights of every 3x3 conv after the stem (1x1 shortcuts and the stem left out)."""
    model = cifar_resnet(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert convs[0] is model.conv1
    engine = PruningEngine(model, torch.zeros(1, 3, 32, 32))
    total = sum(m.weight.numel() for m in convs[1:])
    assert engine.original_weights == total
    with torch.no_grad():
        model.layer1[0].conv1.weight[0].zero_()
        model.conv1.weight.zero_()  # the stem does not count
        model.layer2[0].shortcut[0].weight.zero_()  # nor do 1x1 convs
    assert engine.touched_weights() == total - 16 * 9
    assert engine.remaining() == pytest.approx(1 - 144 / total)


# --- Other architectures -------------------------------------------------------------------

ARCHS = {
    # name: (builder, number of units, first unit, last unit)
    "torchvision_resnet18": (
        lambda: torchvision.models.resnet18(num_classes=10),
        8,
        "layer1.0",
        "layer4.1",
    ),
    "torchvision_mobilenet_v2": (
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        17,
        "features.1",
        "features.17",
    ),
    "timm_mobilenetv3_small_050": (
        lambda: timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
        12,
        "blocks.0.0",
        "blocks.5.0",
    ),
    "torchvision_resnet50": (
        lambda: torchvision.models.resnet50(num_classes=10),
        16,
        "layer1.0",
        "layer4.2",
    ),
}
SLOW_ARCHS = {
    "torchvision_densenet121": (
        lambda: torchvision.models.densenet121(num_classes=10),
        58,
        "features.denseblock1.denselayer1",
        "features.denseblock4.denselayer16",
    ),
}


@pytest.mark.parametrize(
    "arch",
    [*ARCHS, *(pytest.param(a, marks=pytest.mark.slow) for a in SLOW_ARCHS)],
)
def test_units_and_pruning_on_other_architectures(arch):
    build, count, first, last = {**ARCHS, **SLOW_ARCHS}[arch]
    model = build()
    x = torch.randn(2, 3, 32, 32)
    engine = PruningEngine(model, x[:1])
    units = engine.units
    assert len(units) == count
    assert (units[0].name, units[-1].name) == (first, last)
    # Stem and classifier stay alone.
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    cut = {model.get_submodule(c) for u in units for c in u.convs}
    assert first_conv not in cut

    # The unit with the most convs first, then every other unit in turn.
    widest = max(units, key=lambda u: len(u.convs)).index
    check_prune(engine, widest, x)
    original_out = model.eval()(x).shape
    for unit in units:
        if unit.index != widest:
            engine.prune_unit(unit.index, 0.6, L1())
    assert forward_backward(model, x).shape == original_out == (2, 10)


def _lively(model: nn.Module) -> nn.Module:
    """Random norm statistics and scales, so that every channel carries a signal of order one
    (fresh inits give some models logits of 1e-11, which no comparison can read)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def _silence(engine: PruningEngine, name: str, ratio: float) -> None:
    """Make the channels that ``ratio`` will cut from unit layer ``name`` output exactly zero, at
    positions 1.. of every group: zero filters and biases, and the scale and shift of every norm
    those channels pass (the one after a depthwise conv too)."""
    layer = engine.model.get_submodule(name)
    groups = engine.channel_groups.get(name, 1)
    size = (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features) // groups
    positions = range(1, 1 + engine.cut(name, ratio) // groups)
    idxs = [p + g * size for g in range(groups) for p in positions]
    conv = isinstance(layer, nn.Conv2d)
    prune = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
    group = engine.graph.get_pruning_group(layer, prune, idxs)
    with torch.no_grad():
        layer.weight[idxs] = 0
        if layer.bias is not None:
            layer.bias[idxs] = 0
        for dep, mapped in group:
            module = dep.target.module
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.weight[list(mapped)] = 0
                module.bias[list(mapped)] = 0


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: torchvision.models.resnext50_32x4d(num_classes=10), id="resnext50"),
        pytest.param(lambda: torchvision.models.regnet_y_400mf(num_classes=10), id="regnet_y"),
        pytest.param(lambda: timm.create_model("regnetx_002", num_classes=10), id="timm_regnetx"),
        pytest.param(lambda: torchvision.models.convnext_tiny(num_classes=10), id="convnext"),
        pytest.param(lambda: torchvision.models.mobilenet_v2(num_classes=10), id="mobilenet_v2"),
        pytest.param(lambda: timm.create_model("ghostnet_100", num_classes=10), id="ghostnet"),
    ],
)
def test_pruning_channels_that_output_zero_leaves_the_logits_unchanged(build):
    """Grouped convs (ResNeXt, RegNet), ConvNeXt's linear MLP, depthwise convs and Ghost modules
    (a primary conv concatenated with its cheap depthwise copy): every unit
    loses channels whose output is exactly zero, so nothing the model computes may change. A
    grouped conv pruned at different positions in different groups keeps the wrong weights."""
    model = _lively(build())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine = PruningEngine(model, x[:1])
    assert engine.units
    for unit in engine.units:
        for name in unit.convs:
            _silence(engine, name, 0.5)
    with torch.no_grad():
        before = model(x)
    widths = engine.unit_widths()
    for unit in engine.units:
        engine.prune_unit(unit.index, 0.5, L1())
    assert all(engine.unit_widths()[n] < w for n, w in widths.items())
    with torch.no_grad():
        after = model(x)
    assert before.abs().max() > 1e-3
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())


def test_grouped_layers_keep_their_groups_even():
    """ResNeXt's 3x3 conv has 32 groups: a cut takes the same positions from every group, by the
    mean score over the groups, and a width that is no multiple of 32 is refused."""
    model = torchvision.models.resnext50_32x4d(num_classes=10)
    engine = PruningEngine(model, torch.zeros(1, 3, 32, 32))
    conv = model.layer1[0].conv2
    assert (conv.groups, conv.out_channels) == (32, 128)
    assert engine.channel_groups["layer1.0.conv2"] == 32
    assert engine.channel_groups["layer1.0.conv1"] == 32  # feeds the grouped conv
    assert engine.cut("layer1.0.conv2", 0.3) == 32 * 2  # ceil(0.3 * 4) of each group of 4
    assert engine.cut("layer1.0.conv2", 0.9) == 32 * 2  # every group keeps two
    scores = torch.arange(128.0)
    scores[torch.arange(32) * 4 + 3] = -1.0  # position 3 lowest in every group
    assert engine.lowest("layer1.0.conv2", 32, scores) == [g * 4 + 3 for g in range(32)]
    with pytest.raises(ValueError, match="multiple of 32"):
        engine.prune_to_widths({"layer1.0.conv2": 100})
    with pytest.raises(ValueError, match="same positions"):
        engine.prune_channels({"layer1.0.conv2": [0, 5]})
    engine.prune_unit(0, 0.5, L1())
    assert (conv.groups, conv.in_channels, conv.out_channels) == (32, 64, 64)
    assert forward_backward(model, torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_unit_shapes_per_architecture():
    """What the unit rule gives beyond plain BasicBlocks (see the engine's docstring)."""
    x = torch.randn(1, 3, 32, 32)
    mbv2 = PruningEngine(torchvision.models.mobilenet_v2(num_classes=10), x).units
    assert mbv2[1].convs == ["features.2.conv.0.0"]  # expansion; the depthwise conv follows
    assert mbv2[-1].convs == ["features.17.conv.0.0", "features.17.conv.2"]
    mbv3 = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    units = PruningEngine(mbv3, x).units
    assert units[3].convs == ["blocks.2.0.conv_pw", "blocks.2.0.se.conv_reduce"]


# --- Criteria ------------------------------------------------------------------------------


def test_norm_criteria_score_each_filter():
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(4, 2, 3, 3) + 1.0)
        conv.weight[2].zero_()
        conv.weight[0].mul_(-1)  # the sign does not matter
    l1, l2 = L1()(conv), L2()(conv)
    assert l1.shape == l2.shape == (4,)
    assert int(l1.argmin()) == int(l2.argmin()) == 2
    assert torch.allclose(l1, conv.weight.abs().sum(dim=(1, 2, 3)))
    assert torch.allclose(l2, conv.weight.pow(2).sum(dim=(1, 2, 3)).sqrt())


def test_criterion_with_wrong_shape_is_rejected():
    engine = PruningEngine(cifar_resnet(20), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="shape"):
        engine.prune_unit(0, 0.5, lambda conv: torch.zeros(3))


@pytest.mark.parametrize("ties", ["stable", "sort"])
def test_equal_scores_at_the_cut_follow_ties(ties, monkeypatch):
    """ties=stable cuts the lowest channel indices among equal scores; ties=sort takes
    torch.sort's own (unstable) order, as the reference does. Which order an unstable sort gives
    depends on the CPU, so here it is one the test controls: ties last index first."""
    real_sort = torch.sort

    def unstable_sort(values, stable=False, **kwargs):
        if stable:
            return real_sort(values, stable=True, **kwargs)
        keys = [(v, -i) for i, v in enumerate(values.tolist())]
        order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))
        return torch.return_types.sort((values[order], order))

    monkeypatch.setattr(torch, "sort", unstable_sort)
    model = cifar_resnet(20).eval()
    conv, bn = model.layer3[0].conv1, model.layer3[0].bn1
    with torch.no_grad():
        conv.weight.fill_(0.01)  # 64 filters, all with the same L1 norm
        bn.weight.copy_(torch.arange(64.0))  # each channel's tag, read back after the cut
    engine = PruningEngine(model, torch.zeros(1, 3, 32, 32), ties=ties)
    unit = next(u.index for u in engine.units if u.name == "layer3.0")
    engine.prune_unit(unit, 0.25, L1())
    kept = model.layer3[0].bn1.weight.detach().long().tolist()
    # stable: channels 0-15 go; torch.sort's order (here): channels 48-63 go
    assert kept == (list(range(16, 64)) if ties == "stable" else list(range(48)))
