"""experiments/device/measure.py, the prepared GPU measurement: its --toy run does every stage
on the CPU, so the command works the first time it meets a GPU; a call that runs out of time
skips stages and says so; a later call goes on from what an earlier one returned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_CIFAR, icep_env

MEASURE = ROOT / "experiments" / "device" / "measure.py"
pytestmark = pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="no CIFAR-10 archive beside")


def measure(*args: str, cache, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(MEASURE), *args],
        cwd=ROOT,
        env=icep_env(cache, OMP_NUM_THREADS="1", ICEP_ARCHIVE=str(SHARED_CIFAR)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_toy_run_does_every_stage_and_a_later_call_goes_on_from_it(tmp_path, cache_dir):
    """One test, not two sharing a module fixture: pytest-xdist would run the toy measurement
    once on each worker."""
    out = tmp_path / "out"
    result = measure("--toy", "--out", str(out), cache=cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    results = json.loads((out / "measure.json").read_text())
    for stage in ("versions", "tests", "finetune", "dense", "compare"):
        assert results[stage]["status"] == "done", (stage, results[stage])
    assert results["versions"]["torch"] and results["versions"]["device"] == "cpu"
    assert results["tests"]["failed"] == results["tests"]["errors"] == 0
    assert results["tests"]["skipped"] > 0  # the cuda-marked tests, without a GPU
    assert results["finetune"]["images_per_s"]["plain"] > 0
    assert results["finetune"]["icep_over_plain"] > 0
    # the dense model comes back with what it is
    checkpoint = out / "checkpoints" / "resnet56_cifar10_dense.pt"
    record = json.loads(checkpoint.with_suffix(".json").read_text())
    assert checkpoint.is_file() and 0 <= record["acc_test"] <= 100
    assert record["recipe"].startswith("+experiment=resnet56_cifar10_fast")
    compare = results["compare"]
    rows = {r["variant"]: r for r in compare["rows"]}
    assert rows["baseline"]["finetunes"] == rows["baseline"]["steps"] == 3  # ResNet-8: 3 units
    assert rows["baseline"]["compute_speedup"] == 1.0
    ice, base = rows["ice"], rows["baseline"]
    assert ice["compute_speedup"] == pytest.approx(base["cost_flops"] / ice["cost_flops"])
    assert "accuracy_gap" in compare and "goal_speedup_met" in compare
    md = (out / "measure.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    assert "| cost (s) |" in header and "| compute |" in header and "| compute speed-up |" in header
    assert "| compare | done | ICE " in md

    # A later call goes on from what this one returned: neither pipeline runs again.
    earlier, out = out, tmp_path / "again"
    result = measure(
        "--toy",
        "--stages",
        "compare",
        "--resume-from",
        str(earlier),
        "--out",
        str(out),
        cache=cache_dir,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert result.stdout.count("finished in an earlier call") == 2
    before = json.loads((earlier / "measure.json").read_text())["compare"]["rows"]
    after = json.loads((out / "measure.json").read_text())["compare"]["rows"]
    assert after == before


def test_stages_that_do_not_fit_the_time_cap_are_skipped_and_said(tmp_path, cache_dir):
    result = measure(
        "--toy", "--time-cap", "30", "--out", str(tmp_path), cache=cache_dir, timeout=120
    )
    assert result.returncode == 1
    results = json.loads((tmp_path / "measure.json").read_text())
    # 30 s less the 15 s kept for the results: the comparison (20 s at least) never fits
    assert results["compare"]["status"] == "skipped"
    skipped = [
        s for s in results if isinstance(results[s], dict) and results[s]["status"] == "skipped"
    ]
    assert all("left of --time-cap 30" in results[s]["reason"] for s in skipped)
    assert "| compare | skipped | needs ~20s" in (tmp_path / "measure.md").read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--plan", "resnet9000"], "--plan 'resnet9000': choose one of"),
        (["--stages", "versions,warp"], "--stages: unknown"),
        (["--data", "/nonexistent.tar.gz"], "--data: no CIFAR-10 archive at"),
        (["--resume-from", "/nonexistent"], "--resume-from: /nonexistent is not a folder"),
        (["--time-cap", "soon"], "argument --time-cap: invalid float value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, says, tmp_path, cache_dir):
    result = measure("--toy", "--out", str(tmp_path / "o"), *args, cache=cache_dir, timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("measure.py: error: ") and says in line, line
