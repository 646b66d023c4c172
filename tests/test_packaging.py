"""An installed wheel carries the configs, so `python -m icep` works outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_wheel_ships_configs_and_runs_from_elsewhere(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("icep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "icep/conf/config.yaml",
        "icep/conf/model/resnet56.yaml",
        "icep/conf/experiment/resnet56_cifar10.yaml",
        "icep/conf/dataset/digits.yaml",
    ):
        assert required in names
    sources = {
        p.relative_to(ROOT).as_posix()
        for package in ("icep", "hydra_plugins")
        for p in (ROOT / package).rglob("*.py")
    }
    # hydra_plugins is a namespace package shared with other plugins: no __init__.py of its own.
    assert "hydra_plugins/__init__.py" not in names
    assert sources <= set(names), f"not in the wheel: {sorted(sources - set(names))}"
    configs = {
        "icep/conf/" + p.relative_to(ROOT / "conf").as_posix()
        for p in (ROOT / "conf").rglob("*.yaml")
    }
    assert configs <= set(names), f"not in the wheel: {sorted(configs - set(names))}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", "import icep, sys; print(icep.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.startswith(str(site))
    for args, expected in (
        (["+experiment=resnet56_cifar10", "--cfg", "job"], "depth: 56"),
        # The sweeper plugin is found from the wheel.
        (["+experiment=ice_optuna_sweep", "--cfg", "hydra"], "IcepOptunaSweeper"),
        # The help pages read the configs in the wheel; the scripts the README cites are in it.
        (["run", "--help", "pipeline"], "pipeline.ratio=0.6"),
        (["compare", "--help"], "usage: icep compare"),
        (["bench", "pipelines", "--help"], "--seeds"),
        (["bench", "finetune", "--help"], "--variants"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "icep", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert expected in result.stdout
