"""Fault injection for the tests, kept out of the package: ``python tests/faults.py
--kill-in-checkpoint STEP ARGS...`` runs ``python -m icep ARGS...`` and SIGKILLs it while it
writes step STEP's checkpoint, after the new file's bytes went out and before the rename over the
previous checkpoint, so that a stale ``.checkpoint.pt.*.tmp`` stays and the previous checkpoint
is the one to resume from."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys


def kill_in_checkpoint(step: int) -> None:
    """Make the pruning run kill this process inside step ``step``'s checkpoint write."""
    from icep.pipelines import base

    atomic_open, save_checkpoint = base.atomic_open, base.PruningRun.save_checkpoint

    @contextlib.contextmanager
    def atomic_open_then_die(path, mode="wb"):
        with atomic_open(path, mode) as f:
            yield f
            f.flush()  # the new file half-way in: written, neither synced nor renamed
            os.kill(os.getpid(), signal.SIGKILL)

    def save_checkpoint_or_die(run) -> None:
        base.atomic_open = atomic_open_then_die if len(run.rows) == step else atomic_open
        save_checkpoint(run)

    base.PruningRun.save_checkpoint = save_checkpoint_or_die


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kill-in-checkpoint",
        type=int,
        required=True,
        metavar="STEP",
        help="SIGKILL the run while it writes the checkpoint after step STEP",
    )
    parser.add_argument("icep_args", nargs=argparse.REMAINDER, help="python -m icep's arguments")
    args = parser.parse_args()
    kill_in_checkpoint(args.kill_in_checkpoint)
    sys.argv = [sys.argv[0], *args.icep_args]  # what Hydra parses

    from icep.app import main as icep_main

    icep_main()


if __name__ == "__main__":
    main()
