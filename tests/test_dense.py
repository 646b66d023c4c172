"""Training the unpruned model on its own, and starting a pruning run from that checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, run_icep


def test_dense_pipeline_then_prune_from_its_checkpoint(tmp_path, cache_dir):
    dense_dir = tmp_path / "dense"
    result = run_icep([*FAST, "pipeline=dense", "dense.cache=false"], dense_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    dense = json.loads((dense_dir / "summary.json").read_text())
    assert dense["status"] == "completed" and dense["acc_val"] > 50
    assert not (dense_dir / "metrics.jsonl").exists()
    assert "dense" in result.stdout and str(dense_dir / "model.pt") in result.stdout

    run_dir = tmp_path / "pruned"
    result = run_icep([*FAST, f"model.checkpoint={dense_dir / 'model.pt'}"], run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dense"]["source"] == str(dense_dir / "model.pt")
    assert summary["acc_original_val"] == dense["acc_val"]
    assert summary["acc_original_test"] == dense["acc_test"]


def test_checkpoint_for_another_class_count_is_refused(tmp_path, cache_dir):
    dense_dir = tmp_path / "dense"
    result = run_icep([*FAST, "pipeline=dense"], dense_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_icep(
        [
            *FAST,
            "dataset=synthetic",
            "dataset.num_classes=4",
            "dataset.channels=1",
            "dataset.image_size=8",
            f"model.checkpoint={dense_dir / 'model.pt'}",
        ],
        tmp_path / "bad",
        cache_dir,
    )
    assert result.returncode == 2
    assert (
        "model.pt is an icep model of another architecture (num_classes=10 there, 4 here); "
        "run with model=resnet20 and the dataset= it was trained on"
    ) in result.stderr
    assert "Traceback" not in result.stderr


# --- the dense recipe's settings: onecycle, label smoothing, Nesterov, dense.batch_size ---------

COSINE = {"epochs": 3, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
ONECYCLE = {
    "epochs": 3,
    "lr": 0.05,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "label_smoothing": 0.1,
    "batch_size": 32,
    "schedule": "onecycle",
    "warmup_share": 0.2,
    "div_factor": 10,
}


def tiny_model(seed: int = 0):
    """A conv net small enough that a few epochs on digits take a second."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def test_onecycle_steps_per_batch_with_nesterov_label_smoothing_and_its_own_batches(
    cache_dir, monkeypatch
):
    """lr rises linearly from lr/div_factor over warmup_share of the run's batches, then falls
    linearly to 0 after the last one; Nesterov SGD and label smoothing are what trains; the run
    has dense.batch_size batches while the pipelines' train loader keeps its own."""
    import math

    import pytest
    import torch
    from conftest import digits_data
    from omegaconf import OmegaConf

    import icep.dense
    import icep.train
    from icep.train import Trainer

    data = digits_data(cache_dir, 200)  # 180 train samples, batches of 64
    train_loader, generator = data.train, data.train.generator
    made = []
    dense_optimizer = icep.dense.dense_optimizer
    monkeypatch.setattr(
        icep.dense, "dense_optimizer", lambda m, c: made.append(dense_optimizer(m, c)) or made[-1]
    )
    smoothing = []
    cross_entropy = icep.train.F.cross_entropy

    def spy(*args, **kwargs):
        smoothing.append(kwargs.get("label_smoothing"))
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(icep.train.F, "cross_entropy", spy)
    model = tiny_model()
    lrs = []  # the lr each training batch runs with
    model.register_forward_pre_hook(
        lambda m, _: lrs.append(made[0].param_groups[0]["lr"]) if m.training else None
    )
    icep.dense.train_dense(model, data, Trainer(torch.device("cpu")), OmegaConf.create(ONECYCLE))

    per_epoch = math.ceil(len(train_loader.dataset) / ONECYCLE["batch_size"])
    total = ONECYCLE["epochs"] * per_epoch
    assert per_epoch == 6 and len(lrs) == total  # 6 batches of 32, not 3 of 64
    warmup = round(ONECYCLE["warmup_share"] * total)
    lr = ONECYCLE["lr"]
    expected = [lr / 10 + (lr - lr / 10) * s / warmup for s in range(warmup)]
    expected += [lr * (total - s) / (total - warmup) for s in range(warmup, total)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(lr / 10) and max(lrs) == pytest.approx(lr)
    assert made[0].param_groups[0]["lr"] == pytest.approx(0.0)  # after the last batch
    assert made[0].param_groups[0]["nesterov"] is True
    assert set(smoothing) == {0.1} and len(smoothing) == total
    # The pruning fine-tunes' loader is untouched: same object, batch size and generator.
    assert data.train is train_loader and train_loader.batch_size == 64
    assert train_loader.generator is generator


def test_dense_batch_size_gives_the_same_samples_in_other_batches(cache_dir):
    """For both loader kinds: the same samples in the same order, augmented alike, from the same
    generator object, so dense training with its own batches draws from the run's stream."""
    import torch
    from conftest import ROOT
    from omegaconf import OmegaConf

    from icep.data import build_data, with_batch_size
    from icep.device_batches import DeviceLoader

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "dataset" / "digits.yaml"))
    for kind in ("device", "workers"):
        data = build_data(
            cfg, seed=0, batch_size=64, eval_batch_size=512, num_workers=0,
            cache_dir=cache_dir, batching=kind,
        )  # fmt: skip
        loader = with_batch_size(data.train, 100)
        assert isinstance(data.train, DeviceLoader) == (kind == "device")
        assert loader.generator is data.train.generator and loader.batch_size == 100
        assert len(loader) == -(-len(data.train.dataset) // 100) and data.train.batch_size == 64
        assert with_batch_size(data.train, 64) is data.train
        state = data.train.generator.get_state()
        big = list(loader)
        data.train.generator.set_state(state)
        small = list(data.train)
        for i in (0, 1):  # images, labels
            torch.testing.assert_close(
                torch.cat([b[i] for b in big]), torch.cat([b[i] for b in small])
            )


@pytest.mark.parametrize("recipe", ["cosine", "onecycle"])
def test_dense_training_killed_mid_epoch_goes_on_as_uninterrupted(
    recipe, tmp_path, cache_dir, caplog
):
    """A dense training killed during epoch 3 of 3 (a killed job, a GPU call's time limit), after
    some of its batches ran, ends, when started again, with the weights of an uninterrupted one:
    the cosine schedule stepped per epoch, and the onecycle recipe's per-batch schedule, Nesterov
    momentum and dense.batch_size alike."""
    import logging

    import torch
    from conftest import digits_data
    from omegaconf import OmegaConf

    from icep.dense import train_dense
    from icep.train import Trainer

    cfg = OmegaConf.create(ONECYCLE if recipe == "onecycle" else COSINE)
    trainer = Trainer(torch.device("cpu"))
    model, data = tiny_model(), digits_data(cache_dir, 200)
    train_dense(model, data, trainer, cfg)
    uninterrupted = model.state_dict()

    progress = tmp_path / "dense.partial.pt"
    model, data = tiny_model(), digits_data(cache_dir, 200)
    calls = 0
    train_epoch = trainer.train_epoch

    def killed_in_epoch_3(model, loader, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:

            def two_batches_then_killed(batches):
                yield from list(batches)[:2]
                raise KeyboardInterrupt

            loader = two_batches_then_killed(loader)
        return train_epoch(model, loader, *args, **kwargs)

    trainer.train_epoch = killed_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        train_dense(model, data, trainer, cfg, progress)
    assert torch.load(progress, weights_only=True)["epoch"] == 2
    trainer.train_epoch = train_epoch

    model, data = tiny_model(seed=1), digits_data(cache_dir, 200)  # another process
    with caplog.at_level(logging.INFO, logger="icep.dense"):
        train_dense(model, data, trainer, cfg, progress)
    assert "dense training goes on after epoch 2/3" in caplog.text
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[key], msg=key)


# --- config: checks, the cache key, the fast recipes -------------------------------------------

BAD_VALUES = {
    "dense.schedule=linear": "dense.schedule: got 'linear'; must be cosine, step or onecycle",
    "dense.label_smoothing=1": "dense.label_smoothing: got 1; must be a number in [0, 1)",
    "dense.batch_size=0": "dense.batch_size: got 0; must be null or an integer >= 1",
    "dense.nesterov=maybe": "dense.nesterov: got 'maybe'; must be true or false",
    "dense.momentum=1": "dense.momentum: got 1; must be a number in [0, 1)",
    "dense.warmup_share=1.0": "dense.warmup_share: got 1.0; must be a number in [0, 1)",
    "dense.div_factor=0.5": "dense.div_factor: got 0.5; must be a number >= 1",
    "dense.nesterov=true dense.momentum=0": "dense.nesterov: got true; needs dense.momentum > 0",
}


@pytest.mark.parametrize("args", list(BAD_VALUES))
def test_bad_dense_values_end_as_one_line_naming_the_key(args, place, monkeypatch, capsys):
    from places import call_main, one_line

    line = one_line(*call_main(args.split(), place, monkeypatch, capsys))
    assert line.startswith(BAD_VALUES[args])
    place.assert_untouched()


def compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("icep.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_new_dense_keys_at_their_defaults_keep_the_cache_key_of_earlier_models():
    """Models cached before nesterov, label_smoothing, batch_size and the onecycle keys existed
    keep their key while those keys train as before; a change that trains otherwise moves it."""
    from types import SimpleNamespace

    from omegaconf import open_dict

    from icep.dense import cache_path

    data = SimpleNamespace(num_classes=10, input_shape=(1, 8, 8))
    cfg = compose()
    earlier = compose()
    with open_dict(earlier):
        for key in ("nesterov", "label_smoothing", "batch_size", "warmup_share", "div_factor"):
            del earlier.dense[key]
    key = cache_path(cfg, data)
    assert cache_path(earlier, data) == key
    # dense.batch_size equal to trainer.batch_size trains alike: the same key.
    assert cache_path(compose("dense.batch_size=128"), data) == key
    assert cache_path(compose("dense.warmup_share=0.3"), data) == key  # not onecycle: unused
    for other in (
        ["dense.nesterov=true"],
        ["dense.label_smoothing=0.1"],
        ["dense.batch_size=256"],
        ["dense.schedule=onecycle"],
    ):
        assert cache_path(compose(*other), data) != key, other
    assert cache_path(cfg, data, amp=True) != key  # bf16 training gives another model
    assert cache_path(cfg, data, amp="bfloat16") == cache_path(cfg, data, amp=True)
    assert cache_path(cfg, data, amp="float16") not in (key, cache_path(cfg, data, amp=True))
    # model.shortcut=B is the model cached before the key existed; A is another model.
    assert cache_path(compose("model.shortcut=B"), data) == key
    assert cache_path(compose("model.shortcut=A"), data) != key
    onecycle = cache_path(compose("dense.schedule=onecycle"), data)
    assert cache_path(compose("dense.schedule=onecycle", "dense.div_factor=5"), data) != onecycle
    # The dense model trains with dense.batch_size: the fine-tunes' batch size is not in its key.
    assert cache_path(compose("dense.batch_size=512"), data) == cache_path(
        compose("dense.batch_size=512", "trainer.batch_size=64"), data
    )


@pytest.mark.parametrize("base", ["resnet56_cifar10", "resnet152_cifar10"])
def test_fast_experiments_change_only_the_dense_recipe(base):
    from omegaconf import OmegaConf

    from icep.config import validate

    fast = compose(f"+experiment={base}_fast")
    slow = compose(f"+experiment={base}")
    validate(fast)
    assert fast.name == f"{base}_fast"
    assert fast.dense.schedule == "onecycle" and fast.dense.batch_size == 512
    assert fast.dense.nesterov and fast.dense.epochs <= 40
    assert fast.trainer.batch_size == 128  # the fine-tunes keep the paper's batch size
    plain = {k: v for k, v in OmegaConf.to_container(fast).items() if k not in ("name", "dense")}
    assert plain == {
        k: v for k, v in OmegaConf.to_container(slow).items() if k not in ("name", "dense")
    }
