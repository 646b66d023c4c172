"""Where a fault case writes, and the earlier results beside it (:class:`Place`, the ``place``
fixture of conftest.py); ``icep.app.main()`` called in this process (:func:`call_main`) and its
one-line error contract (:func:`one_line`); the broken inputs a case needs."""

from __future__ import annotations

import logging
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icep import app
from icep.models import cifar_resnet
from icep.serialization import save_model

# --- where a case writes, and the earlier results beside it ---------------------------------


class Place:
    """``outputs/`` with an earlier run in it, ``cache/`` with a dense model and an unpacked
    dataset, and ``files/`` for a case's inputs. The case's own run goes to ``run_dir``."""

    def __init__(self, root: Path):
        self.outputs = root / "outputs"
        self.cache = root / "cache"
        self.files = root / "files"
        self.run_dir = self.outputs / "default" / "this-run"
        earlier = self.outputs / "default" / "earlier-run"
        for path, text in {
            earlier / "summary.json": '{"status": "completed"}\n',
            earlier / "metrics.jsonl": '{"step": 1}\n',
            earlier / "model.pt": "weights",
            earlier / ".hydra" / "config.yaml": "seed: 0\n",
            self.cache / "dense" / "resnet20-digits-0123456789ab.pt": "dense weights",
            self.cache / "datasets" / "tiny-0123456789" / "train" / "a" / "0.png": "pixels",
        }.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.files.mkdir()
        self.before = self._snapshot()

    def _snapshot(self) -> dict[Path, tuple[bytes, int]]:
        return {
            path: (path.read_bytes(), path.stat().st_mtime_ns)
            for folder in (self.outputs, self.cache)
            for path in sorted(folder.rglob("*"))
            # Lock files (icep.locks) are taken by every run; they hold no result.
            if path.is_file() and self.run_dir not in path.parents and path.suffix != ".lock"
        }

    def assert_untouched(self) -> None:
        after = self._snapshot()
        for path, (data, mtime) in self.before.items():
            assert path in after, f"{path} was deleted"
            assert after[path] == (data, mtime), f"{path} was modified"


def call_main(args: list[str], place: Place, monkeypatch, capsys, run_dir: bool = True):
    """``icep.app.main()`` with ``args`` as the command line: (exit code, stdout, stderr)."""
    monkeypatch.setenv("ICEP_CACHE", str(place.cache))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # recorded, so teardown removes what main() sets
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    where = [f"hydra.run.dir={place.run_dir}"] if run_dir else []
    argv = ["icep", *where, f"paths.outputs={place.outputs}", "trainer.device=cpu", *args]
    monkeypatch.setattr(sys, "argv", argv)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as shown:
        # Python's default filters: what `python -m icep` would print on stderr
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for quiet in (
            DeprecationWarning,
            PendingDeprecationWarning,
            ImportWarning,
            ResourceWarning,
        ):
            warnings.simplefilter("ignore", quiet)
        try:
            app.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:  # Hydra configured logging for the run: put pytest's back
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
    out, err = capsys.readouterr()
    err += "".join(
        warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown
    )
    return code, out, err


def one_line(code: int, out: str, err: str) -> str:
    """The error line, after checking the contract: exit 2, one stderr line, no traceback."""
    assert code == 2, err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("icep: error: ")
    return lines[0].removeprefix("icep: error: ")


# --- inputs a case needs ----------------------------------------------------------------------


def image_tree(root: Path, classes=("ant", "bee", "cat"), per_class: int = 4) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((12, 12, 3), 60 * c + 20 + i, np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def checkpoint(place: Place, kind: str) -> Path:
    path = place.files / f"{kind}.pt"
    # The default run: ResNet-20 on digits (10 classes, 1 channel).
    if kind == "other_architecture":
        torch.save(cifar_resnet(32, num_classes=10, in_channels=1).state_dict(), path)
    elif kind == "other_classes":
        torch.save(cifar_resnet(20, num_classes=100, in_channels=1).state_dict(), path)
    elif kind == "icep_other_architecture":  # a model file icep saved, of ResNet-32
        arch = {"_target_": "icep.models.cifar_resnet", "depth": 32, "shortcut": "B"}
        arch.update(num_classes=10, in_channels=1)
        save_model(cifar_resnet(32, num_classes=10, in_channels=1), arch, path, model="resnet32")
    elif kind == "truncated":
        torch.save(cifar_resnet(20, num_classes=10, in_channels=1).state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "not_a_state_dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir()
    return path


def dataset_root(place: Place, kind: str) -> Path:
    root = place.files / kind
    if kind == "empty":
        root.mkdir()
    elif kind == "no_class_folders":  # images straight in train/ and test/
        for split in ("train", "test"):
            (root / split).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / "0.png")
    elif kind == "split":  # dataset.root at train/ instead of the folder holding it
        root = image_tree(root) / "train"
    elif kind == "damaged_archive":
        archive = place.files / "tiny.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(image_tree(root), arcname="tiny")
        archive.write_bytes(archive.read_bytes()[:300])
        root = archive
    elif kind == "absolute_link":
        archive = place.files / "links.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(image_tree(root), arcname="tiny")
            link = tarfile.TarInfo("tiny/train/ant/passwd.png")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        root = archive
    elif kind == "undecodable":
        image_tree(root)
        (root / "train" / "bee" / "2.png").write_bytes(b"<html>not found</html>")
    return root


def resolve(args: list[str], place: Place) -> list[str]:
    out = []
    for arg in args:
        if "=" not in arg:  # a word as the shell split it
            out.append(arg)
            continue
        key, _, value = arg.partition("=")
        if value.startswith("{checkpoint:"):
            value = str(checkpoint(place, value[len("{checkpoint:") : -1]))
        elif value.startswith("{data:"):
            value = str(dataset_root(place, value[len("{data:") : -1]))
        elif value.startswith("{file}"):
            (place.files / "a-file").write_text("not a folder")
            value = value.replace("{file}", str(place.files / "a-file"))
        out.append(f"{key}={value}")
    return out
