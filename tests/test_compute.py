"""Compute accounting (icep.compute): the counting model on known layers, what the trainer
counts per phase, and that the counts of a pipeline are exact and reproducible."""

from __future__ import annotations

import pytest
import torch
from conftest import build_pipeline, digits_data, trained_on_digits
from torch import nn

from icep.compute import CostCache, ModelCost, format_flops, measure_cost
from icep.loggers import RunLogger
from icep.models import cifar_resnet
from icep.pipelines import PruningRun
from icep.pipelines.base import COST_PHASES
from icep.pipelines.ice import freeze_layers
from icep.pruning import L1, PruningEngine, Taylor
from icep.seeding import seed_everything
from icep.train import Distillation, Trainer, sgd


def small_net() -> nn.Module:
    # conv 3->8 (3x3, pad 1) on 8x8: 8*8*8 outputs x 3*3*3 = 13,824 MACs
    # grouped conv 8->8 (3x3, groups 4, stride 2): 4*4*8 outputs x 2*3*3 = 2,304 MACs
    # linear 8->4: 32 MACs
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_the_counting_model_on_known_layers():
    net = small_net()
    net.train()
    stats = net[1].running_mean.clone()
    cost = measure_cost(net, (3, 8, 8))
    assert cost == ModelCost(macs=13_824 + 2_304 + 32, frozen_macs=0)
    assert cost.forward_flops == 2 * 16_160
    assert cost.train_flops == 6 * 16_160
    assert net.training and torch.equal(net[1].running_mean, stats)  # measuring changes nothing

    net[0].requires_grad_(False)  # a frozen weight skips its weight gradient
    frozen = measure_cost(net, (3, 8, 8))
    assert frozen.frozen_macs == 13_824
    assert frozen.train_flops == 6 * 16_160 - 2 * 13_824
    # A transposed conv 4->2 (2x2, stride 2) on 3x3: each of the 36 input values feeds 2*2*2.
    assert measure_cost(nn.ConvTranspose2d(4, 2, 2, stride=2), (4, 3, 3)).macs == 36 * 8
    assert format_flops(1.5e12) == "1.5 TFLOP" and format_flops(12) == "12 FLOP"


def test_the_cost_is_measured_again_after_a_prune_or_a_freeze():
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=10, in_channels=1)
    cache = CostCache()
    dense = cache(model, (1, 8, 8))
    assert cache(model, (1, 8, 8)) is dense  # same shapes and flags: not measured again
    engine = PruningEngine(model, torch.zeros(1, 1, 8, 8))
    engine.prune_unit(0, 0.5, L1())
    pruned = cache(model, (1, 8, 8))
    assert pruned.macs < dense.macs and pruned.frozen_macs == 0
    freeze_layers(model, engine, [engine.units[1].convs[0]])
    frozen = cache(model, (1, 8, 8))
    assert frozen.macs == pruned.macs and 0 < frozen.frozen_macs < frozen.macs


def batches(n: int, batch: int = 16, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_the_trainer_counts_each_phase():
    net = small_net()
    trainer = Trainer(torch.device("cpu"))
    cost = measure_cost(net, (3, 8, 8))
    with trainer.timer.phase("finetune"):
        trainer.fit(net, batches(40), sgd(net, 0.01), epochs=2)
    with trainer.timer.phase("eval"):
        trainer.evaluate(net, batches(24))
    teacher = small_net().eval().requires_grad_(False)
    with trainer.timer.phase("freeze_analysis"):
        trainer.fit(net, batches(8), sgd(net, 0.01), 1, distill=Distillation(teacher))
    trainer.evaluate(net, batches(5))  # outside any phase
    work = trainer.timer.work
    assert work["finetune"] == {"images_fwd": 80, "images_bwd": 80, "flops": 80 * cost.train_flops}
    assert work["eval"] == {"images_fwd": 24, "images_bwd": 0, "flops": 24 * cost.forward_flops}
    # distilling adds the teacher's forward pass for every trained image
    assert work["freeze_analysis"]["flops"] == 8 * (cost.train_flops + cost.forward_flops)
    assert work["other"]["images_fwd"] == 5
    assert trainer.timer.work_total("finetune", "eval")["flops"] == 80 * cost.train_flops + 24 * (
        cost.forward_flops
    )


def test_a_gradient_criterion_counts_its_passes_as_pruning_work(digits, tmp_path):
    torch.manual_seed(0)
    run = PruningRun(
        cifar_resnet(8, num_classes=10, in_channels=1),
        digits,
        Trainer(torch.device("cpu")),
        Taylor(batches=2),
        RunLogger(tmp_path),
    )
    cost = run.trainer.cost(run.model, digits.input_shape)
    run.prune(run.units[0], 0.5)
    images = 2 * digits.train.batch_size
    assert run.timer.work["prune"] == {
        "images_fwd": images,
        "images_bwd": images,
        "flops": images * 4 * cost.macs,
    }


# --- pipelines -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(cache_dir):
    return digits_data(cache_dir, 700)


@pytest.fixture(scope="module")
def dense_state(digits):
    return trained_on_digits(digits, depth=20, epochs=4, min_val_acc=20)


def prune(pipeline, overrides, digits, dense_state, out):
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=10, in_channels=1)
    model.load_state_dict(dense_state)
    run = PruningRun(model, digits, Trainer(torch.device("cpu")), L1(), RunLogger(out))
    seed_everything(0, digits)
    return build_pipeline(pipeline, **overrides)(run), run.rows


def counts(summary, rows):
    return (
        {k: v for k, v in summary.items() if k.startswith(("flops", "images_"))},
        summary["compute"],
        [{k: r[k] for k in ("images_fwd", "images_bwd", "flops", "flops_total")} for r in rows],
    )


def test_ice_with_its_three_components_off_counts_what_the_baseline_counts(
    digits, dense_state, tmp_path
):
    baseline = prune("iterative", {}, digits, dense_state, tmp_path / "baseline")
    off = prune(
        "ice",
        {"trigger": False, "freeze": False, "adaptive_lr": False},
        digits,
        dense_state,
        tmp_path / "ice",
    )
    assert counts(*off) == counts(*baseline)
    assert baseline[0]["flops_total"] == sum(
        baseline[0]["compute"][p]["flops"] for p in COST_PHASES if p in baseline[0]["compute"]
    )


def test_the_same_run_twice_counts_the_same_and_ice_counts_less(digits, dense_state, tmp_path):
    # thre high enough that no step fine-tunes, whatever the floats of this CPU: the counts are
    # then fixed by the data sizes alone (one analysis epoch, one evaluation per step).
    first = prune("ice", {"thre": 100.0}, digits, dense_state, tmp_path / "a")
    second = prune("ice", {"thre": 100.0}, digits, dense_state, tmp_path / "b")
    assert counts(*first) == counts(*second)
    summary, rows = first
    assert summary["finetunes"] == 0
    train, val = len(digits.train.dataset), len(digits.val.dataset)
    assert summary["compute"]["freeze_analysis"]["images_bwd"] == train
    assert summary["compute"]["eval"]["images_fwd"] == val * (1 + len(rows))
    assert summary["images_bwd_total"] == train
    baseline, _ = prune("iterative", {}, digits, dense_state, tmp_path / "baseline")
    assert summary["flops_total"] < baseline["flops_total"] / 3
