"""Locks between icep processes: a run folder is used by one run at a time (a second one is
refused), and a dense model in the cache is trained by one run at a time (the others wait for it,
then load it). POSIX advisory locks (``fcntl.flock``) on a small file beside what they guard: the
kernel drops them when the process dies, so a killed run never leaves a folder locked."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from icep.errors import IcepError

log = logging.getLogger(__name__)


# The file descriptors of the locks this process holds. A lock belongs to the open file, which a
# forked child (a DataLoader worker) shares: the child lets go of it at once, or a worker outliving
# a killed run would keep its folder locked.
_held: set[int] = set()


def _let_go_in_child() -> None:
    if not _held:
        return
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in _held:
        os.dup2(null, fd)  # the fd now names /dev/null: the lock's file is the parent's alone
    os.close(null)
    _held.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def _holder(f) -> str:
    f.seek(0)
    pid = f.read().strip()
    return f" (pid {pid})" if pid else ""


@contextlib.contextmanager
def locked(path: Path, what: str, *, wait: bool, refusal: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block. When another process holds it: with
    ``wait``, log that and wait for it; without, raise an IcepError naming ``what`` and
    ``refusal`` (the way out). A file system without locks (some network mounts) is used
    unlocked, with a warning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise IcepError(
                        f"{what} is in use by another icep run{_holder(f)}; {refusal}"
                    ) from None
                log.info("waiting for another icep run%s to finish with %s", _holder(f), what)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks on this file system
            log.warning("cannot lock %s (%s); going on without the lock", path, exc.strerror)
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        _held.add(f.fileno())
        try:
            yield
        finally:
            _held.discard(f.fileno())
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
