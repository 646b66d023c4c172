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
            "baseline,ice",
            *FAST,
            "dataset.train_subset=600",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {r["variant"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert set(rows) == {"baseline", "ice"}
    base, ice = rows["baseline"], rows["ice"]
    assert float(base["speedup"]) == pytest.approx(1.0)
    assert float(ice["speedup"]) == pytest.approx(
        float(base["time_total_s"]) / float(ice["time_total_s"])
    )
    assert float(ice["cost_s"]) == pytest.approx(float(ice["time_total_s"]))  # no search
    assert int(base["finetunes"]) == 9
    assert int(ice["finetunes"]) <= 9
    assert base["params_after"] == ice["params_after"]  # the same pruning, different cost
    assert float(base["drop_test"]) == pytest.approx(
        float(base["acc_original_test"]) - float(base["acc_final_test"])
    )
    table = (out / "comparison.md").read_text()
    assert "| baseline |" in table and "| ice |" in table
    for name in rows:
        assert (out / name / "summary.json").exists()


def test_a_tuned_run_pays_for_its_search():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_pipelines", ROOT / "experiments" / "compare_pipelines.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = {"acc_original_val": 90, "acc_final_val": 89, "acc_original_test": 90}
    rows = module.table(
        [
            {"variant": "baseline", "time_total_s": 100.0, "acc_final_test": 89, **accuracy},
            {"variant": "ice", "time_total_s": 20.0, "acc_final_test": 88, **accuracy},
            {
                "variant": "ice_tuned",
                "time_total_s": 10.0,
                "time_search_s": 40.0,
                "time_total_with_search_s": 50.0,
                "acc_final_test": 88,
                **accuracy,
            },
        ]
    )
    speedup = {r["variant"]: r["speedup"] for r in rows}
    assert speedup == {"baseline": 1.0, "ice": 5.0, "ice_tuned": 2.0}  # 100 / (40 + 10)
