"""``python -m icep`` with what only tests may do to it, kept out of the package:

    python tests/harness.py [--kill-in-checkpoint STEP] [--scripted-accuracy]
                            [--fail-on-rank RANK:STEP[:kill]] ARGS...

``--kill-in-checkpoint STEP`` SIGKILLs the run while it writes step STEP's checkpoint, after the
new file's bytes went out and before the rename over the previous checkpoint, so that a stale
``.checkpoint.pt.*.tmp`` stays and the previous checkpoint is the one to resume from.

``--scripted-accuracy`` makes every evaluation read :class:`ScriptedAccuracy`'s numbers instead
of the model's, so a test of a decision (ICE's trigger, a tuning pruner) never hinges on the
floats of training, which differ across CPUs and thread counts. Training is real.

``--fail-on-rank RANK:STEP`` makes rank RANK of a data-parallel run (torchrun runs this script on
every rank) fail with an error at step STEP, as a GPU running out of memory there would;
``RANK:STEP:kill`` SIGKILLs that rank instead, as the kernel's out-of-memory killer would."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

import torch

from icep.train import Trainer


class ScriptedAccuracy(Trainer):
    """Every evaluation reads 90% less 2 points per prune since the last fine-tune (a prune: the
    model has fewer parameters than at the evaluation before). With thre = 3, ICE's trigger fires
    at every second step; with thre = 0 at every step, and the accuracy is back at 90% after
    each fine-tune."""

    def __init__(self, device: torch.device | str = "cpu", **settings):
        super().__init__(torch.device(device), **settings)

    def fit(self, *args, **kwargs):
        self._prunes = 0
        return super().fit(*args, **kwargs)

    def evaluate(self, model, loader, desc="eval"):
        params = sum(p.numel() for p in model.parameters())
        last = getattr(self, "_params", None)
        if last is not None and params < last:
            self._prunes = getattr(self, "_prunes", 0) + 1
        self._params = params
        return 90.0 - 2.0 * getattr(self, "_prunes", 0)


def script_accuracy() -> None:
    """Make every Trainer of this process evaluate as :class:`ScriptedAccuracy` does."""
    fit = Trainer.fit

    def scripted_fit(self, *args, **kwargs):
        self._prunes = 0
        return fit(self, *args, **kwargs)

    Trainer.fit = scripted_fit
    Trainer.evaluate = ScriptedAccuracy.evaluate


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

    def save_checkpoint_or_die(run, *args, **kwargs) -> None:
        base.atomic_open = atomic_open_then_die if len(run.rows) == step else atomic_open
        save_checkpoint(run, *args, **kwargs)

    base.PruningRun.save_checkpoint = save_checkpoint_or_die


def fail_on_rank(rank: int, step: int, kill: bool) -> None:
    """Make rank ``rank`` of a data-parallel run fail (or die, with ``kill``) when it records
    step ``step``, before the others have."""
    if int(os.environ.get("RANK", 0)) != rank:
        return
    from icep.errors import IcepError
    from icep.pipelines import base

    record = base.PruningRun.record

    def record_or_fail(run, *args, **kwargs):
        if len(run.rows) + 1 == step:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise IcepError(f"step {step}: out of GPU memory on rank {rank} (injected by a test)")
        return record(run, *args, **kwargs)

    base.PruningRun.record = record_or_fail


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kill-in-checkpoint",
        type=int,
        metavar="STEP",
        help="SIGKILL the run while it writes the checkpoint after step STEP",
    )
    parser.add_argument(
        "--scripted-accuracy", action="store_true", help="evaluations read scripted numbers"
    )
    parser.add_argument(
        "--fail-on-rank",
        metavar="RANK:STEP[:kill]",
        help="rank RANK fails (or is SIGKILLed) at step STEP",
    )
    parser.add_argument("icep_args", nargs=argparse.REMAINDER, help="python -m icep's arguments")
    args = parser.parse_args()
    if args.kill_in_checkpoint is not None:
        kill_in_checkpoint(args.kill_in_checkpoint)
    if args.scripted_accuracy:
        script_accuracy()
    if args.fail_on_rank:
        rank, step, *how = args.fail_on_rank.split(":")
        fail_on_rank(int(rank), int(step), how == ["kill"])
    sys.argv = [sys.argv[0], *args.icep_args]  # what Hydra parses

    from icep.app import main as icep_main

    icep_main()


if __name__ == "__main__":
    main()
