"""The closing lines of a multirun: where its runs are, how they ended, the command that compares
them and where the launcher's logs are. A Hydra callback (conf/config.yaml, hydra.callbacks)
notes the sweep when it starts; ``icep run`` prints the lines when it ends, however it ends (a
failed job makes Hydra raise past ``on_multirun_end``)."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

_sweeps: list[tuple[Path, str | None]] = []  # (sweep folder, launcher log folder) begun here


class NoteSweep(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.get("launcher") or {}
        logs = (
            launcher.get("submitit_folder") if "submitit" in str(launcher.get("_target_")) else None
        )
        if logs is not None:  # e.g. <sweep>/.submitit/%j: the folder above the job-id part
            logs = str(Path(*[p for p in Path(str(logs)).parts if "%" not in p]))
        _sweeps.append((Path(str(config.hydra.sweep.dir)), logs))


def forget_sweeps() -> None:
    _sweeps.clear()


def closing_lines() -> list[str]:
    """The lines for each sweep begun in this process that started a job, once."""
    lines = []
    while _sweeps:
        sweep, logs = _sweeps.pop(0)
        lines += sweep_lines(sweep, logs)
    return lines


def sweep_lines(sweep: Path, logs: str | None) -> list[str]:
    statuses = Counter(_status(job) for job in _jobs(sweep))
    runs = sum(statuses.values())
    if not runs:
        return []  # refused before any job started: the error says why
    how = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
    lines = [
        f"icep: {runs} run{'s' if runs != 1 else ''} in {sweep}/ ({how})",
        f"icep: compare them: icep report {shlex.quote(str(sweep))}",
    ]
    if logs:
        lines.append(f"icep: launcher logs (submitit): {logs}/")
    else:
        lines.append(f"icep: each run's log: {sweep}/<job>/icep.log")
    return lines


def _jobs(sweep: Path) -> list[Path]:
    try:
        return [job for job in sweep.iterdir() if (job / ".hydra").is_dir()]
    except OSError:  # no folder: nothing ran
        return []


def _status(job: Path) -> str:
    try:
        return str(json.loads((job / "summary.json").read_text()).get("status", "unknown"))
    except FileNotFoundError:
        return "not finished"
    except (OSError, ValueError):
        return "unreadable"
