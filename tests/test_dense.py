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
