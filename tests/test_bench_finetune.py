"""experiments/bench_finetune.py: icep's fine-tune loop against the reference loop, at toy size
on the CPU (the measurement itself runs on a GPU; see experiments/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_CIFAR

SCRIPT = ROOT / "experiments" / "bench_finetune.py"


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The error a bad input gives: exit code 2, one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} not present")
def test_both_loops_train_the_same_images_and_the_table_compares_them(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = bench(
        *("--data", str(SHARED_CIFAR), "--cache", str(cache_dir), "--device", "cpu"),
        *("--model", "resnet8", "--train-subset", "256", "--batch-size", "64"),
        *("--warmup-batches", "1", "--threads", "1", "--variants", "plain,icep"),
        *("--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench_finetune.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "icep"]
    plain, icep = rows["plain"], rows["icep"]
    assert report["train_images"] == 230  # 256 less the 10% validation split
    assert plain["images"] == icep["images"] == 230  # the same train images, each once
    for row in rows.values():
        assert row["images_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["tflops"] > 0 and row["share_of_limit"] > 0
    assert icep["vs_plain"] == pytest.approx(icep["images_per_s"] / plain["images_per_s"])
    assert report["icep_over_plain"] == pytest.approx(icep["vs_plain"])
    assert report["macs"] > 0 and report["limit"]["flops"] > 0 and report["floor_s"] > 0

    printed = result.stdout
    assert "[bench_finetune] plain: epoch 1/1" in printed  # progress while it runs
    table = (out / "bench_finetune.md").read_text()
    assert printed.endswith(
        table + f"[bench_finetune] wrote {out / 'bench_finetune.md'} and bench_finetune.json\n"
    )
    assert "| plain |" in table and "| icep |" in table
    verdict = "met" if icep["vs_plain"] >= 5 else "not met"
    assert f"icep / plain = {icep['vs_plain']:.2f}x (goal >= 5x): {verdict}" in table


def test_unknown_variant_is_one_line(tmp_path):
    line = one_line_error(bench("--variants", "plain,fastest"))
    assert line.endswith(
        "--variants: unknown variant 'fastest'; "
        "choose from plain, icep, icep_fp32, icep_workers, icep_compile"
    )


def test_missing_archive_names_the_option(tmp_path):
    line = one_line_error(bench("--data", str(tmp_path / "none.tar.gz")))
    assert "no CIFAR-10 archive at" in line and "pass --data PATH" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_asked_for_but_absent_names_the_fix(tmp_path, capsys):
    # In this process (torch is imported already): the device is checked before anything else
    # happens, so the archive is never read.
    from icep.bench import finetune as module

    archive = tmp_path / "cifar10-jpeg.tar.gz"
    archive.touch()
    assert module.main(["--data", str(archive), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bench_finetune: --device:") and "use auto or cpu" in err
