"""experiments/compare_pipelines.py and bench_pipelines.py: baseline and ICE side by side, per
seed and over seeds, and the scaling table."""

from __future__ import annotations

import csv
import importlib
import subprocess
import sys

import pytest
from conftest import FAST, ROOT, icep_env


def load(name: str):
    """experiments/NAME.py's code, which lives in icep.bench (an installed icep has it)."""
    module = {"compare_pipelines": "compare", "bench_pipelines": "pipelines"}[name]
    return importlib.import_module(f"icep.bench.{module}")


@pytest.mark.slow
def test_bench_over_one_seed_on_digits(tmp_path, cache_dir):
    """experiments/bench_pipelines.py runs compare_pipelines' variants per seed and adds the
    aggregate table and the goal check."""
    out = tmp_path / "bench"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "bench_pipelines.py"),
            "--out",
            str(out),
            "--seeds",
            "0",
            "--variants",
            "baseline,ice",
            *FAST,
            "dataset.train_subset=600",
        ],
        cwd=ROOT,
        env=icep_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {r["variant"]: r for r in csv.DictReader((out / "bench_pipelines.csv").open())}
    assert set(rows) == {"baseline", "ice"}
    base, ice = rows["baseline"], rows["ice"]
    assert base["seed"] == ice["seed"] == "0"
    assert float(base["speedup"]) == pytest.approx(1.0)
    assert float(ice["speedup"]) == pytest.approx(float(base["cost_s"]) / float(ice["cost_s"]))
    assert float(ice["cost_s"]) == pytest.approx(float(ice["time_total_s"]))  # no search
    assert int(base["finetunes"]) == 9
    assert int(ice["finetunes"]) <= 9
    assert base["params_after"] == ice["params_after"]  # the same pruning, different cost
    assert float(base["drop_test"]) == pytest.approx(
        float(base["acc_original_test"]) - float(base["acc_final_test"])
    )
    table = (out / "bench_pipelines.md").read_text()
    dense = float(base["acc_original_test"])
    assert f"its test accuracy: seed 0: {dense:.2f}%" in table
    assert f"| ice | 1 | {float(ice['acc_final_test']):.2f} |" in table  # one seed: no spread
    assert f"- ice: speed-up {float(ice['speedup']):.2f}x (goal >= 9.6x: " in table
    assert "## Seed 0" in table and table in result.stdout
    for name in rows:
        assert (out / "seed0" / name / "summary.json").exists()


def fake_run(variant: str, cost: float, acc: float, search: float = 0.0) -> dict:
    row = {"variant": variant, "cost_s": cost, "acc_final_test": acc, "drop_test": 92 - acc}
    row.update(finetunes=9 if variant == "baseline" else 3)
    if search:
        row["time_search_s"] = search
    return row


def test_aggregate_takes_mean_and_spread_over_seeds_and_speedup_per_seed():
    bench = load("bench_pipelines")
    per_seed = {}
    for seed, (base_cost, ice_cost, acc) in enumerate([(100.0, 10.0, 90.0), (120.0, 20.0, 91.0)]):
        rows = [fake_run("baseline", base_cost, 91.0), fake_run("ice", ice_cost, acc)]
        for row in rows:  # as compare_pipelines.table sets it
            row["speedup"] = base_cost / row["cost_s"]
        per_seed[seed] = rows
    per_seed[2] = [
        {**fake_run("baseline", 90.0, 91.0), "speedup": 1.0},
        {"variant": "ice", "status": "failed"},
    ]
    summary = {r["variant"]: r for r in bench.aggregate(per_seed, ["baseline", "ice"])}
    ice = summary["ice"]
    assert (ice["seeds"], ice["failed"]) == (2, 1)
    assert ice["cost_s"] == pytest.approx(15.0) and ice["cost_s_std"] == pytest.approx(50**0.5)
    assert ice["speedup"] == pytest.approx((10.0 + 6.0) / 2)  # mean of 100/10 and 120/20
    assert ice["acc_final_test"] == pytest.approx(90.5)
    assert ice["time_search_s"] == 0.0  # no search: counted as none
    assert summary["baseline"]["seeds"] == 3 and summary["baseline"]["speedup"] == 1.0
    lines = bench.goal_lines(list(summary.values()))
    assert lines == [
        "- ice: speed-up 8.00x (goal >= 9.6x: not met), test accuracy -0.50 points against the "
        "baseline (goal within 1: met)"
    ]


def test_goals_met_when_fast_enough_and_close_enough():
    bench = load("bench_pipelines")
    summary = [
        {"variant": "baseline", "cost_s": 100.0, "acc_final_test": 91.0, "speedup": 1.0},
        {"variant": "ice", "cost_s": 9.0, "acc_final_test": 90.2, "speedup": 11.1},
        {"variant": "ice_tuned", "cost_s": 30.0, "acc_final_test": 89.5, "speedup": 3.3},
    ]
    ice, tuned = bench.goal_lines(summary)
    assert "goal >= 9.6x: met" in ice and "-0.80 points" in ice and "within 1: met" in ice
    assert "goal >= 9.6x: not met" in tuned and "within 1: not met" in tuned


@pytest.mark.parametrize(
    ("done", "elapsed", "budget", "left", "start"),
    [
        (0, 0.0, 60.0, 3, 3),  # nothing measured yet: start
        (1, 50.0, None, 2, 2),  # no budget: all
        (1, 50.0, 120.0, 2, 1),  # 70 s left, 50 s a seed: one more
        (1, 50.0, 90.0, 2, 0),  # 40 s left: none
        (2, 60.0, 1000.0, 1, 1),  # never more than are left
    ],
)
def test_budget_starts_only_the_seeds_that_fit(done, elapsed, budget, left, start):
    assert load("bench_pipelines").seeds_that_fit(done, elapsed, budget, left) == start


def test_scaling_row_relates_the_two_pipelines_of_one_model_and_ratio():
    bench = load("bench_pipelines")
    rows = [
        {**fake_run("baseline", 80.0, 91.0), "steps": 27},
        {**fake_run("ice", 16.0, 90.0), "steps": 27},
    ]
    row = bench.scaling_row("model", "resnet56", 0.6, rows)
    assert row["units"] == 27 and row["speedup"] == pytest.approx(5.0)
    assert (row["baseline_finetunes"], row["ice_finetunes"]) == (9, 3)
    failed = bench.scaling_row("ratio", "resnet56", 0.9, rows[:1])
    assert "speedup" not in failed and "| failed |" in bench.scaling_markdown([failed], [])


def test_scaling_table_puts_the_shared_point_on_both_axes(tmp_path, monkeypatch):
    bench = load("bench_pipelines")
    plots = []
    monkeypatch.setattr(bench, "plot_scaling", lambda rows, path: plots.append(path))

    def point(axis, model, ratio, base_cost, steps):
        runs = [
            {**fake_run(v, c, 90.0), "steps": steps, "cost_flops": c * 1e12 / 2}
            for v, c in [("baseline", base_cost), ("ice", 10.0)]
        ]
        runs[1]["compute_speedup"] = runs[0]["cost_flops"] / runs[1]["cost_flops"]
        return bench.scaling_row(axis, model, ratio, runs)

    rows = [
        point("model", "resnet110", 0.6, 200.0, 54),
        point("model", "resnet56", 0.6, 80.0, 27),
        point("ratio", "resnet56", 0.9, 70.0, 27),
        point("ratio", "resnet56", 0.3, 90.0, 27),
    ]
    table = bench.write_scaling(tmp_path, rows, "resnet56", ["x=1"])
    order = [(r["axis"], r["model"], r["ratio"]) for r in table]
    assert order == [
        ("model", "resnet56", 0.6),
        ("model", "resnet110", 0.6),
        ("ratio", "resnet56", 0.3),
        ("ratio", "resnet56", 0.6),  # the model axis' resnet56 point, also on the ratio axis
        ("ratio", "resnet56", 0.9),
    ]
    assert len(rows) == 4  # the caller's list is left as it was
    text = (tmp_path / "scaling.md").read_text()
    row = (
        "| ratio | resnet56 | 0.6 | 27 | 80.0 | 10.0 | 8.00x | 40 TFLOP | 5 TFLOP | 8.00x | 9 | 3 |"
    )
    assert row in text
    assert len(list(csv.DictReader((tmp_path / "scaling.csv").open()))) == 5
    assert plots == [tmp_path / "scaling.png"]


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    bench = load("bench_pipelines")
    for argv, message in [
        (["--seeds", "0,x"], "--seeds '0,x': expected comma-separated integers"),
        (["--variants", "ice"], "the baseline is missing"),
        (["--models", "resnet21"], "unknown model 'resnet21'; choose from"),
        (["--ratios", "0.3,1.2"], "ratio 1.2: a pruning ratio lies strictly between 0 and 1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            bench.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_a_tuned_run_pays_for_its_search():
    module = load("compare_pipelines")
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
