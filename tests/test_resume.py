"""Resume after a kill: a run killed with SIGKILL (between steps, or while it writes its
checkpoint) and resumed with resume=true ends with the same metrics as a run never interrupted."""

from __future__ import annotations

import json
import random
import signal
import subprocess

import pytest
import torch
from conftest import (
    FAST,
    _icep_command,
    kill_after,
    read_jsonl,
    run_icep,
    start_icep,
    wait_for_steps,
)

# ICE with every component on and a low threshold, so steps differ in what they do.
ARGS = [*FAST, "pipeline=ice", "pipeline.thre=0.5", "dataset.train_subset=600"]


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("full") / "run"
    result = run_icep(ARGS, out, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "checkpoint.pt").exists()  # model.pt and summary.json replace it
    return out


def _assert_same_run(resumed, full) -> None:
    assert _without_timings(read_jsonl(resumed / "metrics.jsonl")) == _without_timings(
        read_jsonl(full / "metrics.jsonl")
    )
    a, b = (json.loads((d / "summary.json").read_text()) for d in (resumed, full))
    for key in ("acc_final_val", "acc_final_test", "params_after", "finetunes", "frozen_layers"):
        assert a[key] == b[key], key
    assert not (resumed / "checkpoint.pt").exists()
    assert not list(resumed.glob(".*.tmp"))  # no write a kill cut short stays behind


@pytest.mark.slow
def test_a_run_killed_between_steps_resumes_to_the_same_metrics(tmp_path, cache_dir, uninterrupted):
    kill_at = random.randint(2, 7)  # resnet20 has 9 steps
    out = tmp_path / "killed"
    kill_after(out, kill_at, start_icep(ARGS, out, cache_dir))
    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    # The kill may land between step kill_at's metrics row and its checkpoint.
    assert kill_at - 1 <= blob["steps"] < 9, f"killed at step {kill_at}"

    refused = run_icep(ARGS, out, cache_dir)  # without resume=true the folder is not touched
    assert refused.returncode == 2 and "resume=true continues it" in refused.stderr
    resumed = run_icep([*ARGS, "resume=true"], out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing {out} after step {blob['steps']}" in resumed.stdout
    _assert_same_run(out, uninterrupted)

    again = run_icep([*ARGS, "resume=true"], out, cache_dir)
    assert again.returncode == 0 and "holds a completed run" in again.stdout


@pytest.mark.slow
def test_a_run_killed_while_writing_its_checkpoint_resumes_from_the_one_before(
    tmp_path, cache_dir, uninterrupted
):
    out = tmp_path / "killed"
    result = run_icep(ARGS, out, cache_dir, kill_in_checkpoint=4)  # step 4's file, not renamed
    assert result.returncode < 0  # SIGKILL
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the interrupted write
    assert torch.load(out / "checkpoint.pt", weights_only=True)["steps"] == 3
    assert len(read_jsonl(out / "metrics.jsonl")) == 4  # step 4 was logged, not checkpointed

    resumed = run_icep([*ARGS, "resume=true"], out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, uninterrupted)


@pytest.mark.slow  # a killed run and two resumes: 60 s
def test_a_resume_with_another_config_is_refused_and_a_key_added_since_is_not_a_change(
    tmp_path, cache_dir
):
    """Another ratio is refused, leaving the checkpoint and the run's .hydra/ files as they were.
    A run checkpointed by an earlier icep, whose config lacked keys added since (here
    dense.nesterov), resumes at their defaults; setting such a key on the command line is a
    change of config and is refused."""
    out = tmp_path / "run"
    args = [*FAST, "pipeline=iterative"]
    killed = run_icep(args, out, cache_dir, kill_in_checkpoint=2)
    assert killed.returncode < 0
    before = (out / "checkpoint.pt").read_bytes()  # step 1's
    hydra_files = {f.name: f.read_bytes() for f in (out / ".hydra").glob("*.yaml")}
    result = run_icep([*args, "pipeline.ratio=0.7", "resume=true"], out, cache_dir)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("icep: error: resume: ") and "\n" not in line
    assert "pipeline.ratio=0.6 there, 0.7 now" in line
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    # Hydra rewrote .hydra/ with the refused config before icep ran; icep put the run's back.
    assert {f.name: f.read_bytes() for f in (out / ".hydra").glob("*.yaml")} == hydra_files

    blob = torch.load(out / "checkpoint.pt", weights_only=True)
    del blob["config"]["dense.nesterov"]  # as an icep before that key wrote it
    torch.save(blob, out / "checkpoint.pt")
    refused = run_icep([*args, "dense.nesterov=true", "resume=true"], out, cache_dir)
    assert refused.returncode == 2 and "dense.nesterov=None there, True now" in refused.stderr
    resumed = run_icep([*args, "resume=true"], out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(read_jsonl(out / "metrics.jsonl")) == 9
    assert (
        "keys new since the checkpoint, at their defaults: dense.nesterov"
        in (out / "icep.log").read_text()
    )


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_stop_with_one_line_and_resume(
    signum, tmp_path, cache_dir, uninterrupted
):
    """SIGTERM (a scheduler's warning) and SIGINT (Ctrl-C) stop the run: one line, exit 128 +
    the signal, "interrupted" in summary.json and a checkpoint that resume=true continues."""
    out = tmp_path / "stopped"
    command, env = _icep_command(ARGS, out, cache_dir, None, None, False)
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_steps(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.strip().count("\n") == 0, err  # one line, no traceback
    assert err.startswith(f"icep: interrupted by {name} after ")
    assert f"resume=true hydra.run.dir={out} continues" in err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["reason"]) == ("interrupted", name)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["steps"] == summary["steps"] >= 2
    assert not list(out.glob(".*.tmp"))

    resumed = run_icep([*ARGS, "resume=true"], out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(out, uninterrupted)


def test_a_folder_holding_only_a_killed_search_is_never_reused_by_another_config(tmp_path):
    """A tuning search killed before its first pruning step leaves tune.db and no checkpoint:
    a new start there is refused, and resume=true only with the same config."""
    from omegaconf import OmegaConf

    from icep.errors import IcepError
    from icep.resume import resume_from, save_run_config

    out = tmp_path / "run"
    out.mkdir()
    save_run_config(out, {"pipeline.ratio": 0.5, "seed": 0})
    (out / "tune.db").write_bytes(b"")
    (out / ".tune.db.123.tmp").write_bytes(b"half a write")
    fresh, again = OmegaConf.create({"resume": False}), OmegaConf.create({"resume": True})
    with pytest.raises(IcepError, match=r"already holds a run \(tune.db\); resume=true"):
        resume_from(fresh, out, {"pipeline.ratio": 0.6, "seed": 0})
    with pytest.raises(IcepError, match=r"another config \(pipeline.ratio=0.5 there, 0.6 now"):
        resume_from(again, out, {"pipeline.ratio": 0.6, "seed": 0})
    assert resume_from(again, out, {"pipeline.ratio": 0.5, "seed": 0}) is None  # the same: go on
    assert not list(out.glob(".*.tmp"))
