"""`python -m icep.criteria`: per-layer Spearman correlation and pruned-filter overlap between
the criteria, printed and written as JSON, CSV and a heat-map PNG."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from icep.criteria import (
    average_ranks,
    compare,
    main,
    overlap,
    pruned_set,
    score_layers,
    spearman,
    write_results,
)
from icep.models import cifar_resnet
from icep.pruning import CRITERIA, PruningEngine, build_criterion


def test_spearman_ranks_ties_and_signs():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 0.0])).tolist() == [2.5, 1.0, 2.5, 0.0]
    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)  # any increasing map
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.ones(5)))


def test_pruned_set_follows_the_engine_rounding_and_overlap_is_a_share():
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    assert pruned_set(scores, 0.4) == {1, 3}
    assert pruned_set(scores, 0.99) == {1, 2, 3, 4}  # never every filter: 0 scores highest
    assert overlap({1, 3}, {1, 4}) == 0.5
    assert overlap({1, 3}, {1, 3}) == 1.0


@pytest.fixture(scope="module")
def result():
    """Every criterion on a freshly built (random-filter) CIFAR ResNet-20 and a few images."""
    torch.manual_seed(0)
    model = cifar_resnet(20)
    with torch.no_grad():  # a fresh model's gammas are all 1: bn_scale would rank nothing
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    engine = PruningEngine(model, torch.zeros(1, 3, 32, 32))
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    criteria = {name: build_criterion(name, **_small(name)) for name in CRITERIA}
    layers = score_layers(engine, criteria, DataLoader(data, batch_size=16), "cpu")
    assert list(layers) == [c for unit in engine.units for c in unit.convs]
    return compare(layers, ratio=0.5)


def _small(name: str) -> dict:
    return {"batches": 2} if CRITERIA[name].needs_data else {}


def test_l1_and_l2_rank_random_filters_almost_alike(result):
    names = result["criteria"]
    rho = np.array(result["spearman"])
    assert names == list(CRITERIA)
    assert rho[names.index("l1"), names.index("l2")] > 0.9  # "Rethinking the Pruning Criteria"
    assert np.allclose(rho, rho.T, equal_nan=True)
    assert np.allclose(np.diag(rho), 1.0)


def test_overlaps_are_shares_and_per_layer_values_are_kept(result):
    shared = np.array(result["overlap"])
    assert ((shared >= 0) & (shared <= 1)).all()
    assert np.allclose(np.diag(shared), 1.0)
    assert len(result["per_layer"]) == len(result["layers"]) == 9
    k = len(result["criteria"])
    assert np.array(result["per_layer"]["layer1.0.conv1"]["spearman"]).shape == (k, k)


def test_results_are_written_as_json_csv_and_png(result, tmp_path):
    paths = write_results(result, tmp_path / "out")
    assert [p.name for p in paths] == ["similarity.json", "similarity.csv", "similarity.png"]
    saved = json.loads(paths[0].read_text())
    assert saved["criteria"] == result["criteria"] and saved["ratio"] == 0.5
    rows = list(csv.DictReader(paths[1].open()))
    assert len(rows) == len(result["criteria"]) ** 2
    assert {"criterion_a", "criterion_b", "spearman", "overlap"} == set(rows[0])
    with Image.open(paths[2]) as image:
        assert image.format == "PNG" and image.width > 200


def test_list_and_one_line_errors(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(CRITERIA)
    assert main(["--criteria", "l1,nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert "unknown criterion 'nope'" in err and len(err.splitlines()) == 1
    assert main(["--ratio", "1.5"]) == 1
    assert main(["model=resnet57"]) == 1
    assert "resnet57" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_the_dense_digits_model(tmp_path):
    out = tmp_path / "similarity"
    args = [
        "model=resnet20",
        "dataset=digits",
        "dataset.train_subset=300",
        "dense.epochs=1",
        "trainer.device=cpu",
        "trainer.batch_size=64",
        "--criteria",
        "l1,l2,fpgm,bn_scale,taylor,random",
        "--batches",
        "1",
        "--ratio",
        "0.6",
        "--out",
        str(out),
    ]
    env = {**os.environ, "ICEP_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "icep.criteria", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Spearman correlation" in done.stdout and "overlap of pruned filters" in done.stdout
    for name in ("similarity.json", "similarity.csv", "similarity.png"):
        assert (out / name).is_file()
    saved = json.loads((out / "similarity.json").read_text())
    assert saved["criteria"] == ["l1", "l2", "fpgm", "bn_scale", "taylor", "random"]
    assert saved["ratio"] == 0.6
