"""Read the records of an offline W&B run file (``run-*.wandb``, LevelDB log format)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic + version; each record: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        pos += HEADER
        if pos + length > len(raw):  # a record the writer has not finished
            break
        chunk = raw[pos : pos + length]
        pos += length
        if kind == FULL:
            data = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            data, pending = pending + chunk, b""
        else:
            break
        record = pb.Record()
        record.ParseFromString(data)
        yield record


def finished(path: Path, timeout: float = 60.0) -> list:
    """The file's records once its ``exit`` record is in. ``run.finish()`` returns when the W&B
    service has handled the exit, but the service may still be writing the transaction log: on
    a loaded machine a reader can otherwise see the header and none of the history."""
    deadline = time.monotonic() + timeout
    while True:
        found = list(records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in found]
            raise AssertionError(f"{path} has no exit record after {timeout}s: {kinds}")
        time.sleep(0.1)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def history(path: Path) -> list[dict]:
    rows = []
    for r in finished(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({_key(i): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_info(path: Path):
    for r in finished(path):
        if r.WhichOneof("record_type") == "run":
            return r.run
    return None


def summary(path: Path) -> dict:
    out = {}
    for r in finished(path):
        if r.WhichOneof("record_type") == "summary":
            out.update({_key(i): json.loads(i.value_json) for i in r.summary.update if _key(i)})
    return out


def table(path: Path, key: str) -> dict:
    """The last W&B Table logged under ``key`` in the run of ``path``: ``columns`` and ``data``
    (from the run's ``files/media/table/``)."""
    logged = [r for r in history(path) if r.get(f"{key}/_type") == "table-file"]
    assert logged, f"{path} holds no table {key!r}"
    return json.loads((path.parent / "files" / logged[-1][f"{key}/path"]).read_text())


def artifacts(path: Path) -> list:
    """The artifact records of the run (``type``, ``name``, ``metadata`` as JSON, ``manifest``)."""
    return [r.artifact for r in finished(path) if r.WhichOneof("record_type") == "artifact"]
