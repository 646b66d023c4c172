"""Model builders and checkpoint loading."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from icep.errors import ConfigError
from icep.models import cifar_resnet, load_checkpoint, timm_model, torchvision_model


@pytest.mark.parametrize(
    ("depth", "params", "blocks"), [(20, 0.27e6, 9), (56, 0.86e6, 27), (110, 1.73e6, 54)]
)
def test_cifar_resnet_depths(depth, params, blocks):
    model = cifar_resnet(depth, num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02
    found = sum(len(stage) for stage in (model.layer1, model.layer2, model.layer3))
    assert found == blocks
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_resnet_rejects_bad_depth():
    with pytest.raises(ConfigError, match="6n\\+2"):
        cifar_resnet(51)


def test_torchvision_and_timm_by_name_take_classes_and_channels():
    x = torch.randn(2, 1, 32, 32)
    assert torchvision_model("resnet18", num_classes=7, in_channels=1)(x).shape == (2, 7)
    assert timm_model("resnet18", num_classes=5, in_channels=1)(x).shape == (2, 5)
    with pytest.raises(ConfigError, match="model.name"):
        torchvision_model("resnet19", num_classes=7)
    with pytest.raises(ConfigError, match="model.name"):
        timm_model("not_a_model_at_all", num_classes=7)


@pytest.mark.parametrize("fmt", ["pt", "wrapped", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    trained = cifar_resnet(20, num_classes=10)
    path = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    state = trained.state_dict()
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "wrapped" else state, path)
    fresh = load_checkpoint(cifar_resnet(20, num_classes=10), path)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_checkpoint_of_other_architecture_or_classes_is_refused(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(cifar_resnet(20, num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match="another architecture or class count"):
        load_checkpoint(cifar_resnet(20, num_classes=100), path)
    with pytest.raises(ConfigError, match="another architecture or class count"):
        load_checkpoint(cifar_resnet(32, num_classes=10), path)


def test_checkpoint_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": cifar_resnet(20).state_dict(), "obj": Fraction(1, 3)}, path)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(cifar_resnet(20), path)
    truncated = tmp_path / "cut.pt"
    torch.save(cifar_resnet(20).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot be read"):
        load_checkpoint(cifar_resnet(20), truncated)


def test_checkpoint_of_a_deeper_model_is_refused(tmp_path):
    # ResNet-32 holds every ResNet-20 key with the same shapes, plus blocks ResNet-20 lacks.
    path = tmp_path / "r32.pt"
    torch.save(cifar_resnet(32, num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match="unexpected layer1.3.*another architecture"):
        load_checkpoint(cifar_resnet(20, num_classes=10), path)


def test_checkpoint_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="holds no state dict"):
        load_checkpoint(cifar_resnet(20), path)


def test_option_a_resnet152_is_the_reference_model_and_loads_its_checkpoints(tmp_path):
    """The ICE reference's CIFAR ResNet-152 (METHOD.md section 7): option-A shortcuts, 2,408,474
    parameters, and checkpoints saved from DataParallel under "state_dict" with a classifier named
    "linear"; option B has 2,411,226."""
    model = cifar_resnet(152, shortcut="A").eval()
    assert sum(p.numel() for p in model.parameters()) == 2_408_474
    assert sum(p.numel() for p in cifar_resnet(152, shortcut="B").parameters()) == 2_411_226
    reference = {f"module.{k.replace('fc.', 'linear.')}": v for k, v in model.state_dict().items()}
    path = tmp_path / "ResNet_152_10.th"
    torch.save({"state_dict": reference, "best_prec1": 93.1}, path)
    loaded = load_checkpoint(cifar_resnet(152, shortcut="A").eval(), path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_checkpoint(cifar_resnet(152, shortcut="B"), path)  # its 1x1 shortcuts are missing


def test_option_a_shortcut_subsamples_and_pads_with_zero_channels():
    block = cifar_resnet(20, shortcut="A").layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()
    assert list(block.shortcut.parameters()) == []
