"""Resuming a run: the checkpoint a run folder holds, whether this job may continue it (resume=true,
or a requeued Slurm or submitit job), and the earlier run's .hydra/ files that a refused start puts
back."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
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
        if summary.is_file() and _status(summary) == "completed":
            return "completed"
        if held:
            _check_same_config(_saved_config(out), config, overrides, out)
        log.warning("resume: %s has no checkpoint yet; starting the run from the beginning", out)
        return None
    try:
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


def _status(summary: Path) -> str | None:
    try:
        return json.loads(summary.read_text()).get("status")
    except (ValueError, AttributeError):  # damaged, or not an object: not a completed run
        return None


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


# Hydra writes .hydra/*.yaml into the run folder before icep starts: when that folder holds an
# earlier run, its files are kept here so that a start icep refuses can put them back.
_earlier_hydra_files: dict[Path, bytes] = {}


class KeepEarlierRun(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks) that snapshots the .hydra/*.yaml an
    earlier start left in ``hydra.run.dir``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out, sub = Path(str(config.hydra.run.dir)), config.hydra.output_subdir
        if sub is not None:  # any earlier start's, a run still going on included
            _earlier_hydra_files.update({f: f.read_bytes() for f in (out / sub).glob("*.yaml")})


def put_back_earlier_hydra_files() -> None:
    """Restore the earlier run's .hydra/*.yaml that :class:`KeepEarlierRun` kept, if any."""
    for path, data in _earlier_hydra_files.items():
        path.write_bytes(data)
