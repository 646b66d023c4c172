"""What produced a run, for its summary.json: the versions of Python and the libraries, and the
git commits of icep's source and of the folder the run was started from (a model or dataset of
the user's own lives there), each with whether it had uncommitted changes."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# Beside what a model file records (icep.serialization.versions): what a run's result depends on.
RUN_PACKAGES = ("numpy", "optuna", "hydra-core", "omegaconf", "wandb")


def run_versions() -> dict[str, str | None]:
    from icep.serialization import versions

    found = versions()
    for package in RUN_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{repo, commit, dirty}`` of the git checkout holding ``folder``; None outside one, or
    without git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "--show-toplevel", "HEAD")
    if head is None or len(head.split("\n")) != 2:
        return None
    repo, commit = head.split("\n")
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"repo": repo, "commit": commit, "dirty": None if changes is None else bool(changes)}


def run_git(workdir: Path) -> dict[str, dict[str, Any]]:
    """``{"icep": ..., "workdir": ...}`` for those in a git checkout (an installed icep has
    none); the folder's is left out when it is icep's own checkout."""
    found = {"icep": git_state(Path(__file__).resolve().parent), "workdir": git_state(workdir)}
    if found["icep"] is not None and found["icep"] == found["workdir"]:
        del found["workdir"]
    return {name: state for name, state in found.items() if state is not None}
