"""The CUDA code paths: bf16 autocast and channels_last, which also run on the CPU
(``trainer.amp=true trainer.channels_last=true trainer.device=cpu``), and what needs a GPU (marked
``cuda``, skipped without one): the device data path's sample order, fused SGD with frozen layers,
torch.compile of a pruned model and a resume on CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    ROOT,
    digits_data,
    kill_after,
    read_jsonl,
    run_icep,
    start_icep,
    trained_on_digits,
)
from omegaconf import OmegaConf
from torch import nn

from icep.device_batches import DeviceLoader, TensorSplit
from icep.models import cifar_resnet
from icep.pipelines.ice import freeze_layers
from icep.pruning import L1, PruningEngine
from icep.serialization import read_model_file
from icep.train import Trainer, sgd

CPU_AMP = ["trainer.amp=true", "trainer.channels_last=true", "trainer.device=cpu"]
# ICE with a low threshold, so the steps fine-tune (under bf16 autocast, on channels_last weights).
# A ResNet-8 (3 units): most CPUs have no bf16 kernels, an epoch takes ~5x as long as in float32.
AMP_ARGS = [*FAST, *CPU_AMP, "model.name=resnet8", "model.arch.depth=8", "pipeline=ice"]
AMP_ARGS += ["pipeline.trigger=false"]  # every step fine-tunes, whatever this CPU's floats give
RESNET8_UNITS = 3
RESNET20_UNITS = 9


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


def _compute_counts(summary: dict) -> dict:
    """The summary's top-level compute counters (FLOPs, images), whatever their exact names."""
    return {k: v for k, v in summary.items() if k.startswith(("flops", "images_"))}


def _channels_last(weight: torch.Tensor) -> bool:
    """Whether a conv weight is laid out channels_last rather than contiguous. Only asked of
    weights with more than one input channel and a kernel over 1x1: for the others (the 1-channel
    stem, 1x1 projections) the two layouts have the same strides and both checks hold."""
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _spatial_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    }


# --- bf16 autocast and channels_last on the CPU -----------------------------------------------


@pytest.fixture(scope="module")
def digits(cache_dir):
    return digits_data(cache_dir, 700)


@pytest.fixture(scope="module")
def digits_resnet8(digits) -> dict:
    return trained_on_digits(digits, depth=8, epochs=6, min_val_acc=85.0)


def test_the_trainer_config_turns_bf16_and_channels_last_on_for_the_cpu():
    cfg = OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml")
    auto = Trainer.from_config(OmegaConf.merge(cfg, {"device": "cpu"}))
    assert (auto.amp, auto.channels_last) == (False, False)  # auto: on for CUDA only
    on = Trainer.from_config(
        OmegaConf.merge(cfg, {"device": "cpu", "amp": True, "channels_last": True})
    )
    assert on.device == torch.device("cpu") and on.amp and on.channels_last


def test_a_pruned_model_fine_tunes_and_evaluates_under_bf16_in_channels_last(
    digits, digits_resnet8
):
    trainer = Trainer(torch.device("cpu"), amp=True, channels_last=True)
    model = cifar_resnet(8, num_classes=10, in_channels=1)
    model.load_state_dict(digits_resnet8)
    convs = _spatial_convs(model)
    assert convs and not any(_channels_last(m.weight) for m in convs.values())
    model = trainer.prepare(model)
    assert all(_channels_last(m.weight) for m in convs.values())

    engine = PruningEngine(model, torch.zeros(1, *digits.input_shape))
    assert engine.units[1].name == "layer2.0"
    engine.prune_unit(1, 0.6, L1())
    trainer.prepare(model)
    hooked = model.layer2[0].conv1  # pruned: 32 filters less ceil(0.6 * 32)
    assert hooked.out_channels == 12 and hooked.weight.shape[0] == 12
    laid_out = {name: _channels_last(m.weight) for name, m in convs.items()}
    assert all(laid_out.values()), laid_out

    seen: list[tuple[bool, torch.dtype, bool]] = []  # (training, output dtype, output layout)

    def record(module, inputs, output):
        if len(output) == 1:
            return  # a one-image probe (icep counts FLOPs that way), not a batch
        layout = output.is_contiguous(memory_format=torch.channels_last)
        seen.append((module.training, output.dtype, layout and not output.is_contiguous()))

    handle = hooked.register_forward_hook(record)
    try:
        loss = trainer.fit(model, digits.train, sgd(model, 0.01, weight_decay=5e-4), epochs=1)
        trained = list(seen)
        seen.clear()
        acc = trainer.evaluate(model, digits.test)
        evaluated = list(seen)
    finally:
        handle.remove()

    assert len(trained) == len(digits.train) and len(evaluated) == len(digits.test)
    # Training and evaluation both ran the conv in bf16 on channels_last activations.
    assert set(trained) == {(True, torch.bfloat16, True)}
    assert set(evaluated) == {(False, torch.bfloat16, True)}
    assert math.isfinite(loss) and loss > 0, loss
    # The parameters stay float32 and keep their layout through the optimizer's updates.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(_channels_last(m.weight) for m in convs.values())
    # bf16 evaluation reports what float32 evaluation of the same weights reports, nearly.
    fp32 = Trainer(torch.device("cpu"), channels_last=True).evaluate(model, digits.test)
    assert abs(acc - fp32) <= 5.0, (acc, fp32)

    # bf16 autocast predicts as float32 does on nearly every sample.
    model.eval()
    agree = total = 0
    with torch.inference_mode():
        for x, _ in digits.test:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16_pred = model(x).argmax(1)
            agree += (bf16_pred == model(x).argmax(1)).sum().item()
            total += len(x)
    assert agree >= 0.95 * total, (agree, total)


@pytest.fixture(scope="module")
def amp_cache(cache_dir) -> Path:
    """The dense-model cache of the bf16 runs: apart from the float32 runs' cache, whose keys
    do not name trainer.amp, so neither run family picks up the other's dense model."""
    path = cache_dir / "bf16-channels-last"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory, amp_cache) -> Path:
    out = tmp_path_factory.mktemp("amp") / "run"
    result = run_icep(AMP_ARGS, out, amp_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_an_ice_run_completes_under_bf16_and_channels_last_on_the_cpu(amp_run):
    summary = json.loads((amp_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"] == "cpu"
    config = OmegaConf.load(amp_run / ".hydra" / "config.yaml")
    assert config.trainer.amp is True and config.trainer.channels_last is True
    rows = read_jsonl(amp_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, RESNET8_UNITS + 1))
    assert summary["steps"] == RESNET8_UNITS
    assert summary["finetunes"] == sum(bool(r["finetuned"]) for r in rows) == RESNET8_UNITS
    assert summary["params_after"] < summary["params_before"]
    for split in ("val", "test"):
        assert 0.0 <= summary[f"acc_final_{split}"] <= 100.0, summary
    assert all(math.isfinite(r["val_acc"]) for r in rows)


@pytest.mark.slow
def test_a_bf16_channels_last_run_killed_between_steps_resumes_to_the_same_metrics(
    tmp_path, amp_cache, amp_run
):
    kill_at = 2  # of 3: after step 1 the kill may land before the first checkpoint
    out = tmp_path / "killed"
    kill_after(out, kill_at, start_icep(AMP_ARGS, out, amp_cache))
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    # The kill may land between step kill_at's metrics row and its checkpoint.
    assert kill_at - 1 <= blob["steps"] <= kill_at

    resumed = run_icep([*AMP_ARGS, "resume=true"], out, amp_cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing {out} after step {blob['steps']}" in resumed.stdout

    assert _without_timings(read_jsonl(out / "metrics.jsonl")) == _without_timings(
        read_jsonl(amp_run / "metrics.jsonl")
    )
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, amp_run))
    assert a["status"] == "completed"
    for key in ("acc_final_val", "acc_final_test", "params_after", "finetunes", "frozen_layers"):
        assert a[key] == b[key], key
    assert _compute_counts(a) == _compute_counts(b)
    assert not (out / "checkpoint.pt").exists()
    # On the CPU the resumed run computes what the uninterrupted one did, to the last bit.
    weights, expected = (read_model_file(d / "model.pt")["state_dict"] for d in (out, amp_run))
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


# --- needs CUDA -------------------------------------------------------------------------------


def _uint8_images(
    n: int, size: tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(0, 256, (n, 3, *size), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.cuda
@pytest.mark.parametrize("normalized", [False, True], ids=["raw", "normalized"])
def test_the_device_data_path_gives_the_same_batches_on_cuda_as_on_the_cpu(normalized):
    """Shuffle, crop and flip are drawn from one CPU generator, so a split held on CUDA gives
    the CPU's batches. Raw (scale 1, mean 0, std 1) pixels must match exactly: the same samples,
    crops and flips. Normalized ones are a multiply-add that CUDA may fuse into one rounding
    (an FMA) where the CPU rounds twice, so they may differ in the last bit."""
    cuda = torch.device("cuda")
    # Non-square images, so rows and columns cannot be mixed up unseen.
    images, labels = _uint8_images(100, (12, 10), torch.Generator().manual_seed(0))
    norm = {"scale": 1 / 255, "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
    splits = [
        TensorSplit(
            images.to(device), labels.to(device), range(100), **(norm if normalized else {})
        )
        for device in (torch.device("cpu"), cuda)
    ]
    loaders = [
        DeviceLoader(
            split,
            16,  # 100 samples: the last batch is short
            shuffle=True,
            generator=torch.Generator().manual_seed(1),
            crop_padding=4,
            flip=True,
        )
        for split in splits
    ]
    epochs = []
    for _ in range(2):
        batches = 0
        epoch_labels = []
        for (x_cpu, y_cpu), (x_cuda, y_cuda) in zip(*loaders, strict=True):
            assert x_cpu.device.type == "cpu" and x_cuda.device.type == "cuda"
            assert x_cuda.dtype == x_cpu.dtype == torch.float32
            assert torch.equal(y_cuda.cpu(), y_cpu)
            if normalized:
                torch.testing.assert_close(x_cuda.cpu(), x_cpu, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(x_cuda.cpu(), x_cpu)
            epoch_labels.append(y_cpu)
            batches += 1
        assert batches == len(loaders[0]) == 7
        epochs.append(torch.cat(epoch_labels))
    assert torch.equal(loaders[0].generator.get_state(), loaders[1].generator.get_state())
    assert not torch.equal(epochs[0], epochs[1])  # each epoch is shuffled anew


def _synthetic_loader(device: torch.device, n: int = 128, batch_size: int = 32) -> DeviceLoader:
    """Random 10x10 RGB images on ``device``; ``n`` a multiple of ``batch_size``, so every batch
    has one shape (a short last batch would make torch.compile compile once more)."""
    images, labels = _uint8_images(n, (10, 10), torch.Generator().manual_seed(0))
    split = TensorSplit(images.to(device), labels.to(device), range(n), scale=1 / 255)
    return DeviceLoader(
        split, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), flip=True
    )


@pytest.mark.cuda
def test_fused_sgd_leaves_frozen_layers_bit_identical():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    trainer = Trainer(cuda, amp=True, channels_last=True)
    model = trainer.prepare(cifar_resnet(8, num_classes=10, in_channels=3))
    engine = PruningEngine(model, torch.zeros(1, 3, 10, 10, device=cuda))
    frozen_convs = ["layer1.0.conv1", "layer2.0.conv2"]  # layer1.0.conv1 is pruned below
    assert set(frozen_convs) <= set(engine.touched_convs())
    freeze_layers(model, engine, frozen_convs)
    frozen = {f"{c}.weight" for c in frozen_convs}
    for conv in frozen_convs:
        norm = engine.norm_after(conv)
        assert norm is not None
        frozen |= {f"{norm}.weight", f"{norm}.bias"}

    assert engine.units[0].name == "layer1.0"
    engine.prune_unit(0, 0.5, L1())
    trainer.prepare(model)
    params = dict(model.named_parameters())
    assert params["layer1.0.conv1.weight"].shape[0] == 8  # pruned, still frozen
    assert {name for name, p in params.items() if not p.requires_grad} == frozen

    optimizer = sgd(model, 0.1, weight_decay=5e-4)
    assert optimizer.defaults.get("fused") is True
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(params[name]) in in_optimizer for name in frozen)

    before = {name: p.detach().clone() for name, p in params.items()}
    loss = trainer.fit(model, _synthetic_loader(cuda), optimizer, epochs=2)
    torch.cuda.synchronize()
    assert math.isfinite(loss)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"


@pytest.mark.cuda
def test_a_run_killed_on_cuda_resumes_and_completes(tmp_path, cache_dir):
    """Killed while writing step 3's checkpoint (a fault tests/harness.py injects, since steps on
    a GPU are too fast to kill by watching metrics.jsonl), it resumes after step 2. Rows after the
    kill are not compared with an uninterrupted run's: cuDNN's benchmark mode may pick other
    kernels in another process, so bf16 sums may differ."""
    cache = cache_dir / "cuda"
    cache.mkdir(exist_ok=True)
    args = [a for a in FAST if not a.startswith("trainer.device=")]
    args += ["trainer.device=cuda", "pipeline=ice", "pipeline.thre=0.5"]
    out = tmp_path / "run"
    killed = run_icep(args, out, cache, kill_in_checkpoint=3)
    assert killed.returncode < 0, killed.stderr[-3000:]  # SIGKILL
    assert torch.load(out / "checkpoint.pt", weights_only=True)["steps"] == 2
    before = read_jsonl(out / "metrics.jsonl")
    assert len(before) == 3  # step 3 was logged, not checkpointed

    resumed = run_icep([*args, "resume=true"], out, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing {out} after step 2" in resumed.stdout
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, RESNET20_UNITS + 1))
    assert rows[:2] == before[:2]  # the checkpointed steps, timings and all
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["steps"] == RESNET20_UNITS
    assert not (out / "checkpoint.pt").exists()


# Last: inductor compiles for minutes on a cold cache, and a device call may stop it first.
@pytest.mark.cuda
def test_a_pruned_model_trains_under_torch_compile_on_cuda():
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    benchmark = torch.backends.cudnn.benchmark  # the trainer sets it for the whole process
    keys = []
    try:
        trainer = Trainer(cuda, amp=True, channels_last=True, cudnn_benchmark=True, compile=True)
        model = trainer.prepare(cifar_resnet(8, num_classes=10, in_channels=3))
        engine = PruningEngine(model, torch.zeros(1, 3, 10, 10, device=cuda))
        loader = _synthetic_loader(cuda)
        for unit in (0, 2):  # layer1.0, then layer3.0
            engine.prune_unit(unit, 0.5, L1())
            trainer.prepare(model)
            weight = model.get_submodule(engine.units[unit].convs[0]).weight
            before = weight.detach().clone()
            loss = trainer.fit(model, loader, sgd(model, 0.05), epochs=1)
            assert math.isfinite(loss), f"after pruning unit {unit}"
            # The updates land in the model itself, not in a copy the compiled code holds.
            assert not torch.equal(weight, before)
            assert trainer._compiled is not None
            keys.append(trainer._compiled[0])
            acc = trainer.evaluate(model, loader)
            assert 0.0 <= acc <= 100.0
    finally:
        torch._dynamo.reset()
        torch.backends.cudnn.benchmark = benchmark
    assert keys[0] != keys[1]  # compiled anew for the second prune's shapes
