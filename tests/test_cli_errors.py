"""Bad config input ends as one line naming the key and what is allowed, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from conftest import run_icep

CASES = {
    "unknown group option": (["model=resnet57"], ["model=resnet57", "resnet56"]),
    "misspelled key": (["pipeline.ratoi=0.5"], ["pipeline.ratoi", "ratio"]),
    "ratio above 1": (["pipeline.ratio=1.5"], ["pipeline.ratio", "between 0 and 1"]),
    "ratio zero": (["pipeline.ratio=0"], ["pipeline.ratio", "between 0 and 1"]),
    "negative epochs": (["pipeline.finetune_epochs=-1"], ["pipeline.finetune_epochs", ">= 1"]),
    "negative dense epochs": (["dense.epochs=-3"], ["dense.epochs", ">= 1"]),
    "missing dataset folder": (
        ["dataset=image_folder", "dataset.root=/nonexistent/imagenet"],
        ["dataset.root", "/nonexistent/imagenet"],
    ),
    "missing checkpoint": (["model.checkpoint=/nonexistent/model.pt"], ["model.checkpoint"]),
    "unknown device": (["trainer.device=tpu"], ["trainer.device", "cpu"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, cache_dir):
    args, must_say = CASES[case]
    result = run_icep(args, tmp_path / "run", cache_dir)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icep: error: ")
    for text in must_say:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
