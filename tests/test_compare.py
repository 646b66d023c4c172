"""experiments/compare_pipelines.py: baseline and ICE side by side in one table."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT


@pytest.mark.slow
def test_comparison_table_on_digits(tmp_path, cache_dir):
    out = tmp_path / "cmp"
    env = {**os.environ, "ICEP_CACHE": str(cache_dir), "WANDB_SILENT": "true"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "compare_pipelines.py"),
            "--out",
            str(out),
            "--variants",
            "baseline,ice,ice_no_trigger",
            *FAST,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {r["variant"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"baseline", "ice", "ice_no_trigger"}
    base, ice, no_trigger = rows["baseline"], rows["ice"], rows["ice_no_trigger"]
    assert float(base["speedup"]) == pytest.approx(1.0)
    assert float(ice["speedup"]) == pytest.approx(
        float(base["time_total_s"]) / float(ice["time_total_s"])
    )
    assert int(base["finetunes"]) == int(no_trigger["finetunes"]) == 9
    assert int(ice["finetunes"]) <= 9
    assert base["params_after"] == ice["params_after"]  # the same pruning, different cost
    assert float(base["drop_test"]) == pytest.approx(
        float(base["acc_original_test"]) - float(base["acc_final_test"])
    )
    table = (out / "comparison.md").read_text()
    assert "| baseline |" in table and "| ice |" in table
    for name in rows:
        assert (out / name / "summary.json").exists()
