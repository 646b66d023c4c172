from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `make test` runs two pytest-xdist workers on two cores: each worker, and the runs it starts,
# computes on one thread so they do not fight over the cores. Set before torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Latency is measured in every pruning run (conf/config.yaml, latency:): briefly in the tests,
# in their runs too (inherited by subprocesses).
os.environ.setdefault("ICEP_LATENCY_MIN_RUN_TIME", "0.01")
os.environ.setdefault("ICEP_LATENCY_BATCH_SIZES", "[1, 8]")

ROOT = Path(__file__).resolve().parents[1]
# A run's default cache is the user's (~/.cache/icep); the tests keep theirs in the checkout.
os.environ.setdefault("ICEP_CACHE", str(ROOT / "outputs" / "cache"))
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Small, fast settings for end-to-end runs on digits.
# 700 of the 1,437 train+val digits: half the cost of an epoch, decisions that still vary.
FAST = [
    "dense.epochs=3",
    "trainer.batch_size=64",
    "trainer.device=cpu",
    "dataset.train_subset=700",
]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    cuda_tests = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_tests:
        return
    import torch  # here, not at the top: a session without cuda tests need not load it

    if not torch.cuda.is_available():
        for item in cuda_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dense-model and dataset cache for the whole session (dense models are reused), shared
    by the pytest-xdist workers: the cache is safe to share (archives unpack into a temp folder
    renamed into place, models are written atomically), and a worker then neither unpacks
    CIFAR-10 nor trains a dense model that the other one already did."""
    if os.environ.get("ICEP_TEST_CACHE"):
        return Path(os.environ["ICEP_TEST_CACHE"])
    if "PYTEST_XDIST_WORKER" in os.environ:  # basetemp is <session temp>/popen-gwN
        path = tmp_path_factory.getbasetemp().parent / "icep-cache"
        path.mkdir(exist_ok=True)
        return path
    return tmp_path_factory.mktemp("icep-cache")


@pytest.fixture
def place(tmp_path):
    """``outputs/`` with an earlier run and ``cache/`` with a dense model (tests/places.py)."""
    from places import Place

    return Place(tmp_path)


def icep_env(cache: Path | None = None, **extra: str) -> dict:
    """The environment of an icep subprocess: this one, with ``cache`` as ICEP_CACHE, W&B quiet
    and icep's own one-line errors (no HYDRA_FULL_ERROR), plus ``extra``."""
    env = {**os.environ, "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    if cache is not None:
        env["ICEP_CACHE"] = str(cache)
    return {**env, **extra}


def _icep_command(
    args: list[str],
    run_dir: Path,
    cache: Path,
    env: dict | None,
    kill_in_checkpoint: int | None = None,
    scripted_accuracy: bool = False,
):
    full_env = icep_env(cache, **(env or {}))
    entry = ["-m", "icep"]
    if kill_in_checkpoint is not None or scripted_accuracy:
        entry = [str(ROOT / "tests" / "harness.py")]
        if kill_in_checkpoint is not None:
            entry.append(f"--kill-in-checkpoint={kill_in_checkpoint}")
        if scripted_accuracy:
            entry.append("--scripted-accuracy")
    return [sys.executable, *entry, f"hydra.run.dir={run_dir}", *args], full_env


def run_icep(
    args: list[str],
    run_dir: Path,
    cache: Path,
    timeout: float = 300,
    env: dict | None = None,
    kill_in_checkpoint: int | None = None,
    scripted_accuracy: bool = False,
):
    """``python -m icep ARGS`` in a subprocess with its run folder at ``run_dir``. With
    ``kill_in_checkpoint=STEP`` the run SIGKILLs itself while it writes step STEP's checkpoint;
    with ``scripted_accuracy`` its evaluations read scripted numbers (tests/harness.py)."""
    command, full_env = _icep_command(
        args, run_dir, cache, env, kill_in_checkpoint, scripted_accuracy
    )
    return subprocess.run(
        command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def start_icep(args: list[str], run_dir: Path, cache: Path, env: dict | None = None):
    """``python -m icep ARGS`` started in the background (a Popen), output discarded."""
    command, full_env = _icep_command(args, run_dir, cache, env)
    return subprocess.Popen(
        command, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def digits_data(cache: Path, train_subset: int):
    """sklearn's digits as the pipelines get them (seed 0, batches of 64, no workers), with a
    seeded subset of ``train_subset`` train+val samples, for in-process pipeline tests."""
    from omegaconf import OmegaConf

    from icep.data import build_data

    cfg = OmegaConf.merge(
        OmegaConf.load(ROOT / "conf" / "dataset" / "digits.yaml"), {"train_subset": train_subset}
    )
    return build_data(
        cfg, seed=0, batch_size=64, eval_batch_size=512, num_workers=0, cache_dir=cache
    )


def trained_on_digits(digits, depth: int, epochs: int, min_val_acc: float) -> dict:
    """The state dict of a CIFAR ResNet of ``depth`` (seed 0) trained ``epochs`` epochs on
    ``digits`` (from :func:`digits_data`); asserts it reaches ``min_val_acc`` on val."""
    import torch

    from icep.models import cifar_resnet
    from icep.train import Trainer, sgd

    torch.manual_seed(0)
    model = cifar_resnet(depth, num_classes=10, in_channels=1)
    trainer = Trainer(torch.device("cpu"))
    trainer.fit(model, digits.train, sgd(model, 0.1, weight_decay=5e-4), epochs=epochs)
    assert trainer.evaluate(model, digits.val) > min_val_acc
    return model.state_dict()


def wait_for_steps(metrics: Path, steps: int, proc, timeout: float = 240) -> None:
    """Wait until the icep run ``proc`` has written ``steps`` rows to ``metrics``."""
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {steps}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {steps} within {timeout}s")
        time.sleep(0.02)


def kill_after(out: Path, steps: int, proc, timeout: float = 240) -> None:
    """SIGKILL the icep run ``proc`` (from :func:`start_icep`) once its metrics.jsonl in ``out``
    holds ``steps`` rows."""
    wait_for_steps(out / "metrics.jsonl", steps, proc, timeout)
    proc.kill()
    proc.wait()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compose_config(*overrides: str):
    """The whole config as ``python -m icep OVERRIDES`` composes it (no run folder)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("icep.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def pipeline_overrides(name: str, *overrides: str, **keys) -> list[str]:
    """``pipeline=NAME``, then ``overrides`` as given, then ``pipeline.KEY=VALUE`` for ``keys``
    (``**{"finetune.lr": 0.01}`` for a nested key)."""
    return [f"pipeline={name}", *overrides, *(f"pipeline.{k}={v}" for k, v in keys.items())]


def build_pipeline(name: str, *overrides: str, **keys):
    """The pipeline object the app would build for ``pipeline_overrides(name, ...)``."""
    from hydra.utils import instantiate

    return instantiate(compose_config(*pipeline_overrides(name, *overrides, **keys)).pipeline)
