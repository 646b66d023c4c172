"""Multiruns through hydra-submitit-launcher: hydra/launcher=local runs each job in its own process
and requeues a signalled job, which resumes from its checkpoint; hydra/launcher=slurm writes the
sbatch options a user sets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, ROOT, icep_env, read_jsonl

JOB = [
    *FAST,
    "dataset.train_subset=300",
    "dataset.test_subset=100",
    "pipeline.ratio=0.5",
    "pipeline.finetune.epochs=1",
]


def _env(cache: Path, **extra: str) -> dict:
    return icep_env(cache, OMP_NUM_THREADS="1", **extra)


def _multirun(args: list[str], sweep_dir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "icep", "-m", f"hydra.sweep.dir={sweep_dir}", *JOB, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _job_processes(sweep_dir: Path) -> list[int]:
    """The submitit task processes running jobs of this sweep (found through /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "submitit.core._submit" in cmdline and str(sweep_dir) in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job processes through /proc")
def test_local_launcher_runs_each_job_and_a_signalled_job_resumes(tmp_path, cache_dir):
    """Two jobs in their own processes. Once one of them has checkpointed, both get SIGUSR2 (what
    Slurm sends before a time limit or a preemption): submitit requeues them, and a requeued job
    continues after its last completed step instead of refusing the folder or starting over."""
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(["hydra/launcher=local", "pipeline=iterative,ice"], sweep_dir, _env(cache_dir))
    deadline = time.monotonic() + 240
    while not any((sweep_dir / str(n) / "checkpoint.pt").is_file() for n in (0, 1)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no job checkpointed"
        time.sleep(0.05)
    signalled = _job_processes(sweep_dir)
    assert signalled
    for pid in signalled:
        os.kill(pid, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert f"icep: 2 runs in {sweep_dir}/ (2 completed)" in output  # the closing lines
    assert f"icep: launcher logs (submitit): {sweep_dir}/.submitit/" in output

    resumed = 0
    for n, pipeline in enumerate(("iterative", "ice")):
        job = sweep_dir / str(n)
        summary = json.loads((job / "summary.json").read_text())
        assert (summary["status"], summary["pipeline"]) == ("completed", pipeline)
        assert (job / "model.pt").is_file() and not (job / "checkpoint.pt").exists()
        rows = read_jsonl(job / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 10))  # ResNet-20: 9 units, each once
        logs = (job / "icep.log").read_text()
        resumed += "resume: continuing" in logs
    assert resumed >= 1, "no requeued job resumed from its checkpoint"
    requeues = list((sweep_dir / ".submitit").rglob("*_log.err"))
    assert any("Requeued" in p.read_text() or "SIGUSR2" in p.read_text() for p in requeues)


def test_slurm_launcher_submits_the_options_a_user_sets(tmp_path, cache_dir):
    """hydra/launcher=slurm through stand-ins for srun and sbatch; the sbatch keeps the script it
    is given and refuses it: the partition, resources, time limit, array parallelism, account,
    qos, extra options and the requeue signal reach the script, and the refusal is one line."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "sbatch.sh"
    bin_dir.mkdir()
    for name, body in (
        ("srun", "exit 0"),
        (
            "sbatch",
            f'cp "$1" {kept}\necho "sbatch: error: invalid partition specified" >&2\nexit 1',
        ),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = _env(cache_dir, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = _multirun(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.cpus_per_task=6",
            "hydra.launcher.mem_gb=48",
            "hydra.launcher.timeout_min=90",
            "hydra.launcher.array_parallelism=2",
            "hydra.launcher.account=lab",
            "hydra.launcher.qos=high",
            "+hydra.launcher.additional_parameters.mail-type=END",
            "seed=0,1,2,3",
        ],
        tmp_path / "sweep",
        env,
    )
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(
        "icep: error: sbatch refused the sweep (sbatch: error: invalid partition specified); "
        "check the hydra.launcher.* keys"
    )
    script = kept.read_text()
    for option in (
        "--partition=gpu",
        "--gpus-per-node=2",
        "--cpus-per-task=6",
        "--mem=48GB",
        "--time=90",
        "--array=0-3%2",
        "--account=lab",
        "--qos=high",
        "--mail-type=END",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {option}\n" in script, option


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine has Slurm")
def test_slurm_launcher_without_slurm_is_one_line(tmp_path, cache_dir):
    proc = _multirun(["hydra/launcher=slurm", "seed=0,1"], tmp_path / "sweep", _env(cache_dir))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        "icep: error: hydra/launcher=slurm needs a Slurm cluster (no srun on PATH here); on one "
        "machine use hydra/launcher=local"
    )
