"""python -m icep.report: the comparison report of run folders (rows, speed-ups against the right
baseline, aggregates, plots, runs that failed or did not finish, one-line errors)."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAST, ROOT, icep_env
from PIL import Image

from icep import report, report_plots
from icep.report_plots import Spread, mean_over_seeds, pareto_front, speedups_over_seeds

PNGS = [
    "accuracy_vs_macs.png",
    "accuracy_vs_params.png",
    "speedup.png",
    "accuracy_vs_step.png",
    "time_vs_step.png",
    "accuracy_vs_time.png",
    "time_per_phase.png",
]
# Tiny jobs, as in test_sweeper.py (the dense model is shared through the session's cache).
JOB = [*FAST, "dataset.train_subset=300", "dataset.test_subset=100", "pipeline.ratio=0.5"]


def python_m(module: str, *args: str, cache: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=icep_env(cache, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def check_pngs(folder: Path, names: list[str] = PNGS) -> None:
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()  # raises on a damaged file
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.size[0] > 0 and image.size[1] > 0


def report_plots_listed(md: str) -> list[str]:
    """The PNG files report.md shows."""
    return re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", md)


def embedded_images(page: str, folder: Path) -> int:
    """How many images report.html holds; fails on any reference to a file (a page mailed alone
    would lose it), and on an image that is not the PNG written beside the page."""
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert sources and "url(" not in page
    pngs = {(folder / name).read_bytes() for name in os.listdir(folder) if name.endswith(".png")}
    for source in sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), source[:80]
        assert base64.b64decode(source[len(prefix) :]) in pngs
    return len(sources)


# --- one real multirun: iterative and ICE on digits ----------------------------------------


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, cache_dir) -> Path:
    sweep = tmp_path_factory.mktemp("report") / "multirun"
    result = python_m(
        "icep",
        "-m",
        "pipeline=iterative,ice",
        f"hydra.sweep.dir={sweep}",
        *JOB,
        cache=cache_dir,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return sweep


def test_report_of_a_multirun_of_two_pipelines(multirun):
    result = python_m("icep.report", str(multirun))
    assert result.returncode == 0, result.stderr
    assert str(multirun) in result.stdout  # says where the files went (default: the folder)
    rows = {r["pipeline"]: r for r in read_csv(multirun / "report.csv")}
    assert set(rows) == {"iterative", "ice"}
    summaries = {
        json.loads((multirun / job / "summary.json").read_text())["pipeline"]: job
        for job in ("0", "1")
    }
    for pipeline, row in rows.items():
        assert row["run"] == summaries[pipeline]
        assert row["status"] == "completed"
        assert (row["model"], row["dataset"], row["criterion"]) == ("resnet20", "digits", "l1")
        assert float(row["ratio"]) == 0.5 and row["seed"] == "0"
        summary = json.loads((multirun / row["run"] / "summary.json").read_text())
        assert float(row["time_total_s"]) == pytest.approx(summary["time_total_s"])
        assert float(row["acc_final_test"]) == pytest.approx(summary["acc_final_test"])
        assert int(row["finetunes"]) == summary["finetunes"]
        assert int(row["params_after"]) == summary["params_after"]
        for key in ("latency_b1_after_ms", "inference_speedup_b1"):  # the tests time b1, b8
            assert float(row[key]) == pytest.approx(summary[key])
    base, ice = rows["iterative"], rows["ice"]
    assert float(base["speedup"]) == 1.0
    assert float(ice["speedup"]) == pytest.approx(
        float(base["time_total_s"]) / float(ice["time_total_s"])
    )
    check_pngs(multirun)
    md = (multirun / "report.md").read_text()
    assert "| iterative | resnet20 | digits | l1 | 0.5 | 0 | completed |" in md
    assert "## Mean ± std over seeds" in md
    assert "| measured speed-up b1 | b256 |" in md
    page = (multirun / "report.html").read_text()
    assert embedded_images(page, multirun) == len(report_plots_listed(md))
    assert "<table>" in page


# --- hand-written run folders ----------------------------------------------------------------


def make_run(
    folder: Path,
    pipeline: str = "iterative",
    ratio: float = 0.5,
    seed: int = 0,
    time_s: float | None = 10.0,
    flops: int | None = None,
    status: str | None = "completed",
    steps: int = 3,
    checkpoint: bool = False,
    ratio_key: str = "ratio",
    reason: str | None = None,
) -> Path:
    """A run folder as icep writes it; ``status=None``: no summary.json (killed or running)."""
    (folder / ".hydra").mkdir(parents=True)
    config = {
        "pipeline": {"name": pipeline, ratio_key: ratio},
        "model": {"name": "resnet20"},
        "dataset": {"name": "digits"},
        "criterion": {"name": "l1"},
        "seed": seed,
    }
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = [f"pipeline={pipeline}", f"pipeline.{ratio_key}={ratio}", f"seed={seed}"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = [
        {
            "step": i,
            "unit": f"layer{i}",
            "params": 1000 - 100 * i,
            "macs": 5000 - 500 * i,
            "remaining": 1 - 0.1 * i,
            "val_acc": 90.0 - i,
            "finetuned": i % 2 == 1,
            "t_total": (time_s or 1.0) * i / steps,
        }
        for i in range(1, steps + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"not read by the report")
    if status is not None:
        summary = {"status": status, "pipeline": pipeline, "seed": seed, "ratio": ratio}
        if status == "completed":
            summary.update(
                decision_split="val",
                acc_original_val=91.0,
                acc_final_val=90.0 - steps,
                acc_original_test=92.0,
                acc_final_test=89.0 - steps,
                acc_drop_val=1.0 + steps,
                acc_drop_test=3.0 + steps,
                params_before=1000,
                params_after=1000 - 100 * steps,
                macs_before=5000,
                macs_after=5000 - 500 * steps,
                steps=steps,
                finetunes=2,
                time_total_s=time_s,
                time_prune_s=0.1 * time_s,
                time_finetune_s=0.8 * time_s,
                time_eval_s=0.1 * time_s,
                time_freeze_analysis_s=0.0,
                **({"flops_total": flops} if flops is not None else {}),
            )
        else:
            summary["reason"] = reason or "something went wrong; fix it"
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def report_rows(tmp_path: Path, *args: str) -> dict[str, dict]:
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *args]) == 0
    return {r["run"]: r for r in read_csv(tmp_path / "out" / "report.csv")}


def test_the_baseline_is_the_run_of_the_same_setting(tmp_path, capsys):
    runs = tmp_path / "runs"
    for ratio, base_time in ((0.5, 10.0), (0.7, 30.0)):
        for seed in (0, 1):
            t = base_time + seed  # each ratio and seed its own baseline time
            make_run(runs / f"it-{ratio}-{seed}", "iterative", ratio, seed, time_s=t)
            make_run(runs / f"ice-{ratio}-{seed}", "ice", ratio, seed, time_s=2.0)
    make_run(runs / "ice-0.7-2", "ice", 0.7, 2, time_s=4.0)  # no iterative run of seed 2
    make_run(runs / "ice-0.9-0", "ice", 0.9, 0, time_s=4.0)  # no iterative run of ratio 0.9
    rows = report_rows(tmp_path)
    speedup = {name: row["speedup"] for name, row in rows.items()}
    assert speedup == {
        "it-0.5-0": "1.0",
        "it-0.5-1": "1.0",
        "it-0.7-0": "1.0",
        "it-0.7-1": "1.0",
        "ice-0.5-0": str(10.0 / 2.0),
        "ice-0.5-1": str(11.0 / 2.0),
        "ice-0.7-0": str(30.0 / 2.0),
        "ice-0.7-1": str(31.0 / 2.0),
        "ice-0.7-2": str(30.5 / 4.0),  # the mean over the baseline's seeds, and says so
        "ice-0.9-0": "",
    }
    assert rows["ice-0.7-2"]["speedup_basis"] == "seed mean"
    assert rows["ice-0.7-1"]["speedup_basis"] == "seed"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "7.62x *" in md and "no `iterative` run with this seed" in md
    assert "no completed `iterative` run of that setting" in md
    assert "read 10 runs: 10 completed" in capsys.readouterr().out


def test_another_baseline_pipeline(tmp_path):
    make_run(tmp_path / "runs" / "a", "iterative", time_s=10.0)
    make_run(tmp_path / "runs" / "b", "ice", time_s=5.0)
    rows = report_rows(tmp_path, "--baseline", "ice")
    assert (rows["a"]["speedup"], rows["b"]["speedup"]) == ("0.5", "1.0")
    rows = report_rows(tmp_path, "--baseline", "nosuch")
    assert rows["a"]["speedup"] == rows["b"]["speedup"] == ""


def test_mean_and_std_over_seeds(tmp_path):
    for seed, t in enumerate((10.0, 20.0, 30.0)):
        make_run(tmp_path / "runs" / f"it{seed}", "iterative", seed=seed, time_s=t)
        make_run(tmp_path / "runs" / f"ice{seed}", "ice", seed=seed, time_s=t / 2)
    make_run(tmp_path / "runs" / "ice-killed", "ice", seed=3, status=None, checkpoint=True)
    report_rows(tmp_path)
    groups = {g["pipeline"]: g for g in read_csv(tmp_path / "out" / "report_aggregate.csv")}
    assert set(groups) == {"iterative", "ice"}
    assert float(groups["iterative"]["time_total_s_mean"]) == pytest.approx(20.0)
    assert float(groups["iterative"]["time_total_s_std"]) == pytest.approx(10.0)
    assert float(groups["ice"]["speedup_mean"]) == pytest.approx(2.0)
    assert groups["ice"]["seeds"] == "0 1 2"
    assert (groups["ice"]["completed"], groups["ice"]["runs"]) == ("3", "4")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| resnet20 | digits | l1 | iterative | 0.5 | 3 / 3 | 0 1 2 |" in md
    assert "20.00 ± 10.00" in md


def test_failed_incomplete_and_unreadable_runs_are_listed(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs / "done", "iterative", time_s=10.0)
    make_run(runs / "killed", "ice", status=None, steps=3, checkpoint=True)
    make_run(runs / "starting", "ice", seed=1, status=None, steps=0)
    make_run(
        runs / "failed", "ice", seed=2, status="failed", reason="the loss became nan; lower lr"
    )
    make_run(runs / "pruned", "ice", seed=3, status="pruned", reason="pruned at step 2")
    (runs / "broken" / ".hydra").mkdir(parents=True)
    (runs / "broken" / ".hydra" / "config.yaml").write_text("pipeline: [unclosed\n")
    make_run(runs / "bad-summary", "ice", seed=4)
    (runs / "bad-summary" / "summary.json").write_text('{"status": "compl')
    (runs / "no-config").mkdir()
    (runs / "no-config" / "summary.json").write_text('{"status": "completed"}')
    rows = report_rows(tmp_path)
    captured = capsys.readouterr()
    status = {name: row["status"] for name, row in rows.items()}
    assert status == {
        "done": "completed",
        "killed": "incomplete",
        "starting": "incomplete",
        "failed": "failed",
        "pruned": "pruned",
        "broken": "unreadable",
        "bad-summary": "unreadable",
        "no-config": "unreadable",
    }
    killed = rows["killed"]
    assert killed["steps"] == "3" and "3 steps done" in killed["reason"]
    assert float(killed["time_total_s"]) == pytest.approx(10.0)  # the time so far
    assert killed["params_after"] == "700" and killed["speedup"] == ""
    assert "no steps yet" in rows["starting"]["reason"]
    assert rows["failed"]["reason"].startswith("the loss became nan; lower lr")
    assert "pruned at step 2" in rows["pruned"]["reason"]
    assert "summary.json is not valid JSON" in rows["bad-summary"]["reason"]
    assert "no .hydra/config.yaml" in rows["no-config"]["reason"]
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 3 and all("unreadable" in line for line in warnings)
    md = (tmp_path / "out" / "report.md").read_text()
    problems = md.split("## Failed, pruned, incomplete and unreadable runs")[1]
    for name in ("killed", "starting", "failed", "pruned", "broken", "bad-summary", "no-config"):
        assert f"| {name} |" in problems
    assert "the loss became nan; lower lr" in problems
    # No completed run but the baseline's: no speed-up to draw.
    assert sorted(report_plots_listed(md)) == sorted(set(PNGS) - {"speedup.png"})
    check_pngs(tmp_path / "out", report_plots_listed(md))


def test_run_folders_are_found_where_they_are(tmp_path):
    runs = tmp_path / "runs"
    tuned = make_run(runs / "sweep" / "0", "ice", time_s=3.0)
    make_run(tuned / "trials" / "0000", "ice", time_s=1.0)  # part of the run: not a row
    make_run(runs / "other" / "deep" / "run", "iterative", time_s=6.0)
    (runs / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    (runs / "sweep" / ".hydra").mkdir()  # a multirun root's own .hydra: not a run
    (runs / "sweep" / ".hydra" / "config.yaml").write_text("hydra: {}\n")
    found = report.find_run_folders([runs])
    assert [p.relative_to(runs.resolve()).as_posix() for p in found] == [
        "other/deep/run",
        "sweep/0",
    ]
    trial = report.find_run_folders([tuned / "trials" / "0000"])  # given directly: counts
    assert trial == [(tuned / "trials" / "0000").resolve()]


def test_a_folder_that_cannot_be_listed_is_unreadable(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "locked").mkdir()
    scandir = os.scandir

    def refuse(path="."):  # chmod does not stop root, so refuse the listing here
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    rows = report_rows(tmp_path)
    assert rows["locked"]["status"] == "unreadable"
    assert "Permission denied" in rows["locked"]["reason"]
    assert rows["a"]["status"] == "completed"
    assert "locked" in capsys.readouterr().err


def test_a_target_instead_of_a_ratio(tmp_path):
    make_run(tmp_path / "runs" / "a", "iterative", ratio=0.7, time_s=8.0)
    make_run(tmp_path / "runs" / "b", "global", ratio=0.7, ratio_key="target", time_s=4.0)
    rows = report_rows(tmp_path)
    assert rows["b"]["ratio"] == "0.7" and rows["b"]["speedup"] == "2.0"


def test_no_html_and_default_out(tmp_path, monkeypatch):
    make_run(tmp_path / "a", "iterative")
    make_run(tmp_path / "b", "ice")
    monkeypatch.chdir(tmp_path)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--no-html"]) == 0
    assert (tmp_path / "report.csv").is_file() and not (tmp_path / "report.html").exists()
    assert len(read_csv(tmp_path / "report.csv")) == 2


# --- bad input: one line, exit code 2 ----------------------------------------------------------


def test_a_missing_path_is_one_line_and_exit_2(tmp_path):
    result = python_m("icep.report", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("icep.report: error: ") and "nowhere does not exist" in line


@pytest.mark.parametrize("case", ["no runs", "out is a file", "no path", "bad option"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    make_run(tmp_path / "runs" / "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("in the way")
    argv, says = {
        "no runs": ([str(tmp_path / "empty")], "no run folders under"),
        "out is a file": ([str(tmp_path / "runs"), "--out", str(tmp_path / "file")], "--out DIR"),
        "no path": ([], "PATH"),
        "bad option": ([str(tmp_path / "runs"), "--nosuch"], "--nosuch"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("icep.report: error: ") and says in line


def test_a_tuned_run_pays_for_its_search(tmp_path):
    """METHOD.md 3.4: a tuned run's total includes its search, so its speed-up does too."""
    runs = tmp_path / "runs"
    make_run(runs / "it", "iterative", 0.6, 0, time_s=30.0)
    tuned = make_run(runs / "ice", "ice", 0.6, 0, time_s=3.0)
    summary = json.loads((tuned / "summary.json").read_text())
    summary.update(time_search_s=7.0, time_final_s=3.0, time_total_with_search_s=10.0)
    (tuned / "summary.json").write_text(json.dumps(summary))
    rows = report_rows(tmp_path)
    assert float(rows["ice"]["speedup"]) == pytest.approx(3.0)  # 30 / (3 + 7), not 30 / 3


def test_compute_speedup_beside_the_time_speedup(tmp_path):
    """The compute speed-up compares counted FLOPs, so a baseline slowed by a busy machine still
    gives the ratio of the work done."""
    runs = tmp_path / "runs"
    make_run(runs / "it", "iterative", 0.6, 0, time_s=90.0, flops=28 * 10**15)
    make_run(runs / "ice", "ice", 0.6, 0, time_s=10.0, flops=7 * 10**15)
    make_run(runs / "ice-s1", "ice", 0.6, 1, time_s=10.0, flops=4 * 10**15)
    make_run(runs / "old", "ice", 0.7, 0, time_s=10.0)  # written before the counts existed
    rows = report_rows(tmp_path)
    assert float(rows["ice"]["speedup"]) == pytest.approx(9.0)
    assert float(rows["ice"]["compute_speedup"]) == pytest.approx(4.0)
    assert rows["ice"]["compute_speedup_basis"] == "seed"
    assert float(rows["ice-s1"]["compute_speedup"]) == pytest.approx(7.0)
    assert rows["ice-s1"]["compute_speedup_basis"] == "seed mean"
    assert rows["old"]["compute_speedup"] == rows["old"]["flops_total"] == ""
    md = (tmp_path / "out" / "report.md").read_text()
    assert "compute speed-up" in md and "4.00x" in md and "7.00x *" in md and "28 PFLOP" in md
    groups = {
        (g["pipeline"], g["ratio"]): g for g in read_csv(tmp_path / "out" / "report_aggregate.csv")
    }
    assert float(groups["ice", "0.6"]["compute_speedup_mean"]) == pytest.approx(5.5)
    assert groups["ice", "0.7"]["compute_speedup_mean"] == ""


def test_a_tuned_run_pays_for_its_search_in_compute_too(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs / "it", "iterative", 0.6, 0, time_s=30.0, flops=3000)
    tuned = make_run(runs / "ice", "ice", 0.6, 0, time_s=3.0, flops=300)
    summary = json.loads((tuned / "summary.json").read_text())
    summary.update(flops_search=700, flops_total_with_search=1000)
    (tuned / "summary.json").write_text(json.dumps(summary))
    assert float(report_rows(tmp_path)["ice"]["compute_speedup"]) == pytest.approx(3.0)


def test_a_schedule_run_of_iterative_is_not_the_baseline(tmp_path):
    """pipeline=iterative with schedule=geometric is its own row label, so it neither serves as
    nor hides the block-wise baseline of its setting."""
    runs = tmp_path / "runs"
    make_run(runs / "it", "iterative", 0.6, 0, time_s=30.0)
    geometric = make_run(runs / "geo", "iterative", 0.6, 0, time_s=10.0)
    config_file = geometric / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["pipeline"].update(schedule="geometric", target=0.6)
    config_file.write_text(yaml.safe_dump(config))
    rows = report_rows(tmp_path)
    assert rows["geo"]["pipeline"] == "iterative_geometric"
    assert float(rows["geo"]["speedup"]) == pytest.approx(3.0)
    assert float(rows["it"]["speedup"]) == 1.0


# --- the plots: accuracy vs size with Pareto fronts, speed-up bars, seeds, one HTML file -------


def two_pipelines_two_seeds(runs: Path) -> None:
    for seed in (0, 1):
        make_run(runs / f"it{seed}", "iterative", seed=seed, time_s=10.0 + seed, flops=4000)
        make_run(runs / f"ice{seed}", "ice", seed=seed, time_s=4.0 + seed, flops=1000 + seed)


def test_the_page_holds_its_plots_with_captions(tmp_path):
    """report.html can be mailed alone: every image is in the page, none is a file link."""
    two_pipelines_two_seeds(tmp_path / "runs")
    report_rows(tmp_path)
    out = tmp_path / "out"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert report_plots_listed(md) == PNGS  # the accuracy vs size plots first
    check_pngs(out)
    assert embedded_images(page, out) == len(PNGS)
    assert page.count("<figcaption>") == len(PNGS)
    # Each plot is said in words in both files: what it shows and how seeds are drawn.
    for text in (md, page):
        assert "Pareto front" in text and "±1 std over seeds" in text
        assert "lowest to highest seed" in text
        assert "val accuracy after each pruning step" in text


def test_accuracy_vs_size_plots_need_the_unpruned_size(tmp_path):
    """A run killed before its summary has no unpruned size of its own; a finished run of the
    same model gives it, and without one there is no share to plot."""
    make_run(tmp_path / "runs" / "killed", "ice", status=None)
    report_rows(tmp_path)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy_vs_macs.png" not in md and "accuracy_vs_step.png" in md
    make_run(tmp_path / "runs" / "done", "iterative")
    report_rows(tmp_path)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "accuracy_vs_macs.png" in md and "accuracy_vs_params.png" in md


def test_pareto_front():
    points = [(50, 80.0), (60, 85.0), (55, 79.0), (70, 84.0), (40, 70.0), (60, 85.0), (90, 91.0)]
    # (55, 79) has more MACs than (50, 80) and less accuracy; (70, 84) loses to (60, 85).
    assert pareto_front(points) == [(40, 70.0), (50, 80.0), (60, 85.0), (90, 91.0)]
    assert pareto_front([(60, 85.0), (60, 80.0)]) == [(60, 85.0)]  # equal size: the better
    assert pareto_front([(50, 80.0), (60, 80.0)]) == [(50, 80.0)]  # equal accuracy: the smaller
    assert pareto_front([]) == []


def test_mean_and_band_over_seeds_are_joined_by_step():
    seed0 = {0: (100.0, 91.0), 1: (90.0, 80.0), 2: (80.0, 70.0)}
    seed1 = {0: (100.0, 91.0), 1: (94.0, 84.0)}  # stopped after one step
    points = mean_over_seeds([seed0, seed1])
    assert [p.step for p in points] == [0, 1, 2]
    step1 = points[1]
    assert step1.x == pytest.approx(92.0)
    assert (step1.y.mean, step1.y.low, step1.y.high) == pytest.approx((82.0, 80.0, 84.0))
    assert step1.y.std == pytest.approx(8**0.5)
    assert points[2].y.values == (70.0,) and points[2].y.std is None


def test_speedup_bars_are_the_mean_and_std_over_seeds(tmp_path):
    two_pipelines_two_seeds(tmp_path / "runs")
    runs = [report.read_run(p) for p in report.find_run_folders([tmp_path / "runs"])]
    report.attach_speedups(runs, "iterative")
    key = ("resnet20", "digits", "l1", 0.5)
    time = speedups_over_seeds(runs, "speedup")
    assert time[(*key, "ice")] == Spread((10.0 / 4.0, 11.0 / 5.0))
    assert time[(*key, "ice")].mean == pytest.approx((2.5 + 2.2) / 2)
    assert time[(*key, "ice")].std == pytest.approx(0.3 / 2**0.5)
    assert time[(*key, "iterative")].values == (1.0, 1.0)
    compute = speedups_over_seeds(runs, "compute_speedup")
    assert compute[(*key, "ice")].values == pytest.approx((4.0, 4000 / 1001))
    # The bars are the numbers of the report's mean ± std table.
    groups = {g["pipeline"]: g for g in report.aggregate(runs, [_record(r) for r in runs])}
    assert groups["ice"]["speedup_mean"] == pytest.approx(time[(*key, "ice")].mean)
    assert groups["ice"]["speedup_std"] == pytest.approx(time[(*key, "ice")].std)


def _record(run: report.Run) -> dict:
    return report.run_record(run, run.path.parent)


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_accuracy_axes_name_the_split(tmp_path, split):
    """Rows carry the accuracy of the split the run decided on (test_acc without a val split)."""
    from matplotlib.figure import Figure

    folder = make_run(tmp_path / "run")
    if split == "test":
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        for row in rows:
            row["test_acc"] = row.pop("val_acc")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = json.loads((folder / "summary.json").read_text())
        summary["decision_split"] = "test"
        (folder / "summary.json").write_text(json.dumps(summary))
    runs = [report.read_run(folder)]
    colors = report_plots._pipeline_colors(runs)
    for fig in (
        report_plots._per_step_figure(Figure, runs, colors, "accuracy"),
        report_plots._accuracy_vs_size(Figure, runs, colors, "macs"),
    ):
        (ax,) = [ax for ax in fig.axes if ax.get_visible()]
        assert ax.get_ylabel() == f"{split} accuracy (%)"
        # Step 0 is the unpruned model, on the same split (make_run: val 91%, test 92%).
        unpruned = ax.get_lines()[0].get_xydata()[0]
        assert unpruned[1] == {"val": 91.0, "test": 92.0}[split]


def test_the_page_opens_with_which_pipeline_at_which_cost(tmp_path):
    """The answer first: per setting, each pipeline's accuracy against the baseline's and what
    it cost, as means over the seeds (the tables below hold the same numbers)."""
    runs = tmp_path / "runs"
    two_pipelines_two_seeds(runs)
    for name, acc in (("it0", 88.0), ("it1", 86.0), ("ice0", 85.0), ("ice1", 84.0)):
        summary = json.loads((runs / name / "summary.json").read_text())
        summary["acc_final_test"] = acc
        (runs / name / "summary.json").write_text(json.dumps(summary))
    report_rows(tmp_path)
    md = (tmp_path / "out" / "report.md").read_text()
    lines = md.splitlines()
    at = lines.index("## Which pipeline, at which cost")
    assert at < lines.index("## Runs")
    # speed-ups per seed: 10/4 and 11/5 in time, 4000/1000 and 4000/1001 in compute
    assert lines[at + 2] == (
        "- **resnet20 / digits / l1 / ratio 0.5**: `iterative` 87.00% test in 10.5 s (4 KFLOP), "
        "2 seeds; `ice` 84.50% test (-2.50 points) at 2.35x less time and 4.00x less compute, "
        "2 seeds"
    )
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Which pipeline, at which cost</h2>" in page
    assert "<li><strong>resnet20 / digits / l1 / ratio 0.5</strong>: <code>iterative</code>" in page
