"""The baseline iterative pipeline end to end through `python -m icep`, on real (digits) data."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import FAST, ROOT, SHARED_CIFAR, read_jsonl, run_icep
from omegaconf import OmegaConf

from icep.data import build_data
from icep.serialization import load_model
from icep.train import Trainer

ROW_KEYS = {
    "step",
    "unit",
    "ratio",
    "params",
    "macs",
    "remaining",
    "val_acc",
    "finetuned",
    "lr",
    "epochs",
    "t_prune",
    "t_finetune",
    "t_eval",
    "t_total",
    "images_fwd",
    "images_bwd",
    "flops",
    "flops_total",
}
SUMMARY_KEYS = {
    "pipeline",
    "model",
    "dataset",
    "device",
    "acc_original_val",
    "acc_final_val",
    "acc_original_test",
    "acc_final_test",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "steps",
    "finetunes",
    "time_total_s",
    "time_prune_s",
    "time_finetune_s",
    "time_eval_s",
    "flops_total",
    "flops_prune",
    "flops_finetune",
    "flops_eval",
    "images_fwd_total",
    "images_bwd_total",
    "compute",
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_dir):
    run_dir = tmp_path_factory.mktemp("iterative") / "run"
    result = run_icep([*FAST, "pipeline=iterative"], run_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_metrics_rows(digits_run):
    run_dir, _ = digits_run
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 9  # ResNet-20: one unit per BasicBlock
    assert [r["step"] for r in rows] == list(range(1, 10))
    for row in rows:
        assert row.keys() >= ROW_KEYS
        assert row["finetuned"] is True and row["lr"] == 0.001 and row["epochs"] == 1
        assert 0 <= row["val_acc"] <= 100
    remaining = [r["remaining"] for r in rows]
    assert all(a > b for a, b in zip([1.0, *remaining], remaining, strict=False))
    totals = [r["t_total"] for r in rows]
    assert totals == sorted(totals)
    assert math.isclose(
        totals[-1] - totals[0],
        sum(r["t_prune"] + r["t_finetune"] + r["t_eval"] for r in rows[1:]),
        rel_tol=1e-6,
        abs_tol=1e-6,
    )
    assert rows[-1]["params"] < rows[0]["params"]
    # Counted work: each row's share adds up to the running total; every step fine-tunes one
    # epoch on the same train split, so each step's backward images are equal, and a smaller
    # model costs fewer FLOPs per step.
    flops = [r["flops_total"] for r in rows]
    assert flops == [sum(r["flops"] for r in rows[: i + 1]) for i in range(len(rows))]
    assert len({r["images_bwd"] for r in rows}) == 1 and rows[0]["images_bwd"] > 0
    assert all(r["images_fwd"] > r["images_bwd"] for r in rows)  # + the step's evaluation
    assert rows[-1]["flops"] < rows[1]["flops"]


def test_summary_and_closing_table(digits_run):
    run_dir, result = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["status"] == "completed"
    # what produced it: the versions, and the commit of icep's checkout (the folder it was
    # started from is that checkout, so it is not listed twice)
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["versions"]["optuna"] and summary["versions"]["hydra-core"].startswith("1.3")
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
        assert summary["git"]["icep"]["commit"] == head.stdout.decode().strip()
        assert isinstance(summary["git"]["icep"]["dirty"], bool) and "workdir" not in summary["git"]
    assert summary["steps"] == summary["finetunes"] == 9
    assert summary["params_after"] < summary["params_before"]
    assert summary["macs_after"] < summary["macs_before"]
    assert summary["acc_original_val"] > 50  # the dense model learned the digits
    phases = summary["time_prune_s"] + summary["time_finetune_s"] + summary["time_eval_s"]
    assert math.isclose(summary["time_total_s"], phases, rel_tol=1e-6)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    work = summary["flops_prune"] + summary["flops_finetune"] + summary["flops_eval"]
    assert summary["flops_total"] == work == rows[-1]["flops_total"] > 0
    assert summary["flops_prune"] == 0  # L1 looks at no data
    assert summary["images_bwd_total"] == summary["compute"]["finetune"]["images_bwd"]
    assert summary["compute"]["report"]["images_fwd"] > 0  # test evaluations: not in the total
    for text in (
        "val accuracy",
        "test accuracy",
        "params",
        "MACs",
        "fine-tuned",
        "time",
        "compute",
        "FLOP total = prune",
        "backward",
        str(run_dir),
    ):
        assert text in result.stdout


def test_saved_model_loads_without_config_and_keeps_accuracy(digits_run, cache_dir):
    run_dir, _ = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    torch.load(run_dir / "model.pt", weights_only=True)  # no pickle needed
    model = load_model(run_dir / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == summary["params_after"]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    data = build_data(
        cfg.dataset,
        seed=cfg.seed,
        batch_size=64,
        eval_batch_size=512,
        num_workers=0,
        cache_dir=cache_dir,
    )
    trainer = Trainer(torch.device("cpu"))
    assert trainer.evaluate(model, data.test) == pytest.approx(summary["acc_final_test"])
    assert trainer.evaluate(model, data.val) == pytest.approx(summary["acc_final_val"])


def test_dense_model_is_cached_and_reused(digits_run, tmp_path, cache_dir):
    run_dir, _ = digits_run
    first = json.loads((run_dir / "summary.json").read_text())
    result = run_icep(
        [*FAST, "pipeline=iterative", "pipeline.finetune.distill=true"],
        tmp_path / "again",
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert second["dense"]["source"] == first["dense"]["source"]
    assert "dense_seconds" not in second["dense"]  # not trained again
    assert second["acc_original_val"] == first["acc_original_val"]


def test_wandb_offline_through_the_app(tmp_path, cache_dir):
    from wandb_offline import history, run_info, summary, table

    run_dir = tmp_path / "wb"
    result = run_icep(
        [
            *FAST,
            "pipeline=iterative",
            "pipeline.ratio=0.7",
            "logger=wandb",
            "logger.mode=offline",
            "name=wbtest",
        ],
        run_dir,
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = [r for r in history(files[0]) if "val_acc" in r]
    local = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in local]
    assert [r["val_acc"] for r in logged] == [r["val_acc"] for r in local]
    info = run_info(files[0])
    # One setting, one group; the pipeline is the job type; tags and name tell runs apart.
    assert info.run_group == "wbtest/resnet20-digits-l1-r0.7" and info.job_type == "iterative"
    assert info.display_name == "iterative-l1-r0.7-s0"
    assert set(info.tags) == {
        "iterative", "resnet20", "digits", "l1", "ratio=0.7", "seed=0", "experiment:wbtest"
    }  # fmt: skip
    # The fine-tunes' epochs on their own axis, and the steps as a table.
    rows = history(files[0])
    epochs = [r["train/epoch"] for r in rows if "train/epoch" in r]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= len(local)
    assert [row[0] for row in table(files[0], "steps_table")["data"]] == [r["step"] for r in local]
    summary_keys = set(summary(files[0]))
    assert {
        "acc_final_val",
        "acc_drop_val",
        "time_total_s",
        "finetunes",
        "macs_after",
        "macs_ratio",  # and the measured speed beside it (issue 19.5)
        "latency_b1_before_ms",  # the tests time batches of 1 and 8 (conftest)
        "latency_b8_after_ms",
        "inference_speedup_b8",
    } <= summary_keys


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_experiment_resnet56_cifar10_ice_on_the_jpeg_archive(tmp_path, cache_dir):
    """The ResNet-56 experiment end to end on the real CIFAR-10 JPEG archive: all 27 units
    pruned. A trigger nothing reaches keeps it to pruning and evaluation (ResNet-56 epochs
    are what a CPU cannot afford here; fine-tuning is tested on digits)."""
    args = [
        "+experiment=resnet56_cifar10_ice",
        "pipeline.thre=100",
        "pipeline.freeze=false",
        f"dataset.root={SHARED_CIFAR}",
        "dataset.train_subset=50",
        "dataset.test_subset=100",
        "dense.epochs=1",
        "trainer.batch_size=128",
        "trainer.num_workers=0",
        "trainer.device=cpu",
    ]
    result = run_icep(args, tmp_path / "r56", cache_dir, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "r56" / "summary.json").read_text())
    assert summary["model"] == "resnet56" and summary["dataset"] == "cifar10"
    assert summary["steps"] == 27 and summary["finetunes"] == 0
    rows = read_jsonl(tmp_path / "r56" / "metrics.jsonl")
    assert rows[-1]["ratio"] == 0.6
    assert 0.35 < rows[-1]["remaining"] < 0.5  # 3x3 convs: conv1 out and conv2 in shrink by ~0.6


def test_same_config_and_seed_give_the_same_metrics(digits_run, tmp_path, cache_dir):
    """Whether the dense model was trained in the run or came from the cache does not matter."""
    run_dir, _ = digits_run
    result = run_icep([*FAST, "pipeline=iterative"], tmp_path / "again", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    def untimed(path):
        return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in read_jsonl(path)]

    assert untimed(tmp_path / "again" / "metrics.jsonl") == untimed(run_dir / "metrics.jsonl")
