"""Nothing icep loads from a user-supplied file is unpickled: a file carrying a pickled object is
refused with a clear message and the object's code never runs."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import FAST, run_icep

from icep.errors import IcepError
from icep.models import load_checkpoint
from icep.models.cifar_resnet import CifarResNet
from icep.serialization import load_model


class Payload:
    """Unpickling this creates a marker file: the proof that a loader ran foreign code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def poisoned(tmp_path):
    Payload.marker = str(tmp_path / "code-ran")
    path = tmp_path / "poisoned.pt"
    torch.save({"format": "icep.model/1", "state_dict": {}, "extra": Payload()}, path)
    return path, tmp_path / "code-ran"


def test_a_model_checkpoint_with_a_pickled_object_is_refused(poisoned):
    path, marker = poisoned
    with pytest.raises(IcepError, match="cannot be read"):  # a ConfigError naming the key
        load_checkpoint(CifarResNet(depth=20), path)
    assert not marker.exists()


def test_a_saved_model_with_a_pickled_object_is_refused(poisoned):
    path, marker = poisoned
    with pytest.raises(IcepError, match="not a readable icep model file"):
        load_model(path)
    assert not marker.exists()


def test_a_resume_checkpoint_with_a_pickled_object_is_refused(poisoned, tmp_path, cache_dir):
    path, marker = poisoned
    out = tmp_path / "run"
    out.mkdir()
    os.replace(path, out / "checkpoint.pt")
    result = run_icep([*FAST, "resume=true"], out, cache_dir)
    assert result.returncode == 2 and "checkpoint.pt cannot be read" in result.stderr
    assert not marker.exists()
