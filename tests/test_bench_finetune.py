"""experiments/bench_finetune.py: icep's fine-tune loop against the reference loop, at toy size
on the CPU (the measurement itself runs on a GPU; see experiments/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT, SHARED_CIFAR


def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_finetune", ROOT / "experiments" / "bench_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} not present")
def test_both_loops_train_the_same_images_and_the_table_says_how_they_compare(
    tmp_path, cache_dir, capsys
):
    args = ["--device", "cpu", "--depth", "8", "--train-subset", "300", "--batch-size", "64"]
    args += ["--warmup-batches", "1", "--variants", "plain,icep", "--out", str(tmp_path)]
    args += ["--data", str(SHARED_CIFAR), "--cache", str(cache_dir)]
    assert bench().main(args) == 0
    result = json.loads((tmp_path / "bench_finetune.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "icep"]
    plain, icep = rows["plain"], rows["icep"]
    assert plain["images"] == icep["images"] == 270  # the 90% of 300 that is train, each once
    assert icep["vs_plain"] == pytest.approx(icep["images_per_s"] / plain["images_per_s"])
    assert plain["vs_plain"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["share_of_matmul"] > 0 and row["floor_s"] > 0
    assert result["matmul_tflops"] > 0 and result["macs"] > 0
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| icep |" in printed
    assert "icep / plain = " in printed and "(goal >= 5x)" in printed
    assert (tmp_path / "bench_finetune.md").read_text() in printed


def test_unknown_variant_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench().main(["--variants", "plain,fastest"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(
        "unknown variant 'fastest'; choose from plain, icep, icep_fp32, icep_workers, icep_compile"
    )


def test_missing_archive_names_the_option(tmp_path, capsys):
    assert bench().main(["--data", str(tmp_path / "none.tar.gz"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --data PATH" in err and "Traceback" not in err
