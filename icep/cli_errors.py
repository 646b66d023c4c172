"""Errors the user can fix, as one line on stderr (``icep: error: ...``) and exit code 2; a bug
keeps its traceback."""

from __future__ import annotations

import errno
import importlib.resources
import re
import subprocess
import sys
import traceback
from pathlib import Path

from icep.errors import IcepError


def exit_with(message: str) -> None:
    """Print ``message`` as icep's one error line and exit with code 2."""
    print(f"icep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``raise ... from``), outermost first. Not
    the ones it was raised while handling: that would pass a bug off as the error it hit."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__
    return chain


# Errors of the file system the user can fix: permissions, a read-only or full disk, a file where
# a folder should be.
_FILE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
    errno.ENAMETOOLONG,
    errno.EISDIR,
}


def _describe_os_error(exc: BaseException, error: OSError) -> str:
    where = f"{error.strerror or error}: {error.filename}" if error.filename else str(error)
    frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    if error.errno == errno.ENAMETOOLONG:
        return (
            f"{where}: a folder or file name is over the file system's limit (255 bytes); "
            "shorten name=... (or hydra.run.dir=..., paths.outputs=...)"
        )
    # Hydra setting up the run folder: run_job failed before it called the app's _app
    if "run_job" in frames and "_app" not in frames:
        return (
            f"cannot create the run folder ({where}); pick a writable folder with "
            "hydra.run.dir=... (hydra.sweep.dir=... with -m) or paths.outputs=..."
        )
    if error.errno == errno.EISDIR:
        return f"{where}: a folder is where icep writes a file; move it away, or use another folder"
    if error.errno == errno.EFBIG:
        return (
            f"{where}; the file size limit (ulimit -f) is too low for it: raise it, or write "
            "elsewhere with paths.outputs=... / paths.cache=..."
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}; free some space, or write elsewhere with paths.outputs=... / paths.cache=..."
        )
    return (
        f"{where}; fix its permissions, or use other folders: paths.outputs=..., paths.cache=... "
        "(or $ICEP_CACHE), dataset.root=..."
    )


def describe_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    torch = sys.modules.get("torch")  # a CUDA out-of-memory error comes with torch loaded
    out_of_memory = torch.cuda.OutOfMemoryError if torch is not None else ()
    chain = _chain(exc)
    for link in chain:  # e.g. a builder's ConfigError inside Hydra's InstantiationException
        if isinstance(link, IcepError):
            return str(link)
    for link in chain:
        if isinstance(link, out_of_memory):  # outside the trainer's loops
            what, *detail = (part.rstrip(".") for part in one_line(link).split(". "))
            return (
                f"{what}{f' ({detail[0]})' if detail else ''}; lower trainer.batch_size and "
                "trainer.eval_batch_size, or free the GPU of other work"
            )
        if isinstance(link, OSError) and link.errno in _FILE_ERRNOS:
            return _describe_os_error(exc, link)
    for link in chain:  # the submitit launcher's sbatch call
        if (
            isinstance(link, subprocess.CalledProcessError)
            and Path(str(link.cmd[0])).name == "sbatch"
        ):
            said = one_line(RuntimeError(link.stderr or link.output or f"exit {link.returncode}"))
            return (
                f"sbatch refused the sweep ({said}); check the hydra.launcher.* keys "
                "(partition, account, qos, gpus_per_node, mem_gb, timeout_min: "
                "conf/hydra/launcher/slurm.yaml)"
            )
    if isinstance(exc, ValueError) and str(exc).startswith("Only one of --run, --multirun"):
        return f"{exc}: print a multirun's config with --cfg job, without -m"
    if 'Could not detect "srun"' in str(exc):
        return (
            "hydra/launcher=slurm needs a Slurm cluster (no srun on PATH here); on one machine "
            "use hydra/launcher=local"
        )
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        options = f"{group}={name} is not an option; choose one of: {', '.join(exc.options)}"
        folder = importlib.resources.files("icep.conf").joinpath(group)
        # Options registered in code (the sweeper's) have no folder to point to.
        return f"{options} (conf/{group}/)" if folder.is_dir() else options
    cause = exc.__cause__
    if isinstance(exc, ConfigCompositionException) and isinstance(
        cause, (ConfigKeyError, ConfigAttributeError)
    ):
        key = cause.full_key or cause.key
        parent = cause.parent_node
        known = f"; keys there: {', '.join(map(str, parent.keys()))}" if parent is not None else ""
        return f"{key} is not a config key{known} (to add a new key use +{key}=...)"
    if "missing EQUAL at '<EOF>'" in str(exc):  # a word with no '=': a value split at a space
        (word,) = re.findall(r"override '([^']*)'", str(exc))[:1] or ["?"]
        return (
            f"'{word}' on the command line is not KEY=VALUE; a value holding a space must be "
            "quoted: 'dataset.root=/my data' (a key alone to remove: ~KEY)"
        )
    if "requires --multirun" in str(exc):
        (override,) = re.findall(r"'([^']*)'", str(exc))[:1] or ["KEY=EXPR"]
        key, _, expression = override.partition("=")
        if key.lstrip("+").startswith(("tune.space", "pipeline.grid", "pipeline.ranges")):
            return (
                f"{override}: quote the search expression so Hydra keeps it as text: "
                f"'{key}=\"{expression}\"'"
            )
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        text = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if cause is not None and str(cause).strip():
            text.append(str(cause).strip().splitlines()[0])
        return " ".join(text)
    return None


def run_command(body, *args) -> None:
    """``body(*args)`` as a command-line tool (``python -m icep.eval``, ``icep.export``):
    errors the user can fix end as one line and exit code 2, a signal as one line and 128 + its
    number."""
    from icep.interrupts import Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            body(*args)
    except Interrupted as exc:
        print(f"icep: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        exit_with(message)
