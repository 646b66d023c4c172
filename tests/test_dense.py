"""Training the unpruned model on its own, and starting a pruning run from that checkpoint."""

from __future__ import annotations

import json

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
    assert "another architecture or class count" in result.stderr
    assert "Traceback" not in result.stderr


def test_dense_training_killed_mid_way_goes_on_from_its_last_epoch(tmp_path, cache_dir, caplog):
    """A dense training stopped after epoch 2 of 3 (a killed job, a GPU call's time limit) ends,
    when started again, with the weights of an uninterrupted one."""
    import logging

    import pytest
    import torch
    from conftest import digits_data
    from omegaconf import OmegaConf

    from icep.dense import train_dense
    from icep.models import cifar_resnet
    from icep.train import Trainer

    cfg = OmegaConf.create(
        {"epochs": 3, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine"}
    )
    trainer = Trainer(torch.device("cpu"))

    def fresh(seed: int = 0):
        torch.manual_seed(seed)
        return cifar_resnet(depth=8, in_channels=1), digits_data(cache_dir, 300)

    model, data = fresh()
    train_dense(model, data, trainer, cfg)
    uninterrupted = model.state_dict()

    progress = tmp_path / "dense.partial.pt"
    model, data = fresh()
    calls = 0
    train_epoch = trainer.train_epoch

    def killed_in_epoch_3(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    trainer.train_epoch = killed_in_epoch_3
    with pytest.raises(KeyboardInterrupt):
        train_dense(model, data, trainer, cfg, progress)
    assert torch.load(progress, weights_only=True)["epoch"] == 2
    trainer.train_epoch = train_epoch

    model, data = fresh(seed=1)  # another process: other initial weights, a fresh loader
    with caplog.at_level(logging.INFO, logger="icep.dense"):
        train_dense(model, data, trainer, cfg, progress)
    assert "dense training goes on after epoch 2/3" in caplog.text
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, uninterrupted[key], msg=key)
