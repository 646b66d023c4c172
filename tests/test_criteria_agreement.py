"""`python -m icep.criteria_agreement`: per-layer Spearman correlation and pruned-filter overlap between
the criteria, printed and written as JSON, CSV and a heat-map PNG."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra import initialize_config_module
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from icep.criteria_agreement import (
    build_criteria,
    compare,
    criterion_options,
    main,
    overlap,
    pruned_set,
    score_layers,
    spearman,
    write_heatmaps,
    write_results,
)
from icep.models import cifar_resnet
from icep.pruning import PruningEngine

ALL = ["l1", "l2", "fpgm", "bn_scale", "taylor", "random", "mean_activation", "entropy"]


def test_spearman_ranks_ties_and_signs():
    # Ties share their average rank: ranks [2.5, 1, 2.5, 0] against [0, 1, 2, 3].
    tied = spearman(np.array([3.0, 1.0, 3.0, 0.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tied == pytest.approx(-3.0 / np.sqrt(4.5 * 5.0))
    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)  # any increasing map
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_spearman_of_a_constant_ranking_is_nan_without_a_warning():
    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy warns on constant input; icep checks first
        assert np.isnan(spearman(a, np.ones(5)))
        assert np.isnan(spearman(np.zeros(5), a))
        assert np.isnan(spearman(np.ones(5), np.ones(5)))
        assert np.isnan(spearman(np.ones(1), np.ones(1)))  # a layer of one filter


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
    with initialize_config_module("icep.conf", version_base="1.3"):
        criteria = build_criteria(criterion_options(), [], batches=2)
    layers = score_layers(engine, criteria, DataLoader(data, batch_size=16), "cpu")
    assert list(layers) == [c for unit in engine.units for c in unit.convs]
    return compare(layers, ratio=0.5)


def test_l1_and_l2_rank_random_filters_almost_alike(result):
    names = result["criteria"]
    rho = np.array(result["spearman"])
    assert names == criterion_options() == sorted(ALL)
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


def test_heat_maps_sit_side_by_side_and_take_undefined_cells(tmp_path):
    nan = float("nan")
    path = tmp_path / "maps.png"
    panels = {"a": [[1.0, nan], [nan, -1.0]], "b": [[1.0, 0.25], [0.25, 1.0]]}
    write_heatmaps(path, ["l1", "random"], panels)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 1.5 * image.height


def test_list_and_one_line_errors(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == sorted(ALL)
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
        [sys.executable, "-m", "icep.criteria_agreement", *args],
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
