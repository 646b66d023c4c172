"""Resuming a run: the checkpoint a run folder holds, whether this job may continue it (resume=true,
or a requeued Slurm or submitit job), and the earlier run's .hydra/ files that a refused start puts
back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from icep.errors import IcepError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
LOCK = ".icep.lock"  # held by the run using the folder (icep.locks)
RUN_CONFIG = ".icep-config.json"  # the config of the run in the folder, from its start
# What a run leaves in its folder: a folder holding any of these holds a run.
STATE = (CHECKPOINT, "summary.json", "tune.db", "metrics.jsonl", "model.pt")
# Keys that do not change what a run computes: a resume may differ in them.
_RESUME_FREE = (
    "resume",
    "logger",
    "paths",
    "optuna",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.prefetch_factor",
)


def fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` flattened to dotted keys, without the keys a resume may change."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(config, "")
    return {
        k: v
        for k, v in flat.items()
        if not any(k == f or k.startswith(f + ".") for f in _RESUME_FREE)
    }


def resume_from(
    cfg: DictConfig, out: Path, config: dict[str, Any], overrides: list[str] = ()
) -> dict[str, Any] | str | None:
    """The checkpoint to continue from, "completed" when the run folder holds a finished run, or
    None to start afresh. A folder that already holds a run (any of :data:`STATE`) is never
    overwritten, and never continued by another config, checkpoint or not (a tuning search
    killed before the first pruning step leaves only its study).

    A key the saved config lacks was added to icep since it was written: unless the command
    line (``overrides``) sets it, it holds its default, which by icep's rule for new keys
    computes what the run did before, so it does not block the resume."""
    from icep.pipelines.base import CHECKPOINT_FORMAT

    path, summary = out / CHECKPOINT, out / "summary.json"
    requeued = path.is_file() and _requeued(out)
    held = [name for name in STATE if (out / name).exists()]
    if not (cfg.resume or requeued):
        if held:
            raise IcepError(
                f"{out} already holds a run ({held[0]}); resume=true continues it, or choose "
                "another hydra.run.dir"
            )
        return None
    for stale in out.glob(".*.tmp"):  # atomic writes a kill cut short (icep.serialization)
        stale.unlink()
    if not path.is_file():
        status = _status(summary) if summary.is_file() else None
        if status == "completed":
            return "completed"
        if status is _DAMAGED:
            raise IcepError(
                f"resume: {summary} is not a summary icep wrote (not a JSON object) and there is "
                "no checkpoint: the run there may have finished; move its files away to run it "
                "again, or start a new run folder"
            )
        if held:
            _check_same_config(_saved_config(out), config, overrides, out)
        log.warning("resume: %s has no checkpoint yet; starting the run from the beginning", out)
        return None
    try:
        import torch  # here: `icep --cfg job` and --hydra-help need no torch

        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IcepError(
            f"resume: {path} cannot be read ({type(exc).__name__}); it is damaged: delete it to "
            "start the run again from the beginning"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise IcepError(f"resume: {path} is not an icep checkpoint ({CHECKPOINT_FORMAT})")
    wrong = _malformed(blob)
    if wrong:
        raise IcepError(
            f"resume: {path} is not a checkpoint icep wrote ({wrong}); it was edited or damaged: "
            "delete it to start the run again from the beginning"
        )
    _check_same_config(blob.get("config") or {}, config, overrides, out)
    log.info("resume: continuing %s after step %d", out, blob["steps"])
    return blob


# What a checkpoint must hold for a resume to trust it (icep.pipelines.base.save_checkpoint).
_CHECKPOINT_TYPES = {
    "state_dict": dict,
    "layers": dict,
    "steps": int,
    "rows": list,
    "decision_split": str,
    "finetunes": int,
    "state": dict,
    "timer": dict,
    "rng": dict,
}


def _malformed(blob: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's layout, or None."""
    for key, kind in _CHECKPOINT_TYPES.items():
        if not isinstance(blob.get(key), kind):
            return f"its {key!r} is {type(blob.get(key)).__name__}, not {kind.__name__}"
    if not all(isinstance(row, dict) for row in blob["rows"]):
        return "its rows are not all mappings"
    if blob["steps"] != len(blob["rows"]):
        return f"{blob['steps']} steps but {len(blob['rows'])} rows"
    return None


_DAMAGED = object()  # what _status says of a summary.json icep cannot have written


def _status(summary: Path) -> Any:
    """The run's status in ``summary`` (None: it names none), or :data:`_DAMAGED`."""
    try:
        status = json.loads(summary.read_text(errors="replace"))
    except ValueError:  # icep writes it atomically: a hand edit or a damaged disk
        return _DAMAGED
    return status.get("status") if isinstance(status, dict) else _DAMAGED


def save_run_config(out: Path, config: dict[str, Any]) -> None:
    """Note the config of the run in ``out`` (its :func:`fingerprint`), so that a later start
    there is checked against it even before the first checkpoint."""
    from icep.loggers import write_json

    write_json(out / RUN_CONFIG, config)


def _saved_config(out: Path) -> dict[str, Any]:
    try:
        saved = json.loads((out / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return {}  # a folder from before icep noted its config
    return saved if isinstance(saved, dict) else {}


def _check_same_config(
    saved: dict[str, Any], config: dict[str, Any], overrides: list[str], out: Path
) -> None:
    """Refuse to continue the run in ``out`` with a config other than its own (``saved``;
    empty: not known)."""
    if not saved:
        return
    named = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    added = sorted(
        k
        for k in set(config) - set(saved)
        if not any(k == n or k.startswith(n + ".") for n in named)
    )
    if added:
        log.info("resume: keys new since the checkpoint, at their defaults: %s", ", ".join(added))
    differ = sorted(
        k for k in set(saved) | set(config) if k not in added and saved.get(k) != config.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}={saved.get(k)!r} there, {config.get(k)!r} now" for k in differ[:3])
        raise IcepError(
            f"resume: {out} holds a run of another config ({shown}"
            f"{', ...' if len(differ) > 3 else ''}); resume it with the same overrides, or start "
            "a new run folder"
        )


JOB_MARK = ".icep-job"  # the scheduler job that wrote the run folder's checkpoint


def _scheduler_job() -> str | None:
    """The id of the Slurm or submitit job running this process, or None. A requeued job keeps
    its id (``scontrol requeue``; submitit's local executor restarts the same job)."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return str(submitit.JobEnvironment().job_id)
    if os.environ.get("SLURM_JOB_ID"):
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array[0]}_{array[1]}" if all(array) else os.environ["SLURM_JOB_ID"]
    return None


def _requeued(out: Path) -> bool:
    """Whether this job is a requeue of the one that checkpointed in ``out``: Slurm says so
    (``SLURM_RESTART_COUNT`` > 0), or the folder's job mark names this job. A new job meeting
    an old checkpoint is no requeue: it needs resume=true."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return True
    job, mark = _scheduler_job(), out / JOB_MARK
    return job is not None and mark.is_file() and mark.read_text().strip() == job


def mark_job(out: Path) -> None:
    """Note the scheduler job that runs in ``out``, so its requeue finds its checkpoint."""
    job = _scheduler_job()
    if job is not None:
        (out / JOB_MARK).write_text(job + "\n")


# Before icep starts, Hydra writes .hydra/*.yaml into the run folder and opens its log file there
# (icep.log, appended to). When that folder already holds something, what those files were is
# kept here, so that a start icep refuses leaves the folder byte for byte as it was.
_earlier_files: dict[Path, bytes] = {}  # .hydra/* as they were
_hydra_dirs: list[Path] = []  # the .hydra folders to keep to those files
_earlier_logs: dict[Path, int] = {}  # each log's size before (-1: it was not there)


class KeepEarlierRun(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks) that notes what a start is about to
    change in a ``hydra.run.dir`` already holding files (:func:`put_back_earlier_files`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            out = Path(str(config.hydra.run.dir))
            if not (out.is_dir() and any(out.iterdir())):
                return  # a new folder: Hydra's files stay, as after any Hydra run
            if config.hydra.output_subdir is not None:
                sub = out / config.hydra.output_subdir
                _hydra_dirs.append(sub)
                _earlier_files.update({f: f.read_bytes() for f in sub.glob("*") if f.is_file()})
            log = out / f"{config.hydra.job.name}.log"
            _earlier_logs[log] = log.stat().st_size if log.is_file() else -1
        except OSError:  # a folder that cannot be made or read: the run fails on it, in one line
            return


def folder_taken() -> None:
    """The run goes on in its folder (new, or one it resumes): its files are its own now."""
    _earlier_files.clear()
    _hydra_dirs.clear()
    _earlier_logs.clear()


def put_back_earlier_files() -> None:
    """Leave a folder that held files before this start as it was (the start was refused or
    failed before :func:`folder_taken`): Hydra's .hydra/* put back, its log cut back."""
    for sub in _hydra_dirs:
        for path in sub.glob("*"):
            if path.is_file() and path not in _earlier_files:
                path.unlink()
        if not _earlier_files and sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    for path, data in _earlier_files.items():
        path.write_bytes(data)
    for log, size in _earlier_logs.items():
        if size < 0:
            log.unlink(missing_ok=True)
        elif log.is_file():
            os.truncate(log, size)
    folder_taken()
