"""Files written so that a kill at any moment leaves the old file or the new one, never half of
one. Standard library only: the logs and the views use it without loading torch."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from icep.interrupts import uninterruptible


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError ``exc`` was raised while handling, if any (its ``__context__`` chain)."""
    seen: set[int] = set()
    link = exc.__context__
    while link is not None and id(link) not in seen:
        if isinstance(link, OSError) and link.errno is not None:
            return link
        seen.add(id(link))
        link = link.__context__
    return None


def _umask() -> int:
    """The process's umask (reading it means setting it: put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write through a temp file in the same folder, fsync, then rename over ``path``: a kill at
    any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with uninterruptible():  # SIGTERM or Ctrl-C meanwhile stops the run after the write
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            try:
                os.replace(tmp, path)
            except IsADirectoryError as exc:  # name the file icep meant, not its temp file
                raise IsADirectoryError(exc.errno, exc.strerror, str(path)) from None
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            # torch.save reports a failed write (a full disk) as a RuntimeError from its C++
            # writer, with the OSError only as the context: raise that, naming the file.
            error = _os_error_in(exc) if isinstance(exc, RuntimeError) else None
            if error is not None:
                raise OSError(error.errno, error.strerror, str(path)) from exc
            raise
