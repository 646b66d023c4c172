"""A saved model, pruned or not, reloads to the same outputs, with what its modules need to load
(issue 16.4: torchvision's MNASNet reads a version from the state dict's metadata)."""

from __future__ import annotations

import hydra.utils
import pytest
import torch

from icep.errors import IcepError
from icep.pruning import L1, PruningEngine
from icep.serialization import load_model, save_model

MNASNET = {
    "_target_": "icep.models.torchvision_model",
    "name": "mnasnet0_5",
    "num_classes": 10,
    "in_channels": 3,
    "weights": None,
}


def test_a_pruned_mnasnet_reloads_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = hydra.utils.instantiate(MNASNET).eval()
    x = torch.randn(2, 3, 32, 32)
    engine = PruningEngine(model, x[:1])
    engine.prune_unit(0, 0.5, L1())
    assert model.state_dict()._metadata[""]["version"] == 2  # what MNASNet checks on loading
    with torch.no_grad():
        expected = model(x)
    save_model(model, MNASNET, tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    assert again.state_dict()._metadata[""]["version"] == 2


def test_a_model_file_that_does_not_fit_its_architecture_is_one_error(tmp_path):
    arch = {"_target_": "icep.models.cifar_resnet", "depth": 8, "num_classes": 10, "in_channels": 3}
    save_model(hydra.utils.instantiate(arch), arch, tmp_path / "model.pt")
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["state_dict"]["fc.weight"]  # a file written by some other version of the model
    torch.save(blob, tmp_path / "model.pt")
    with pytest.raises(IcepError, match=r"model\.pt does not load into .*Missing key.*fc\.weight"):
        load_model(tmp_path / "model.pt")
