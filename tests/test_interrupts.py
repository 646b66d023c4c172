"""Signals stop a run between writes, never inside one (icep.interrupts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from icep.interrupts import Interrupted, stop_on_signals, uninterruptible
from icep.serialization import atomic_save


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_write_stops_the_run_after_it(signum, tmp_path):
    path = tmp_path / "checkpoint.pt"
    weights = {"w": torch.arange(1000.0)}
    with stop_on_signals(), pytest.raises(Interrupted) as stopped, uninterruptible():
        os.kill(os.getpid(), signum)  # delivered here, acted on after the block
        atomic_save(weights, path)
        written = True
    assert written
    assert torch.equal(torch.load(path, weights_only=True)["w"], weights["w"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert (stopped.value.signum, stopped.value.exit_code) == (signum, 128 + signum)


def test_outside_a_write_the_signal_stops_at_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(), pytest.raises(Interrupted, match="interrupted by SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):  # the handler runs between bytecodes, long before this ends
            pass
        raise AssertionError("not interrupted")
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_umask_like_any_other_file(umask, tmp_path):
    earlier = os.umask(umask)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "a.pt")
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(earlier)
    mode = (tmp_path / "a.pt").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_locked_folder_is_refused_and_a_cache_entry_waited_for(tmp_path, caplog):
    import threading

    from icep.errors import IcepError
    from icep.locks import locked

    lock = tmp_path / ".icep.lock"
    with locked(lock, "the run folder x", wait=False):
        assert lock.read_text().strip() == str(os.getpid())  # who holds it, for the message
        with (
            pytest.raises(IcepError, match=r"the run folder x is in use by another icep run"),
            locked(lock, "the run folder x", wait=False, refusal="choose another"),
        ):
            pass
    order = []

    def second():
        with locked(lock, "the dense model", wait=True):
            order.append("second")

    with caplog.at_level("INFO"), locked(lock, "the dense model", wait=True):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=0.5)
        order.append("first")  # the second is still waiting
    waiter.join(timeout=10)
    assert order == ["first", "second"]
    assert "waiting for another icep run" in caplog.text


def test_a_second_signal_while_stopping_changes_nothing():
    """Ctrl-C twice, or SIGTERM to the process and then to its group: one stop, which goes on
    writing what it writes (here: the summary of an interrupted run)."""
    written = []
    with stop_on_signals(), pytest.raises(Interrupted, match="SIGINT"):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000_000):
                pass
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the stop's own work is not cut short
            for _ in range(1_000_000):
                pass
            written.append("summary")
    assert written == ["summary"]
    with stop_on_signals(), pytest.raises(Interrupted, match="SIGTERM"):  # a later run stops again
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):
            pass


def test_dataloader_workers_leave_signals_to_the_run_and_let_go_of_its_locks(tmp_path):
    """A worker forked while the run holds its folder's lock does not keep the lock, and a
    SIGTERM to it (as to the whole process group) ends it quietly, with exit code 0: a worker
    killed by a signal makes PyTorch raise in the run."""
    import multiprocessing

    from icep.errors import IcepError
    from icep.interrupts import leave_signals_to_the_main_process, signals_held
    from icep.locks import locked

    lock, started = tmp_path / ".icep.lock", multiprocessing.get_context("fork").Event()

    def worker():
        leave_signals_to_the_main_process(0)
        started.set()
        signal.pause()

    with stop_on_signals(), locked(lock, "the run folder", wait=False):
        with signals_held():
            child = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
            child.start()
        assert started.wait(30)
        os.kill(child.pid, signal.SIGINT)  # ignored
        child.join(0.5)
        assert child.is_alive()
        os.kill(child.pid, signal.SIGTERM)
        child.join(30)
        assert child.exitcode == 0
    # A run killed (no unlock) while a worker it forked lives on: the folder is free at once.
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from icep.locks import locked\n"
        "forked, child_ready = os.pipe()\n"
        "with locked(Path(sys.argv[1]), 'the run folder', wait=False):\n"
        "    if os.fork() == 0:\n"
        "        os.write(child_ready, b'x')  # fork() has returned: its at-fork hooks ran\n"
        "        signal.pause()\n"
        "    os.read(forked, 1)\n"
        "    print(flush=True)\n"
        "    os._exit(0)  # as SIGKILL: no unlock\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script, str(lock)], stdout=subprocess.PIPE)
    run.stdout.readline()
    run.wait(30)
    try:
        with locked(lock, "the run folder", wait=False):
            pass
    except IcepError:
        pytest.fail("a forked child kept the run's lock")
    finally:
        subprocess.run(["pkill", "-f", str(lock)], check=False)
