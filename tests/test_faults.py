"""Faults a hostile user or a real machine brings, each provoked for real: a bad value or input,
a run folder that already holds something, a folder in use, a killed search met by another
config, SIGTERM and Ctrl-C, a full disk. Each ends in one line and a known exit code and leaves
every earlier output byte for byte as it was: an earlier run and the dense cache beside it
(:class:`places.Place`), and whatever the run folder held.

Elsewhere, as they need more than one run: a signal's checkpoint resumed to the same metrics
(test_resume), a stopped search resumed without repeating a point or counting a failure
(test_tune_stage), eight jobs at once on one study and one dense cache (test_sweeper), atomic
writes and the umask (test_interrupts)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess

import pytest
import torch
from conftest import FAST, _icep_command, run_icep, wait_for_steps
from places import call_main, one_line, resolve

from icep.locks import locked

# --- bad values and inputs ------------------------------------------------------------------

# name -> (arguments, texts the line must hold: the problem and the fix). {checkpoint:KIND},
# {data:KIND} and {file} stand for the files tests/places.py makes.
FAULTS = {
    "seed negative": (["seed=-1"], ["seed: got -1; must be an integer from 0 to 2**32 - 1"]),
    "train_subset a word": (
        ["dataset.train_subset=abc"],
        ["dataset.train_subset: got 'abc'; must be null or an integer >= 2"],
    ),
    "train_subset a fraction": (
        ["dataset.train_subset=2.5"],
        ["dataset.train_subset: got 2.5; must be null or an integer >= 2"],
    ),
    "test_fraction zero": (
        ["dataset.test_fraction=0"],
        ["dataset.test_fraction: got 0; must be a number strictly between 0 and 1"],
    ),
    "test_fraction above 1": (
        ["dataset.test_fraction=1.5"],
        ["dataset.test_fraction: got 1.5; must be a number strictly between 0 and 1"],
    ),
    "momentum negative": (["dense.momentum=-3"], ["dense.momentum: got -3; must be a number in"]),
    "milestones not a list": (
        ["dense.milestones=abc"],
        ["dense.milestones: got 'abc'; must be a list of fractions of the epochs in (0, 1)"],
    ),
    "image size zero": (
        ["dataset=image_folder", "dataset.root={data:split}", "dataset.image_size=0"],
        ["dataset.image_size: got 0; must be an integer >= 1"],
    ),
    "empty checkpoint": (
        ["model.checkpoint={checkpoint:empty}"],
        ["empty.pt is empty (0 bytes); save the trained weights again"],
    ),
    "checkpoint is a folder": (
        ["model.checkpoint={checkpoint:folder}"],
        ["folder.pt is a folder; give the path of a trained model file in it"],
    ),
    "checkpoint an icep model of another architecture": (
        ["model.checkpoint={checkpoint:icep_other_architecture}"],
        [
            "icep_other_architecture.pt is an icep model of another architecture "
            "(depth=32 there, 20 here); run with model=resnet32"
        ],
    ),
    "budget of an unknown count": (
        ["pipeline.target={flops: 0.5}"],
        ["pipeline.target: got {'flops': 0.5}; a budget names one of macs, params, latency with"],
    ),
    "budget share above 1": (
        ["pipeline.target={macs: 1.5}"],
        ["pipeline.target.macs: got 1.5; must be a number strictly between 0 and 1"],
    ),
    "budget with the global scope": (
        ["pipeline=one_shot", "pipeline.scope=global", "pipeline.target={macs: 0.5}"],
        ["a MACs, params or latency budget needs pipeline.scope=uniform (got global"],
    ),
    "budget with masks": (
        ["pipeline=one_shot", "pipeline.structure=unstructured", "pipeline.target={params: 0.5}"],
        ["a MACs, params or latency budget needs structured pruning (masks remove none)"],
    ),
    "budget beyond reach": (
        ["pipeline.target={macs: 0.01}", "dense.epochs=1", "dataset.train_subset=100"],
        ["pipeline.target: macs 0.01 cannot be met: pruning every unit as far as it goes keeps"],
    ),
    "latency budget at batch 0": (
        ["pipeline.target={latency: 0.5, batch: 0}"],
        ["pipeline.target.batch: got 0; must be an integer >= 1"],
    ),
    "a batch for a MACs budget": (
        ["pipeline.target={macs: 0.5, batch: 4}"],
        ["e.g. pipeline.target={macs: 0.5} or {latency: 0.5, batch: 32}"],
    ),
    "round_to zero": (
        ["pipeline.round_to=0"],
        ["pipeline.round_to: got 0; must be an integer >= 1"],
    ),
    "latency batch size zero": (
        ["latency.batch_sizes=[1,0]"],
        ["latency.batch_sizes: got [1, 0]; must be a list of batch sizes >= 1"],
    ),
    "mean for other channels": (
        ["dataset.mean=[0.5,0.5]"],
        ["dataset.mean: has 2 values, but the images have 1 channel; give one value per channel"],
    ),
    "std zero": (
        ["dataset.std=[0]"],
        ["dataset.std: got [0]; must be a list of numbers > 0, one per channel"],
    ),
    "unknown timm model": (
        ["model=timm", "model.name=resnet5O"],
        ["unknown timm model 'resnet5O'; e.g. resnet50,", "timm.list_models()"],
    ),
    "archive with an absolute link": (
        ["dataset=image_folder", "dataset.root={data:absolute_link}"],
        ["holds a member icep does not unpack, for safety", "pack the tree again without"],
    ),
    "damaged study database": (
        ["tune=tpe", "tune.storage={file}"],
        ["is not a readable study database", "delete it (or move it away) to start the search"],
    ),
    "unquoted path with a space": (
        ["dataset=image_folder", "dataset.root=/my", "data"],
        ["'data' on the command line is not KEY=VALUE; a value holding a space must be quoted"],
    ),
    "run folder name over the limit": (
        ["name=" + "x" * 300, "hydra.run.dir={outputs}/${name}"],
        [
            "a folder or file name is over the file system's limit (255 bytes)",
            "shorten name=... (or hydra.run.dir=..., paths.outputs=...)",
        ],
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_bad_value_or_input_is_one_line(fault, place, monkeypatch, capsys):
    args, must_say = FAULTS[fault]
    args = [a.replace("{outputs}", str(place.outputs)) for a in resolve(args, place)]
    own_run_dir = not any(a.startswith("hydra.run.dir=") for a in args)
    line = one_line(*call_main(args, place, monkeypatch, capsys, run_dir=own_run_dir))
    for text in must_say:
        assert text in line, line
    assert not (place.run_dir / "metrics.jsonl").exists()
    place.assert_untouched()


# --- a run folder that already holds something ----------------------------------------------


def _files(folder) -> dict:
    """Every file under ``folder`` with its bytes, lock files (taken by every run) aside."""
    return {
        p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"
    }


def _checkpoint(**edit) -> bytes:
    """The bytes of an icep checkpoint after two steps, with ``edit`` applied to its fields."""
    import io

    from icep.pipelines.base import CHECKPOINT_FORMAT

    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": {},
        "layers": {},
        "state_dict": {},
        "steps": 2,
        "rows": [{"step": 1}, {"step": 2}],
        "decision_split": "val",
        "finetunes": 2,
        "state": {},
        "timer": {},
        "rng": {},
        **edit,
    }
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


ROWS = b'{"step": 1}\n{"step": 2}\n'

# name -> (what the run folder holds, extra arguments, the line's start, {out} for the folder).
# Each is refused before the run takes the folder: the folder stays as it was, file for file.
FOLDERS = {
    "a finished run, started again": (
        {"summary.json": b'{"status": "completed"}\n', "model.pt": b"weights"},
        [],
        "{out} already holds a run (summary.json); resume=true continues it, or choose another",
    ),
    "a damaged summary, resumed": (
        {"summary.json": b'{"status": "compl', "model.pt": b"weights"},
        ["resume=true"],
        "resume: {out}/summary.json is not a summary icep wrote (not a JSON object) and there is "
        "no checkpoint: the run there may have finished; move its files away",
    ),
    "a damaged checkpoint, resumed": (
        {"checkpoint.pt": b"PK\x03\x04 truncated", "metrics.jsonl": ROWS},
        ["resume=true"],
        "resume: {out}/checkpoint.pt cannot be read (",
    ),
    "an edited checkpoint (rows a string), resumed": (
        {"checkpoint.pt": _checkpoint(rows="abc"), "metrics.jsonl": ROWS},
        ["resume=true"],
        "resume: {out}/checkpoint.pt is not a checkpoint icep wrote (its 'rows' is str, not list)",
    ),
    "an edited checkpoint (steps and rows disagree), resumed": (
        {"checkpoint.pt": _checkpoint(steps=5), "metrics.jsonl": ROWS},
        ["resume=true"],
        "resume: {out}/checkpoint.pt is not a checkpoint icep wrote (5 steps but 2 rows)",
    ),
    "an edited checkpoint (no weights), resumed": (
        {"checkpoint.pt": _checkpoint(state_dict=None), "metrics.jsonl": ROWS},
        ["resume=true"],
        "resume: {out}/checkpoint.pt is not a checkpoint icep wrote (its 'state_dict' is "
        "NoneType, not dict)",
    ),
}


@pytest.mark.parametrize("held", list(FOLDERS))
def test_a_run_folder_holding_a_run_is_never_overwritten(held, place, monkeypatch, capsys):
    files, args, says = FOLDERS[held]
    out = place.run_dir
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _files(out)
    line = one_line(*call_main(args, place, monkeypatch, capsys))
    assert line.startswith(says.format(out=out)), line
    assert _files(out) == before
    place.assert_untouched()


def test_a_folder_where_a_run_file_goes_is_one_line(place, monkeypatch, capsys):
    """resume=true in a folder with no checkpoint starts afresh, and meets a folder where it
    writes metrics.jsonl: one line, and the folder and what it holds are kept."""
    out = place.run_dir
    (out / "metrics.jsonl").mkdir(parents=True)
    (out / "metrics.jsonl" / "keep").write_bytes(b"x")
    line = one_line(*call_main(["resume=true"], place, monkeypatch, capsys))
    assert line == (
        f"Is a directory: {out / 'metrics.jsonl'}: a folder is where icep writes a file; move it "
        "away, or use another folder"
    )
    assert (out / "metrics.jsonl" / "keep").read_bytes() == b"x"
    place.assert_untouched()


def test_a_folder_in_use_is_refused_and_kept(place, monkeypatch, capsys):
    """Another run holds the folder's lock (here: this process, as a second icep process would)."""
    out = place.run_dir
    out.mkdir(parents=True)
    with locked(out / ".icep.lock", "", wait=False):
        line = one_line(*call_main([], place, monkeypatch, capsys))
    assert line == (
        f"the run folder {out} is in use by another icep run (pid {os.getpid()}); "
        "wait for it to end, or choose another hydra.run.dir"
    )
    assert _files(out) == {}
    place.assert_untouched()


def _raise_signal_at(monkeypatch, target: str, signum: int, *, after: int = 1) -> None:
    """Send ``signum`` to this process when ``target`` (module.Class.method or module.function)
    has been called ``after`` times, right after that call returns."""
    import importlib

    module_name, _, attr = target.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:
        module_name, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(module_name), cls)
    real, calls = getattr(owner, attr), []

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == after:
            signal.raise_signal(signum)
        return result

    monkeypatch.setattr(owner, attr, wrapped)


def _stopped(code, err, signum) -> str:
    """The one line of a run stopped by ``signum``, after checking the contract."""
    assert code == 128 + signum, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"icep: interrupted by {signal.Signals(signum).name}"), err
    return lines[0]


TINY = ["dense.epochs=1", "dataset.train_subset=300", "trainer.batch_size=64"]


def test_a_killed_search_is_never_continued_by_another_config(place, monkeypatch, capsys):
    """A search stopped before its first trial leaves its study (tune.db) and no checkpoint.
    Another config is refused there, with resume=true or without, and the folder stays as it
    was; the search's own config may continue it (test_tune_stage)."""
    search = [*TINY, "tune=tpe", "tune.n_trials=2", "pipeline.ratio=0.5"]
    _raise_signal_at(monkeypatch, "icep.data.subsample", signal.SIGTERM)
    code, _, err = call_main(search, place, monkeypatch, capsys)
    line = _stopped(code, err, signal.SIGTERM)
    out = place.run_dir
    assert line.endswith(f"resume=true hydra.run.dir={out} continues from the last checkpoint")
    assert (out / "tune.db").is_file() and not (out / "checkpoint.pt").exists()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    before = _files(out)
    other = [*search[:-1], "pipeline.ratio=0.6"]
    line = one_line(*call_main(other, place, monkeypatch, capsys))
    assert line.startswith(f"{out} already holds a run (summary.json); resume=true continues it")
    line = one_line(*call_main([*other, "resume=true"], place, monkeypatch, capsys))
    assert line.startswith(
        f"resume: {out} holds a run of another config (pipeline.ratio=0.5 there, 0.6 now)"
    )
    assert line.endswith("resume it with the same overrides, or start a new run folder")
    assert _files(out) == before
    place.assert_untouched()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_run_after_its_step_with_one_line(signum, place, monkeypatch, capsys):
    """SIGTERM or Ctrl-C while step 2 writes its row and checkpoint: the write finishes, the run
    stops with one line, summary.json says "interrupted", no temp file stays, and the checkpoint
    holds step 2 (resumed to the uninterrupted run's metrics: test_resume)."""
    _raise_signal_at(monkeypatch, "icep.loggers.RunLogger.log_step", signum, after=2)
    code, _, err = call_main([*TINY, "pipeline=iterative"], place, monkeypatch, capsys)
    line = _stopped(code, err, signum)
    out = place.run_dir
    assert line == (
        f"icep: interrupted by {signal.Signals(signum).name} after 2 pruning steps; "
        f"resume=true hydra.run.dir={out} continues from the last checkpoint"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("interrupted", 2)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(out.glob(".*.tmp")) and not (out / "model.pt").exists()
    place.assert_untouched()


# --- a full disk --------------------------------------------------------------------------------

ARGS = [*FAST, "dataset.train_subset=600"]


def _dense_models(cache) -> dict:
    """The cache's dense models with their bytes: not the temp files and folders of what the
    other xdist worker is writing into the shared cache meanwhile."""
    return {p: p.read_bytes() for p in sorted((cache / "dense").glob("*.pt"))}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, cache_dir):
    """A finished run, which also puts its dense model in the cache."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert run_icep(ARGS, out, cache_dir).returncode == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("where", ["run folder", "dense cache"])
def test_a_full_disk_is_one_line_and_keeps_earlier_outputs(where, earlier, tmp_path, cache_dir):
    """torch.save on a full disk raises a C++ RuntimeError ("enforce fail at
    inline_container.cc"); a file size limit (ulimit -f) makes the same failure here. Below the
    size of the dense model, the cache's write fails first (a cold cache); below the pruned
    model's, the run folder's (the dense model already cached)."""
    cache = cache_dir if where == "run folder" else tmp_path / "cold-cache"
    before = {**_files(earlier), **_dense_models(cache_dir)}
    out = tmp_path / "run"
    command, env = _icep_command(ARGS, out, cache, None, None, False)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("icep: error: File too large: ")
    assert "the file size limit (ulimit -f) is too low for it" in lines[0]
    written = (cache / "dense") if where == "dense cache" else out
    assert f"File too large: {written}/" in lines[0], lines[0]
    after = {**_files(earlier), **_dense_models(cache_dir)}  # (other tests may add to the cache)
    assert {path: after.get(path) for path in before} == before
    assert not [p for p in (*out.rglob(".*.tmp"), *cache.rglob(".*.tmp"))]


@pytest.mark.slow
def test_a_signal_to_the_process_group_stops_a_run_with_loader_workers_in_one_line(tmp_path):
    """A scheduler signals every process of the job: DataLoader workers too. They leave the stop
    to the main process (a worker killed by SIGTERM made PyTorch print "DataLoader worker is
    killed by signal" tracebacks beside the run's own line)."""
    from places import image_tree

    root = image_tree(tmp_path / "tree", per_class=60)
    args = [
        "dataset=image_folder",
        f"dataset.root={root}",
        "dataset.image_size=12",
        "trainer.batching=workers",
        "trainer.num_workers=2",
        "trainer.batch_size=16",
        "trainer.device=cpu",
        "dense.epochs=2",
    ]
    out = tmp_path / "run"
    command, env = _icep_command(args, out, tmp_path / "cache", None)
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a scheduler's job
    )
    wait_for_steps(out / "metrics.jsonl", 1, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and err.startswith("icep: interrupted by SIGTERM"), err
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
