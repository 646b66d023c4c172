"""Stopping a run on SIGTERM (what Slurm and most schedulers send before a kill) or SIGINT
(Ctrl-C). While :func:`stop_on_signals` is active, either signal raises :class:`Interrupted` in
the main thread, except inside a write that must finish (:func:`uninterruptible`: checkpoints,
metrics rows, summaries), where it waits until the write is done. The run then records
``"status": "interrupted"`` and ends with one line; ``resume=true`` continues it from its last
checkpoint.

Inside a submitit job (``hydra/launcher=slurm``) SIGTERM stays submitit's: it requeues the job on
the time-limit warning and lets the requeued job resume on its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signum`` is the signal's number. A KeyboardInterrupt,
    so ``except Exception`` handlers (and Optuna's ``catch``) let it through, as they do Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum

    def __reduce__(self):
        return (type(self), (self.signum,))


_depth = 0  # nesting of uninterruptible() blocks
_pending: int | None = None  # a signal that arrived inside one


def _handler(signum: int, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A block a signal does not cut short: one that arrives meanwhile raises
    :class:`Interrupted` when the block has finished (unless the block itself raised)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the block (main thread only;
    SIGTERM is left to submitit in its jobs), and put the earlier handlers back after it."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT]
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        signals.append(signal.SIGTERM)
    earlier = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, handler in earlier.items():
            signal.signal(s, handler)
        _pending = None
