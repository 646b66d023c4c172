"""The pre-flight check: a model icep cannot prune is refused in one line before any training,
and ``--dry-run`` prints the unit table."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from icep.errors import ConfigError, IcepError
from icep.models import cifar_resnet
from icep.preflight import preflight
from tests.conftest import run_icep


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus identity: one unit (``conv1``)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self, block: nn.Module | None = None, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = block if block is not None else Block()
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


def check(model: nn.Module, size: int = 8, **kwargs):
    return preflight(model, (3, size, size), 10, name="net", **kwargs)


def test_a_prunable_model_gives_its_unit_table_and_is_left_untouched():
    model = cifar_resnet(20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = preflight(model, (3, 32, 32), 10, name="resnet20", ratio=0.6)
    assert [u.name for u in report.units] == [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1, 2)]
    assert report.units[0].layers == ["layer1.0.conv1"] and report.units[0].channels == [16]
    # Unit layer1.0 cuts conv1's filters and conv2's inputs: two 16x16x3x3 convs of the model's
    # 272,474 params; the same share of MACs as any other stage-1 block.
    assert report.units[0].params_share == pytest.approx(2 * 16 * 16 * 9 / report.params)
    assert report.units[0].macs_share == pytest.approx(report.units[1].macs_share)
    table = report.table()
    assert "resnet20 on 3x32x32 inputs: 9 units" in table
    assert "layer3.2.conv1" in table
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.layer1[0].conv1.out_channels == 16


class Shortcuts(nn.Module):
    """Every conv output meets a residual add: no block has an inside."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


def test_a_model_without_units_is_refused():
    with pytest.raises(IcepError, match="model net has no pruning unit"):
        check(Net(Shortcuts()))


class Pair(nn.Module):
    def forward(self, x):
        return x, x


def test_a_forward_that_returns_no_tensor_is_refused():
    with pytest.raises(IcepError, match=r"returns a tuple in eval mode.*aux_logits=false"):
        check(nn.Sequential(Net(), Pair()))


def test_an_input_too_small_for_the_model_is_refused_with_the_image_size_key():
    model = nn.Sequential(nn.Conv2d(3, 8, 5), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(IcepError, match=r"fails on 3x2x2 inputs.*dataset.image_size"):
        check(model, size=2)


def test_logits_of_the_wrong_width_are_refused():
    with pytest.raises(IcepError, match=r"logits of shape \(2, 7\).*expected \(2, 10\)"):
        check(Net(classes=7))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        out, _ = self.attn(tokens, tokens, tokens)
        return out.transpose(1, 2).reshape(n, c, h, w)


class Hybrid(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block()
        self.mixer = Attention()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.mixer(self.block(self.stem(x))).mean(dim=(2, 3)))


def test_attention_layers_are_refused_unless_ignored():
    with pytest.raises(
        IcepError, match=r"attention layers \(mixer\).*model.ignored_layers=\[mixer\]"
    ):
        check(Hybrid())
    report = check(Hybrid(), ignored=["mixer*"])
    assert [u.name for u in report.units] == ["block"]


def test_an_ignored_layer_takes_away_every_unit_whose_channels_reach_it():
    assert [u.name for u in check(Net()).units] == ["block"]
    with pytest.raises(IcepError, match="no pruning unit"):
        check(Net(), ignored=["block.conv2"])  # conv1's channels are its inputs


class Reshaped(nn.Module):
    """A block whose forward hard-codes its inner width: pruning it breaks the forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv1(x))
        n, _, h, w = y.shape
        y = y.reshape(n, 2, 4, h, w).sum(dim=1).repeat(1, 2, 1, 1)  # width 8 assumed
        return x + self.conv2(y)


def test_a_unit_that_breaks_the_forward_when_pruned_is_named_with_the_way_out():
    with pytest.raises(IcepError, match=r"pruning unit 0 \(block: block.conv1\).*breaks it"):
        check(Net(Reshaped()))


class TwoStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.first, self.middle, self.last = Reshaped(), Block(), Reshaped()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.last(self.middle(self.first(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_every_unit_that_breaks_is_named_at_once_and_ignoring_them_passes():
    with pytest.raises(IcepError) as refusal:
        check(TwoStages())
    assert str(refusal.value).startswith("model net: pruning units 0 (first), 2 (last) by 0.5")
    assert str(refusal.value).endswith(
        "; leave them out with 'model.ignored_layers=[first.conv1,last.conv1]'"
    )
    report = check(TwoStages(), ignored=["first.conv1", "last.conv1"])
    assert [u.name for u in report.units] == ["middle"]


def test_a_graph_that_does_not_finish_is_refused_within_the_time_limit(monkeypatch):
    def loop_for_ever(self, *args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr("icep.preflight.PruningEngine.__init__", loop_for_ever)
    start = time.monotonic()
    with pytest.raises(IcepError, match=r"did not finish within 0.5 s \(model.preflight_seconds\)"):
        check(Net(), seconds=0.5)
    assert time.monotonic() - start < 10


def test_an_ignored_layer_pattern_that_matches_nothing_names_the_key():
    with pytest.raises(ConfigError, match=r"model.ignored_layers: 'blok\.\*' names no layer"):
        check(Net(), ignored=["blok.*"])


def test_dry_run_prints_the_units_and_writes_no_run_folder(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = run_icep(
        ["--dry-run", "model=resnet20", "dataset=digits", f"paths.outputs={tmp_path}/outputs"],
        out,
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet20 on 1x8x8 inputs: 9 units" in result.stdout
    assert "layer3.2.conv1" in result.stdout
    assert not out.exists() and not (tmp_path / "outputs").exists()
    assert not (tmp_path / "cache" / "dense").exists()  # nothing trained


def test_a_refused_model_stops_before_the_dense_model_trains(tmp_path):
    result = run_icep(
        [
            "model=timm",
            "model.name=repvgg_a0",
            "dataset=synthetic",
            "dataset.num_samples=64",
            "dataset.num_test=16",
        ],
        tmp_path / "run",
        tmp_path / "cache",
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("icep: error:")]
    assert errors == [
        "icep: error: model repvgg_a0 has no pruning unit: the channels of every conv are tied to "
        "a residual add, a concatenation, the classifier or an ignored layer; icep prunes the "
        "inside of blocks, choose a model that has some"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "dense").exists()  # refused before any training
