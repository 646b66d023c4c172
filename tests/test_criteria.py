"""The filter criteria (METHOD.md section 5): each ranks a hand-built layer as its definition says,
the registry and configs list them all, and the data-dependent ones run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, run_icep
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icep.config import build, validate
from icep.errors import ConfigError, IcepError
from icep.pruning import MeanActivation, PruningEngine, prepare_criterion

CONF = Path(__file__).resolve().parents[1] / "conf"
ALL = ["l1", "l2", "fpgm", "bn_scale", "taylor", "random", "mean_activation", "entropy"]
WIDTH = 6  # output filters of the scored conv
TARGET = 4  # the filter each test makes the least important


class Tiny(nn.Module):
    """stem -> conv1 (the one pruning unit, followed by bn1 and a ReLU) -> conv2 -> classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1 = nn.Conv2d(4, WIDTH, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(WIDTH)
        self.conv2 = nn.Conv2d(WIDTH, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(self.stem(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture()
def tiny() -> tuple[Tiny, PruningEngine]:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():  # BatchNorms that do something, as after training
        for bn in (model.stem[1], model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(0.0, 0.5)
    engine = PruningEngine(model, torch.zeros(1, 1, 8, 8))
    assert [u.convs for u in engine.units] == [["conv1"]]
    return model, engine


def loader(n: int = 64, batch_size: int = 16) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def build_criterion(name: str, **options):
    """criterion=NAME as the app builds it, with ``criterion.KEY=VALUE`` for ``options``."""
    overrides = [f"criterion.{k}={v}" for k, v in options.items()]
    return build(compose_config(f"criterion={name}", *overrides), "criterion")


def scores(name: str, engine: PruningEngine, **options) -> torch.Tensor:
    criterion = build_criterion(name, **options)
    prepare_criterion(criterion, engine, ["conv1"], loader(), "cpu")
    result = criterion(engine.model.conv1)
    assert result.shape == (WIDTH,)
    return result


# --- Weight-only criteria ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l1", "l2"])
def test_norms_prune_a_zeroed_filter_first(tiny, name):
    model, engine = tiny
    with torch.no_grad():
        model.conv1.weight[TARGET].zero_()
    assert int(scores(name, engine).argmin()) == TARGET


def test_bn_scale_prunes_the_channel_with_zero_gamma(tiny):
    model, engine = tiny
    with torch.no_grad():
        model.bn1.weight[TARGET] = 0.0
        model.bn1.weight[1] = -2.0  # the sign does not matter
    result = scores("bn_scale", engine)
    assert int(result.argmin()) == TARGET
    assert torch.allclose(result, model.bn1.weight.detach().abs())


def test_bn_scale_needs_a_batchnorm_after_the_conv():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    model.append(nn.Flatten()).append(nn.LazyLinear(2))
    model(torch.zeros(1, 1, 8, 8))
    engine = PruningEngine(model, torch.zeros(1, 1, 8, 8))
    criterion = build_criterion("bn_scale")
    with pytest.raises(IcepError, match="not followed by a BatchNorm"):
        prepare_criterion(criterion, engine, ["2"], None, "cpu")


def test_fpgm_prunes_the_filter_closest_to_the_others(tiny):
    model, engine = tiny
    with torch.no_grad():
        others = [i for i in range(WIDTH) if i != TARGET]
        model.conv1.weight[TARGET] = model.conv1.weight[others].mean(dim=0)
    result = scores("fpgm", engine)
    assert int(result.argmin()) == TARGET
    w = model.conv1.weight.detach().flatten(1)
    expected = torch.stack([(w - w[i]).norm(dim=1).sum() for i in range(WIDTH)])
    assert torch.allclose(result, expected, atol=1e-5)


def test_random_is_seeded_and_without_replacement(tiny):
    model, engine = tiny
    first, again, other = (scores("random", engine, seed=s) for s in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert sorted(first.tolist()) == list(range(WIDTH))  # a permutation: no filter twice
    removed = engine.prune_unit(0, 0.5, build_criterion("random", seed=3))
    assert removed == 3 and model.conv1.out_channels == WIDTH - 3


# --- Data-dependent criteria -------------------------------------------------------------------


def test_taylor_prunes_a_filter_that_does_not_reach_the_loss(tiny):
    model, engine = tiny
    with torch.no_grad():
        model.conv2.weight[:, TARGET] = 0.0  # the channel's output is never read
    model.conv1.requires_grad_(False)  # a frozen layer is scored too, and stays frozen
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = scores("taylor", engine, batches=2)
    assert result[TARGET] == 0
    assert (result[[i for i in range(WIDTH) if i != TARGET]] > 0).all()
    assert model.training and not model.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_taylor_is_the_squared_sum_of_grad_times_weight(tiny):
    model, engine = tiny
    data = loader(n=16)
    x, y = next(iter(data))
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, [model.conv1.weight])
    expected = (grad * model.conv1.weight).sum(dim=(1, 2, 3)).pow(2).detach()
    criterion = build_criterion("taylor", batches=1)
    prepare_criterion(criterion, engine, ["conv1"], data, "cpu")
    assert torch.allclose(criterion(model.conv1), expected, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("name", ["mean_activation", "entropy"])
def test_activation_criteria_prune_a_channel_that_is_always_zero(tiny, name):
    model, engine = tiny
    with torch.no_grad():
        model.bn1.bias[TARGET] = -100.0  # ReLU'd output is zero for every image
    model.train()
    running = model.bn1.running_mean.clone()
    result = scores(name, engine, batches=3)
    assert result[TARGET] == 0
    assert (result[[i for i in range(WIDTH) if i != TARGET]] > 0).all()
    assert model.training and torch.equal(model.bn1.running_mean, running)


def test_mean_activation_is_the_mean_relu_of_the_batchnorm_output(tiny):
    model, engine = tiny
    data = loader(n=32)
    model.eval()
    with torch.no_grad():
        x = torch.cat([x for x, _ in data])
        expected = torch.relu(model.bn1(model.conv1(model.stem(x)))).mean(dim=(0, 2, 3))
    result = scores("mean_activation", engine, batches=2)
    assert torch.allclose(result, expected, atol=1e-6)


def test_entropy_follows_the_histogram_of_per_image_means(tiny):
    model, engine = tiny
    result = scores("entropy", engine, batches=4, bins=2)
    # Two bins hold at most log(2) nats.
    assert (result <= torch.log(torch.tensor(2.0)) + 1e-6).all()
    assert (scores("entropy", engine, batches=4, bins=40) >= result - 1e-6).all()


@pytest.mark.parametrize("name", ["taylor", "mean_activation", "entropy"])
def test_data_criteria_need_prepare_and_data(tiny, name):
    model, engine = tiny
    criterion = build_criterion(name)
    assert criterion.needs_data
    with pytest.raises(ValueError, match="prepare"):
        criterion(model.conv1)
    with pytest.raises(ValueError, match="training batches"):
        criterion.prepare(engine, ["conv1"], None, "cpu")


def test_data_criterion_prunes_through_the_engine(tiny):
    model, engine = tiny
    with torch.no_grad():
        model.bn1.bias[TARGET] = -100.0
        model.conv1.weight[TARGET].mul_(-1)  # a marker: the only filter with this weight sum
    marker = model.conv1.weight[TARGET].sum().item()
    criterion = MeanActivation(batches=1)
    prepare_criterion(criterion, engine, engine.units[0].convs, loader(), "cpu")
    assert engine.prune_unit(0, 1 / WIDTH, criterion) == 1
    sums = model.conv1.weight.sum(dim=(1, 2, 3)).tolist()
    assert all(abs(s - marker) > 1e-6 for s in sums)


class MLPBlock(nn.Module):
    """ConvNeXt-style: a depthwise conv, then an MLP of linear layers run channels-last."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc1 = nn.Linear(4, WIDTH)
        self.fc2 = nn.Linear(WIDTH, 4)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)


class ChannelsLast(nn.Module):
    """Its one unit is the hidden width of the block's MLP (``block.fc1``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = MLPBlock()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ALL[:3] + ALL[4:])
def test_every_criterion_but_bn_scale_scores_a_linear_unit(name):
    """A linear unit gets one score per output feature; a hidden feature that is always zero
    scores lowest with the activation criteria (its channels are the last dimension)."""
    torch.manual_seed(0)
    model = ChannelsLast()
    with torch.no_grad():
        model.block.fc1.bias[TARGET] = -100.0
    engine = PruningEngine(model, torch.zeros(1, 1, 8, 8))
    assert [u.convs for u in engine.units] == [["block.fc1"]]
    criterion = build_criterion(name)
    prepare_criterion(criterion, engine, ["block.fc1"], loader(), "cpu")
    result = criterion(model.block.fc1)
    assert result.shape == (WIDTH,)
    if name in ("mean_activation", "entropy"):
        assert result[TARGET] == 0 and (result.abs().sum() > 0)
    assert engine.prune_unit(0, 0.5, criterion) == WIDTH // 2


# --- Registry and configs ----------------------------------------------------------------------


def test_every_criterion_has_a_config_that_builds_it():
    assert sorted(p.stem for p in (CONF / "criterion").glob("*.yaml")) == sorted(ALL)
    for name in ALL:
        cfg = compose_config(f"criterion={name}", "seed=5")
        criterion = build(cfg, "criterion")
        assert criterion.name == name
        assert criterion.needs_data == (name in ("taylor", "mean_activation", "entropy"))
    assert build(compose_config("criterion=random", "seed=5"), "criterion").seed == 5


def test_a_bad_criterion_setting_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"^criterion\.batches: got 0; must be an integer >= 1"):
        validate(compose_config("criterion=taylor", "criterion.batches=0"))
    with pytest.raises(ConfigError, match=r"^criterion: cannot build .*Entropy.*'bin'"):
        build(compose_config("criterion=entropy", "+criterion.bin=3"), "criterion")


# --- End to end --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pipeline", "name"),
    [
        ("iterative", "taylor"),
        ("iterative", "mean_activation"),
        ("iterative", "entropy"),
        ("ice", "taylor"),  # ICE's freezing analysis prunes a copy; frozen layers are scored too
    ],
)
def test_data_criteria_run_end_to_end(tmp_path, cache_dir, pipeline, name):
    args = [
        *FAST,
        f"pipeline={pipeline}",
        f"criterion={name}",
        "criterion.batches=2",
        "dataset.train_subset=300",
    ]
    result = run_icep(args, tmp_path / name, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["criterion"] == name
    assert summary["steps"] == 9
    assert summary["params_after"] < summary["params_before"]
    assert summary["time_prune_s"] > 0
