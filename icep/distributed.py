"""One run on several processes: PyTorch's DistributedDataParallel, started by ``torchrun`` on one
machine or by the tasks of a Slurm (or local submitit) job, ``hydra.launcher.tasks_per_node``,
on several.

Every rank runs the whole pipeline on its shard of each batch (:mod:`icep.data`) and makes the same
decisions as the others: evaluations and criterion scores are reduced across the ranks, each
training wraps the model in DDP (anew after a prune or a freeze changed it), and what rank 0
decides alone (a resume's checkpoint, whether the dense model is cached, measured latencies) is
sent to the others. Only rank 0 writes: metrics, summary, checkpoints, the model, W&B, the
dense-model cache.

A rank that fails tells the others through the process group's store: the first failure of the run
prints its one line, the other ranks end quietly, and a rank blocked in a collective that would
wait for the failed one is ended after :data:`GRACE_S` seconds (a dead peer otherwise holds an
NCCL collective until its timeout).

Environment: ``ICEP_DIST_BACKEND`` (default ``gloo`` on the CPU, ``cpu:gloo,cuda:nccl`` with CUDA)
and ``ICEP_DIST_TIMEOUT_S`` (default 1800: how long a collective waits for a late rank).
A run on one process uses none of this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from icep.errors import IcepError

log = logging.getLogger(__name__)

T = TypeVar("T")

GRACE_S = 10.0  # after another rank failed: time this one has to fail on its own, quietly
_FAILURES = "icep/failures"  # store keys: how many ranks failed, and the first one's line
_FIRST = "icep/first-failure"


@dataclass(frozen=True)
class World:
    """This process's place in the run: its ``rank`` of ``size``, and ``local_rank`` on its
    machine (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_world = World()
_failed_here = False  # this rank reported a failure: its watcher leaves it alone
_watching = threading.Event()  # set while the watcher thread should run
_alone = 0  # nesting of alone(): rank 0 computing by itself, no collectives


def world() -> World:
    return _world


def active() -> bool:
    """Whether this run has more than one rank, and this code runs on all of them (not in
    :func:`alone`): whether training, evaluations and scores go across the ranks."""
    return _world.size > 1 and not _alone


def _joined() -> bool:
    return _world.size > 1


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """A block rank 0 runs by itself (:func:`on_main`): what it trains, evaluates or scores there
    is its own, with no collective the other ranks would have to join."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def is_main() -> bool:
    """Whether this process writes the run's files (rank 0, or the only process)."""
    return _world.rank == 0


def launched() -> World:
    """The ranks the launcher started: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, or the
    tasks of a submitit job (Slurm or local), whose rendezvous (``MASTER_ADDR``/``MASTER_PORT``:
    the first node, a port drawn from the job id) is exported here as torchrun would set it."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        if submitit.JobEnvironment().num_tasks > 1:
            found = TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
            return World(found.rank, found.world_size, found.local_rank)
    return World()


def start() -> World:
    """Join the run's other ranks when the launcher started several (idempotent); this
    process's :class:`World`. A rank that cannot join fails in one line."""
    global _world
    found = launched()
    if _world.size > 1 or found.size == 1:
        return _world
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = os.environ.get("ICEP_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        from datetime import timedelta

        dist.init_process_group(
            backend,
            rank=found.rank,
            world_size=found.size,
            timeout=timedelta(seconds=float(os.environ.get("ICEP_DIST_TIMEOUT_S", 1800))),
        )
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IcepError(
            f"rank {found.rank} of {found.size} cannot join the others at {where} ({first}); "
            "start every rank with the same MASTER_ADDR and MASTER_PORT (torchrun sets them), "
            "or set ICEP_DIST_BACKEND to a backend this machine has (gloo, nccl)"
        ) from None
    _world = found
    _watching.set()
    threading.Thread(target=_watch, name="icep-peer-watch", daemon=True).start()
    log.info("rank %d of %d (%s), backend %s", found.rank, found.size, where, backend)
    return _world


def finish() -> None:
    """Leave the process group at the end of a run that ended well on every rank."""
    global _world
    if not _joined():
        return
    import torch.distributed as dist

    _watching.clear()
    dist.barrier()  # no rank leaves while another still needs it
    dist.destroy_process_group()
    _world = World()


# --- collectives -------------------------------------------------------------------------------


def _reduce(tensor: Any, op: str) -> Any:
    if active():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def sum_across(tensor: Any) -> Any:
    """``tensor`` summed over the ranks, in place (the tensor itself on one process)."""
    return _reduce(tensor, "SUM")


def max_across(tensor: Any) -> Any:
    """``tensor``'s largest value over the ranks, in place."""
    return _reduce(tensor, "MAX")


def min_across(tensor: Any) -> Any:
    """``tensor``'s smallest value over the ranks, in place."""
    return _reduce(tensor, "MIN")


def mean_across(tensor: Any) -> Any:
    """``tensor`` averaged over the ranks, as a new tensor (the tensor itself on one process):
    every rank then holds the same numbers."""
    if not active():
        return tensor
    return sum_across(tensor.clone()).div_(_world.size)


def on_main(compute: Callable[[], T]) -> T | None:
    """Run ``compute`` on rank 0 only (what it writes or decides alone), the others waiting for
    it: its value on rank 0, None on the others. When it raises on rank 0, rank 0 raises it and
    the others end quietly (:class:`PeerFailed`)."""
    if not active():
        return compute()
    return _from_main(compute, share=False)


def from_main(compute: Callable[[], T]) -> T:
    """What ``compute`` gives on rank 0, on every rank (computed there only, sent pickled); fails
    as :func:`on_main`."""
    if not active():
        return compute()
    return _from_main(compute, share=True)


def _from_main(compute: Callable[[], T], share: bool) -> Any:
    import torch.distributed as dist

    box: list[Any] = [None]
    value = None
    if _world.main:
        try:
            with alone():
                value = compute()
        except BaseException:
            box[0] = ("failed", None)
            dist.broadcast_object_list(box, src=0)
            raise
        box[0] = ("ok", value if share else None)
    dist.broadcast_object_list(box, src=0)
    status, sent = box[0]
    if status != "ok":
        raise PeerFailed("rank 0 failed")
    return value if _world.main else sent


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's ``value`` by rank, on rank 0; None on the others (a single process: [value])."""
    if not active():
        return [value]
    import torch.distributed as dist

    found: list[Any] | None = [None] * _world.size if _world.main else None
    dist.gather_object(value, found, dst=0)
    return found


def sync_module(model: Any) -> None:
    """Rank 0's parameters and buffers, in place, on every rank (the same model everywhere)."""
    if not active():
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def sync_buffers(model: Any) -> None:
    """Rank 0's buffers (BatchNorm running statistics), in place, on every rank. DDP sends them
    before each forward; the last batch's update is each rank's own until this."""
    if not active():
        return
    import torch.distributed as dist

    for tensor in model.buffers():
        dist.broadcast(tensor.data, src=0)


def check_same(what: str, value: Any) -> None:
    """Raise IcepError unless ``value`` (small, picklable) is the same on every rank."""
    if not active():
        return
    import torch.distributed as dist

    found: list[Any] = [None] * _world.size
    dist.all_gather_object(found, value)
    differ = [r for r, v in enumerate(found) if v != found[0]]
    if differ:
        raise IcepError(
            f"the ranks disagree on {what} (rank {differ[0]} differs from rank 0); the run cannot "
            "go on: report it with the model and the criterion"
        )


# --- failures ----------------------------------------------------------------------------------


class PeerFailed(Exception):
    """Another rank failed: this one ends quietly (that rank said why)."""


def _store() -> Any:
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def report_failure(line: str) -> bool:
    """Tell the other ranks that this one failed with ``line``; whether this is the run's first
    failure, the one whose line is printed. Rank 0 is preferred when every rank fails alike (a
    config error): the others give it a moment first. On one process: always True."""
    global _failed_here
    if not _joined():
        return True
    _failed_here = True
    if not _world.main:
        time.sleep(1.0)
    try:
        store = _store()
        first = store.add(_FAILURES, 1) == 1
        if first:
            store.set(_FIRST, f"rank {_world.rank}: {line}")
        return first
    except Exception:  # the store went with rank 0: say it here
        return True


def tell_launcher(line: str) -> None:
    """Put ``line`` in torchrun's error file for this rank (``TORCHELASTIC_ERROR_FILE``), so that
    its failure report shows the line instead of a link to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time())}, f)
    except OSError:
        pass


def peer_failure() -> str | None:
    """The line of a failure another rank reported, or None."""
    if not _joined():
        return None
    try:
        store = _store()
        if not store.check([_FIRST]):
            return None
        return store.get(_FIRST).decode()
    except Exception:
        return None


def _watch() -> None:
    """End this rank when another one failed and this one, after :data:`GRACE_S`, still runs
    (blocked in a collective the failed rank will never join)."""
    while _watching.is_set():
        try:
            failed = _store().check([_FAILURES])
        except Exception:  # the store is gone (rank 0 ended): nothing left to watch
            return
        if failed and not _failed_here:
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and _watching.is_set():
                time.sleep(0.2)
            if _watching.is_set() and not _failed_here:
                sys.stderr.flush()
                os._exit(1)
            return
        time.sleep(1.0)
