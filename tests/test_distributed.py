"""One run on several processes (icep.distributed): each rank's share of every batch, DDP training
with the whole run's batch, decisions every rank agrees on, rank 0 alone writing; torchrun and the
submitit launcher's tasks on the CPU with gloo, a kill and resume, a failing rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, icep_env, read_jsonl, wait_for_steps
from torch import nn

from icep import distributed
from icep.data import ShardSampler, _loader
from icep.device_batches import DeviceLoader, TensorSplit, share

# --- each rank's share of every batch --------------------------------------------------------


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize(("n", "batch"), [(21, 8), (17, 6), (5, 4)])
def test_the_ranks_parts_of_each_batch_are_the_batch_of_one_process(n, batch, ranks):
    """A data-parallel run trains on the batches of a run on one process: the parts of the ranks,
    joined in rank order, are that run's batches; a last batch too small for every rank to get a
    sample is left out of training, and every rank has as many batches. An evaluation sees
    every sample once, over all the ranks (its batch need not be a multiple of the ranks; a
    train batch must, data_from_config checks)."""
    data = torch.utils.data.TensorDataset(torch.arange(n), torch.zeros(n))

    def batches(rank: int, parts: int, train: bool) -> list[list[int]]:
        generator = torch.Generator().manual_seed(7) if train else None
        loader = _loader(data, batch, generator, 0, False, None, (rank, parts))
        return [x.tolist() for x, _ in loader]

    evaluated = sum((sum(batches(r, ranks, False), []) for r in range(ranks)), [])
    assert sorted(evaluated) == list(range(n))
    for train in (True,) if batch % ranks == 0 else ():
        whole = batches(0, 1, train)
        parts = [batches(rank, ranks, train) for rank in range(ranks)]
        assert len({len(p) for p in parts}) == 1  # every rank takes every step
        if 0 < n % batch < ranks:
            whole = whole[:-1]
        joined = [sum((p[i] for p in parts), []) for i in range(len(whole))]
        assert joined == whole
    for train in (True, False):
        for rank in range(ranks):
            sampler = ShardSampler(
                torch.utils.data.SequentialSampler(data), batch, rank, ranks, drop_small=train
            )
            assert len(sampler) == len(list(sampler))


def test_the_device_path_gives_each_rank_its_part_with_the_same_augmentation():
    """Held on the device: every rank draws the whole batch's order, crops and flips, and keeps
    its part, so the joined parts are exactly the batches (augmented alike) of one process."""
    images = torch.randint(0, 255, (23, 3, 8, 8), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(23), list(range(23)), scale=1 / 255)

    def epoch(shard):
        loader = DeviceLoader(
            split,
            8,
            shuffle=True,
            generator=torch.Generator().manual_seed(3),
            crop_padding=2,
            flip=True,
            shard=shard,
        )
        return list(loader), len(loader)

    whole, count = epoch((0, 1))
    (first, n0), (second, n1) = epoch((0, 2)), epoch((1, 2))
    assert count == n0 == n1 == len(first) == len(second) == 3
    for (x, y), (x0, y0), (x1, y1) in zip(whole, first, second, strict=True):
        assert torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([x0, x1]), x)
    assert share(7, 0, 3) == (0, 3) and share(7, 2, 3) == (5, 7)


def test_a_batch_the_ranks_cannot_share_equally_is_refused(monkeypatch):
    from conftest import compose_config

    from icep.data import data_from_config
    from icep.errors import ConfigError

    monkeypatch.setattr(distributed, "_world", distributed.World(0, 3, 0))
    cfg = compose_config("trainer.batch_size=64", "trainer.device=cpu")
    with pytest.raises(ConfigError, match="trainer.batch_size: 64 is the batch of the whole run"):
        data_from_config(cfg)


# --- two ranks in this machine's processes, gloo ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(rank: int, port: int, out: str) -> None:
    """One of two ranks: train one epoch through DDP on its half of each batch, evaluate,
    score; write what it found for the test to compare with one process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.start()
    found = _train_evaluate_score((rank, 2))
    torch.save(found, Path(out) / f"rank{rank}.pt")
    distributed.finish()


def _train_evaluate_score(shard: tuple[int, int]) -> dict:
    from icep.pruning import PruningEngine
    from icep.pruning.criteria import MeanActivation
    from icep.train import Trainer, sgd

    torch.manual_seed(0)
    x, y = torch.randn(40, 4, 6, 6), torch.randint(0, 3, (40,))
    data = torch.utils.data.TensorDataset(x, y)
    # No BatchNorm: DDP on the halves of a batch steps as one process on the whole batch does.
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))
    trainer = Trainer(torch.device("cpu"))
    train = _loader(data, 10, torch.Generator().manual_seed(1), 0, False, None, shard)
    trainer.train_epoch(model, train, sgd(model, 0.1))
    evaluation = _loader(data, 16, None, 0, False, None, shard)
    accuracy = trainer.evaluate(model, evaluation)
    engine = PruningEngine(model, torch.zeros(1, 4, 6, 6))
    criterion = MeanActivation(batches=2)
    criterion.prepare(engine, ["0"], evaluation, "cpu")
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "accuracy": accuracy,
        "scores": engine.scores("0", criterion),
        "images": trainer.timer.work_total()["images_fwd"],
    }


def test_two_ranks_train_evaluate_and_score_as_one_process(tmp_path):
    """Two gloo ranks: the weights after a DDP epoch are those of one process on the whole
    batches (averaged gradients), the accuracy is the whole split's on both, the criterion's
    scores are the same numbers on both, and the work counted is the whole run's."""
    torch.multiprocessing.spawn(_two_ranks, args=(_free_port(), str(tmp_path)), nprocs=2)
    alone = _train_evaluate_score((0, 1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        for key, value in alone["weights"].items():
            torch.testing.assert_close(rank["weights"][key], value, atol=1e-5, rtol=1e-4)
        assert rank["accuracy"] == pytest.approx(alone["accuracy"])
        assert rank["images"] == alone["images"]
    assert torch.equal(ranks[0]["scores"], ranks[1]["scores"])


# --- whole runs: torchrun, the submitit launcher ----------------------------------------------

# ICE with every component on and a low threshold (fine-tunes, a freezing analysis), on digits.
ARGS = [*FAST, "pipeline=ice", "pipeline.thre=0.5", "dataset.train_subset=600"]
# What a data-parallel run may differ in from one process, in accuracy points on the test split
# (360 images): the same dense model and batches; BatchNorm's batch statistics are each rank's
# half-batch's, and sums run in another order.
TOLERANCE = 6.0


def _torchrun(
    args: list[str], run_dir: Path, cache: Path, *, harness: list[str] = (), ranks: int = 2
):
    entry = [str(ROOT / "tests" / "harness.py"), *harness] if harness else ["-m", "icep"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={ranks}",
        f"--master_port={_free_port()}",
        *entry,
        f"hydra.run.dir={run_dir}",
        *args,
    ]
    return command, icep_env(cache, OMP_NUM_THREADS="1")


def _run(command, env, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (through /proc), children first."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _layers(run: Path) -> dict:
    from icep.serialization import layer_shapes, load_model

    return layer_shapes(load_model(run / "model.pt"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    from conftest import run_icep

    out = tmp_path_factory.mktemp("one") / "run"
    result = run_icep(ARGS, out, cache_dir, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cache_dir, one_process):
    out = tmp_path_factory.mktemp("two") / "run"
    result = _run(*_torchrun(ARGS, out, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_torchrun_prunes_as_one_process_and_only_rank_0_writes(one_process, two_ranks):
    """torchrun with two ranks prunes the same structure as one process from the same dense
    model, with the same unpruned accuracy and the final one within TOLERANCE; one folder, one
    metrics file, one summary (saying 2 ranks) and one table."""
    out, result = two_ranks
    one = json.loads((one_process / "summary.json").read_text())
    two = json.loads((out / "summary.json").read_text())
    assert two["ranks"] == 2 and one["ranks"] == 1
    assert _layers(out) == _layers(one_process)
    assert two["acc_original_test"] == pytest.approx(one["acc_original_test"])
    assert abs(two["acc_final_test"] - one["acc_final_test"]) <= TOLERANCE
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert result.stdout.count("icep: ice pruning of resnet20") == 1  # rank 0's table only
    log = (out / "icep.log").read_text()
    assert log.count("step 9/9") == 1  # rank 0's lines only
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # one folder for the ranks


def _rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith("t_")}
        for r in read_jsonl(run / "metrics.jsonl")
    ]


@pytest.mark.slow
def test_torchrun_with_one_process_is_a_plain_run(tmp_path, cache_dir, one_process):
    out = tmp_path / "run"
    result = _run(*_torchrun(ARGS, out, cache_dir, ranks=1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _rows(out) == _rows(one_process)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, one_process))
    for key in ("acc_final_val", "acc_final_test", "params_after", "finetunes", "ranks"):
        assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_killed_two_rank_run_resumes_from_rank_0s_checkpoint(tmp_path, cache_dir, two_ranks):
    """Both ranks SIGKILLed after a few steps; resume=true restarts both from rank 0's checkpoint
    and ends as the run that was never interrupted."""
    out = tmp_path / "killed"
    command, env = _torchrun(ARGS, out, cache_dir)
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_steps(out / "metrics.jsonl", 4, proc)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun's workers have sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    steps = torch.load(out / "checkpoint.pt", weights_only=True)["steps"]
    assert 3 <= steps < 9

    command, env = _torchrun([*ARGS, "resume=true"], out, cache_dir)
    resumed = _run(command, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing {out} after step {steps}" in (out / "icep.log").read_text()
    full = two_ranks[0]
    assert _rows(out) == _rows(full)
    assert _layers(out) == _layers(full)
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["error", "kill"])
def test_a_failing_rank_takes_the_others_down_with_one_line(tmp_path, cache_dir, two_ranks, how):
    """Rank 1 fails at step 3 (an error, or SIGKILL): the run ends at once, not at a timeout;
    icep prints one error line for the run (torchrun adds its own report), no icep traceback,
    and rank 0's summary says which rank failed and why."""
    out = tmp_path / "failed"
    failure = "1:3" if how == "error" else "1:3:kill"
    command, env = _torchrun(ARGS, out, cache_dir, harness=["--fail-on-rank", failure])
    start = time.monotonic()
    result = _run(command, env, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - start < 90
    lines = [line for line in result.stderr.splitlines() if line.startswith("icep: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert f'File "{ROOT / "icep"}/' not in result.stderr  # no traceback through icep's code
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    if how == "error":
        assert lines[0] == (
            "icep: error: rank 1: step 3: out of GPU memory on rank 1 (injected by a test)"
        )
        assert (
            summary["reason"] == "rank 1: step 3: out of GPU memory on rank 1 (injected by a test)"
        )
        assert f"traceback : {lines[0]}" in result.stderr  # torchrun's report quotes it
    else:
        assert "lost contact with another rank" in lines[0]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


@pytest.mark.slow
def test_a_config_error_on_every_rank_is_one_line(tmp_path, cache_dir):
    command, env = _torchrun([*ARGS, "trainer.batch_size=63"], tmp_path / "run", cache_dir)
    result = _run(command, env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.startswith("icep: error:")]
    assert lines == [
        "icep: error: trainer.batch_size: 63 is the batch of the whole run, which 2 ranks share "
        "equally; make it a multiple of 2"
    ], result.stderr[-3000:]


@pytest.mark.slow
def test_the_local_launcher_runs_a_job_on_two_tasks(tmp_path, cache_dir, one_process):
    """hydra.launcher.tasks_per_node=2 (the Slurm launcher's way, here with submitit's local
    executor): the job is one run of two ranks, as torchrun's."""
    sweep = tmp_path / "sweep"
    result = _run(
        [
            sys.executable, "-m", "icep", "-m", "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *ARGS,
        ],
        icep_env(cache_dir, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert (summary["status"], summary["ranks"]) == ("completed", 2)
    assert _layers(sweep / "0") == _layers(one_process)


@pytest.mark.cuda
def test_two_ranks_share_one_gpu_over_gloo(tmp_path, cache_dir, one_process):
    """The CUDA side of a data-parallel run on a machine with one GPU: two ranks on it, gloo
    carrying the CUDA tensors (NCCL takes one GPU per rank). The same structure as one process."""
    out = tmp_path / "run"
    command, env = _torchrun([*ARGS, "trainer.device=cuda"], out, cache_dir)
    result = _run(command, {**env, "ICEP_DIST_BACKEND": "gloo"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["ranks"], summary["device"]) == (2, "cuda:0")
    assert _layers(out) == _layers(one_process)


@pytest.mark.slow
def test_a_failing_job_on_two_tasks_fails_in_one_line_through_the_launcher(tmp_path, cache_dir):
    """A job of two tasks whose run fails: both tasks hand their error to submitit (none just
    exits), so the multirun ends with the job's one line, not the launcher's traceback."""
    sweep = tmp_path / "sweep"
    result = _run(
        [
            sys.executable, "-m", "icep", "-m", "hydra/launcher=local",
            "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}", *ARGS,
            "trainer.batch_size=63",
        ],
        icep_env(cache_dir, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "icep: error: trainer.batch_size: 63 is the batch of the whole run, which 2 ranks share "
        "equally; make it a multiple of 2"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_ranks_train_the_dense_model_and_rank_0_caches_it(tmp_path):
    """pipeline=dense on two ranks with an empty cache: one initialisation for both, trained
    through DDP, cached once by rank 0 (no partial file left), and a second run loads it."""
    cache = tmp_path / "cache"
    args = [*FAST, "pipeline=dense", "dense.epochs=2", "dataset.train_subset=300"]
    for attempt in ("trains", "loads"):
        out = tmp_path / attempt
        result = _run(*_torchrun(args, out, cache))
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["status"], summary["ranks"]) == ("completed", 2)
        cached = list((cache / "dense").glob("*.pt"))
        assert [p.name for p in cached] == [Path(summary["source"]).name], attempt
        assert ("dense_seconds" in summary) == (attempt == "trains")
    assert not list((cache / "dense").glob("*.partial.pt"))


@pytest.mark.slow
def test_the_tuning_stage_runs_each_trial_on_every_rank(tmp_path, cache_dir):
    """tune=tpe on two ranks: rank 0's study draws each trial's parameters, every rank runs the
    trial with it, and the final run takes the chosen ones; one study, one set of trial files."""
    out = tmp_path / "run"
    args = [
        *ARGS,
        "tune=tpe",
        "tune.n_trials=2",
        "tune.train_fraction=0.25",
        "tune.eval_fraction=0.5",
    ]
    result = _run(*_torchrun(args, out, cache_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    tune = json.loads((out / "tune_result.json").read_text())
    assert tune["complete"] + tune["pruned"] == 2 and tune["fail"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["ranks"]) == ("completed", 2)
    chosen = summary["tuning"]["params"]
    assert {k: summary["hyperparameters"][k] for k in chosen} == pytest.approx(chosen)
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001"]
