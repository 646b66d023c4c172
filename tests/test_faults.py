"""Faults a run meets on a real machine, provoked for real: each ends in one line and a known exit
code, and leaves every earlier output byte for byte as it was."""

from __future__ import annotations

import resource
import signal
import subprocess

import pytest
from conftest import FAST, _icep_command, run_icep

ARGS = [*FAST, "dataset.train_subset=600"]


def _files(*folders):
    """Every file under ``folders`` with its bytes, lock files (taken by every run) aside."""
    return {
        path: path.read_bytes()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.suffix != ".lock"
    }


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_earlier_outputs(tmp_path, cache_dir):
    """torch.save on a full disk raises a C++ RuntimeError ("enforce fail at
    inline_container.cc"); a file size limit (ulimit -f) makes the same failure here."""
    earlier = tmp_path / "earlier"
    assert run_icep(ARGS, earlier, cache_dir).returncode == 0  # also puts the dense model in cache
    before = _files(earlier, cache_dir)
    out = tmp_path / "run"
    command, env = _icep_command(ARGS, out, cache_dir, None, None, False)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size
    )
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("icep: error: File too large: ")
    assert "the file size limit (ulimit -f) is too low for it" in lines[0]
    after = _files(earlier, cache_dir)
    assert {p: after.get(p) for p in before} == before
    assert not [p for p in (*out.rglob(".*.tmp"), *cache_dir.rglob(".*.tmp"))]
