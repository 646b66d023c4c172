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
_stopping = False  # Interrupted was raised: the run is stopping, further signals change nothing
_active = 0  # nesting of stop_on_signals() blocks


def _handler(signum: int, frame) -> None:
    global _pending
    if _stopping:  # a second Ctrl-C, or SIGTERM to the process and to its group: one stop
        return
    if _depth:
        _pending = signum
        return
    _stop(signum)


def _stop(signum: int) -> None:
    global _stopping
    _stopping = True
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
        _stop(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the block (main thread only;
    SIGTERM is left to submitit in its jobs), and put the earlier handlers back after it."""
    global _pending, _stopping, _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT]
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        signals.append(signal.SIGTERM)
    earlier = {s: signal.signal(s, _handler) for s in signals}
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        for s, handler in earlier.items():
            signal.signal(s, handler)
        if not _active:
            _pending, _stopping = None, False


_STOPS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back for the block in this thread, and in the processes and
    threads it starts meanwhile (they inherit the mask); held signals arrive when it ends. Around
    starting DataLoader workers: a forked worker must not meet the run's handler (it would raise
    Interrupted in a copy of the run) before :func:`leave_signals_to_the_main_process`."""
    earlier = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        with uninterruptible():  # one that came just before the mask: at the end, too
            yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, earlier)


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGINT and ends quietly (exit code 0)
    on SIGTERM, then lets through what :func:`signals_held` held. A scheduler, or Ctrl-C in a
    terminal, signals the whole process group: a worker killed by the signal makes PyTorch raise
    "DataLoader worker is killed by signal" in the main process, over its own stop. The main
    process stops at a safe point and shuts down the workers left. (A worker must still end on
    SIGTERM: Python's exit terminates the daemon processes left, and waits for them.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_worker)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    threading.excepthook = _quiet_when_hung_up


def _end_worker(signum: int, frame) -> None:
    os._exit(0)


def _quiet_when_hung_up(args: threading.ExceptHookArgs) -> None:
    """A worker's threads (multiprocessing's resource sharer, which hands batches' file
    descriptors to the main process) meet a closed connection when a stopped main process shuts
    the workers down mid-batch: no traceback for that."""
    if not issubclass(args.exc_type, (ConnectionError, EOFError)):
        threading.__excepthook__(args)
