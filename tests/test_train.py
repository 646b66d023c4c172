"""Training and evaluation loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from icep.errors import ConfigError, IcepError
from icep.train import Distillation, PhaseTimer, Trainer, resolve_device, sgd


def loader(n=256, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) * 0.3
    x[torch.arange(n), y] += 2.0  # separable: the class is the hot feature
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g)


def test_evaluate_is_percent_top1():
    x = torch.eye(4)
    y = torch.tensor([0, 1, 2, 0])  # identity model gets 3 of 4
    trainer = Trainer(torch.device("cpu"))
    assert trainer.evaluate(nn.Identity(), DataLoader(TensorDataset(x, y), batch_size=2)) == 75.0


def test_accuracy_is_computed_in_the_references_order():
    """correct / total * 100 (METHOD.md section 7): 1 of 3 is 33.33333333333333, not the
    33.333333333333336 of 100 * correct / total, so a drop exactly at thre decides alike."""
    x, y = torch.eye(3), torch.tensor([0, 0, 0])  # the identity model gets 1 of 3
    acc = Trainer(torch.device("cpu")).evaluate(nn.Identity(), DataLoader(TensorDataset(x, y)))
    assert acc == 1 / 3 * 100 != 100 * 1 / 3


def test_fit_learns_and_keeps_eval_mode_consistent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    trainer = Trainer(torch.device("cpu"))
    data = loader()
    before = trainer.evaluate(model, data)
    trainer.fit(model, data, sgd(model, 0.1), epochs=5)
    assert trainer.evaluate(model, data) > max(before, 90.0)


def test_distillation_from_identical_teacher_adds_no_loss():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    distill = Distillation(model, temperature=2.0, weight=1.0)
    x = torch.randn(16, 8)
    assert distill.loss(x, model(x)).item() == pytest.approx(0.0, abs=1e-6)
    other = nn.Linear(8, 4)
    loss = distill.loss(x, other(x))
    assert loss.item() > 0
    loss.backward()  # gradients reach the student only
    assert other.weight.grad is not None and model.weight.grad is None


def test_nan_loss_is_a_clear_error():
    model = nn.Linear(8, 4)
    trainer = Trainer(torch.device("cpu"))
    with pytest.raises(IcepError, match="lr 1e\\+30") as err:
        trainer.fit(model, loader(), sgd(model, 1e30), epochs=3, desc="dense", lr_key="dense.lr")
    message = str(err.value)
    assert message.startswith("dense epoch 1/3: the loss became ")
    assert "lower dense.lr" in message and "\n" not in message


class NanFrom(nn.Module):
    """A linear model whose output turns NaN from the ``start``-th training forward call on
    (the eval-mode call that measures its cost for the compute counts is not counted)."""

    def __init__(self, start: int):
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.start, self.calls = start, 0

    def forward(self, x):
        self.calls += self.training
        out = self.linear(x)
        return out * float("nan") if self.calls >= self.start else out


def test_nan_loss_names_epoch_batch_and_lr():
    model = NanFrom(start=8 + 3)  # 8 batches per epoch: the 3rd batch of epoch 2
    trainer = Trainer(torch.device("cpu"))
    with pytest.raises(IcepError) as err:
        trainer.fit(model, loader(), sgd(model, 0.05), epochs=3, desc="fine-tune")
    assert str(err.value) == (
        "fine-tune epoch 2/3: the loss became nan at batch 3/8 (lr 0.05); the learning rate is "
        "too high for this model: lower pipeline.finetune.lr (ICE: pipeline.base; AGP, EPI: pipeline.lr)"
    )
    assert model.calls == 8 + 3  # stopped at the batch, not at the end of the epoch


class OutOfMemory(nn.Linear):
    def forward(self, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")


def test_out_of_memory_names_the_batch_size(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = OutOfMemory(8, 4)
    trainer = Trainer(torch.device("cpu"))
    data = loader()  # batches of 32
    with pytest.raises(IcepError) as err:
        trainer.fit(model, data, sgd(model, 0.1), epochs=1, desc="dense")
    assert str(err.value) == (
        "dense epoch 1/1: out of GPU memory on cpu with batches of 32; try trainer.batch_size=16 "
        "or free the GPU of other work"
    )
    with pytest.raises(IcepError, match="try trainer.eval_batch_size=16"):
        trainer.evaluate(model, data, desc="val")
    assert model.training  # evaluate restores the mode it found


def test_sgd_leaves_frozen_parameters_out():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    model[0].requires_grad_(False)
    opt = sgd(model, 0.01)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 8 * 4 + 4


def test_phase_timer_adds_up_each_phase_and_its_work(monkeypatch):
    ticks = iter(range(1000))  # a clock that moves one second per reading
    monkeypatch.setattr("icep.train.time.perf_counter", lambda: float(next(ticks)))
    timer = PhaseTimer(torch.device("cpu"))
    for images in (3, 4):
        with timer.phase("finetune") as t:
            timer.count(images_fwd=images, images_bwd=images, flops=10 * images)
        assert t["seconds"] == 1.0
    with timer.phase("eval"), timer.phase("report"):  # the innermost phase gets the work
        timer.count(images_fwd=5, flops=2)
    timer.count(images_fwd=1)  # outside any phase
    assert timer.totals == {"finetune": 2.0, "report": 1.0, "eval": 3.0}
    assert timer.total("finetune", "missing") == 2.0
    assert timer.work["finetune"] == {"images_fwd": 7, "images_bwd": 7, "flops": 70}
    assert "eval" not in timer.work and timer.work["report"]["flops"] == 2
    assert timer.work["other"]["images_fwd"] == 1
    assert timer.work_total("finetune", "report")["flops"] == 72
    assert timer.work_total()["images_fwd"] == 13


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="trainer.device"):
        resolve_device("tpu")


def test_deterministic_turns_cudnn_benchmark_off_and_deterministic_on(monkeypatch):
    """trainer.deterministic=true: the reference's deterministic cuDNN, whatever cudnn_benchmark
    says (auto or true)."""
    from omegaconf import OmegaConf

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    cfg = OmegaConf.create(
        {
            "device": "cpu",
            "amp": False,
            "channels_last": False,
            "progress": False,
            "cudnn_benchmark": True,
            "deterministic": True,
        }
    )
    trainer = Trainer.from_config(cfg)
    assert trainer.deterministic and not trainer.cudnn_benchmark
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    cfg.deterministic = False
    assert Trainer.from_config(cfg).cudnn_benchmark


def test_fp16_autocast_trains_through_a_gradient_scaler():
    """trainer.amp_dtype=float16 (the reference's DenseNet and WRN AMP): a step whose scaled
    gradients overflow is skipped and the scale lowered; then training goes on and learns."""
    torch.manual_seed(0)
    trainer = Trainer(torch.device("cpu"), amp=True, amp_dtype="float16")
    assert Trainer(torch.device("cpu"), amp=True).scaler is None  # bf16 needs none
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = sgd(model.parameters(), lr=0.1)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    trainer.train_epoch(model, [(x, y)], optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert trainer.scaler.get_scale() < 2.0**100
    trainer.scaler = torch.amp.GradScaler("cpu")
    trainer.fit(model, loader(), optimizer, epochs=5)
    assert trainer.evaluate(model, loader(seed=1)) > 90
