"""Save and load (pruned) models without pickle.

A saved model is a plain dict: the architecture's builder and arguments, the shape-bearing
attributes of every layer, the state dict, and what a user of the file needs besides the weights
(``meta``: the preprocessing, the class names, the dataset it was trained on, the run's summary
and the versions of the libraries that made it). Loading builds the unpruned architecture,
resizes its layers to the recorded shapes and loads the weights, so it works with
``torch.load(weights_only=True)`` and needs no Hydra config (the approach of timm's ``_prune.py``).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icep.errors import IcepError
from icep.files import atomic_open

FORMAT = "icep.model/1"

# The builders a saved file may name; nothing else is ever called while loading.
BUILDERS = {
    "icep.models.cifar_resnet",
    "icep.models.torchvision_model",
    "icep.models.timm_model",
}

_SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.modules.batchnorm._NormBase: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
}


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The attributes that pruning changes, per layer."""
    shapes = {}
    for name, module in model.named_modules():
        for kind, attrs in _SHAPE_ATTRS.items():
            if isinstance(module, kind):
                shapes[name] = {a: _plain(getattr(module, a)) for a in attrs}
    return shapes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def cpu_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``model.state_dict()`` on the CPU, contiguous, keeping the per-module metadata (the
    version numbers some modules, such as torchvision's MNASNet, need to load it again)."""
    state = model.state_dict()
    plain = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items())
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        plain._metadata = metadata
    return plain


def versions() -> dict[str, str | None]:
    """The versions of Python and of the libraries a saved model depends on (None: not
    installed)."""
    import platform
    from importlib import metadata

    found: dict[str, str | None] = {"python": platform.python_version()}
    for package, module in (
        ("icep", "icep"),
        ("torch", "torch"),
        ("torchvision", "torchvision"),
        ("timm", "timm"),
        ("torch-pruning", "torch_pruning"),
    ):
        # The installed package's version, without importing it; an imported module's own
        # string when it adds the build to that (2.14.1+cu130). Only then: Torch-Pruning 1.6.1
        # says 1.6.0 in its __version__.
        own = getattr(sys.modules.get(module), "__version__", None)
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = None
        found[package] = str(own) if own and str(own).startswith(installed or "") else installed
    return found


def save_model(model: nn.Module, arch: dict[str, Any], path: str | Path, /, **meta: Any) -> None:
    """Save ``model`` (pruned or not) with the builder call ``arch`` that made its unpruned form
    and ``meta`` (plain data: :func:`icep.dense.model_meta` describes a run's model); the
    library versions are added."""
    if arch.get("_target_") not in BUILDERS:
        raise ValueError(f"cannot save a model built by {arch.get('_target_')!r}")
    state = cpu_state_dict(model)
    atomic_save(
        {
            "format": FORMAT,
            "arch": arch,
            "layers": layer_shapes(model),
            "state_dict": state,
            "meta": {**meta, "versions": versions()},
        },
        path,
    )


def is_model_file(blob: Any) -> bool:
    """Whether ``blob`` (what ``torch.load`` gave) is a model saved by :func:`save_model`."""
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def read_model_file(path: str | Path) -> dict[str, Any]:
    """What :func:`save_model` wrote to ``path``, or its ``.safetensors`` export
    (``python -m icep.export``), as a dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IcepError(
            f"{path} is not a readable icep model file ({type(exc).__name__}); it may be truncated"
        ) from None
    if not is_model_file(blob):
        raise IcepError(f"{path} is not an icep model file (no '{FORMAT}' format tag)")
    return blob


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A model file from a safetensors export: the weights, and the rest from the JSON in its
    metadata."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = OrderedDict((key, f.get_tensor(key)) for key in f.keys())  # noqa: SIM118
        blob = {key: json.loads(value) for key, value in metadata.items()}
    except Exception as exc:
        raise IcepError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}); it may be truncated"
        ) from None
    if not is_model_file(blob):
        raise IcepError(
            f"{path} holds weights only (no '{FORMAT}' metadata): load it into its model with "
            "model.checkpoint=..."
        )
    return {**blob, "state_dict": state}


def load_pruned(model: nn.Module, blob: dict[str, Any]) -> None:
    """Give ``model`` (built by the saved ``arch``) the saved layer shapes, then load the saved
    weights into it."""
    for name, attrs in blob["layers"].items():
        module = model.get_submodule(name)
        for attr, value in attrs.items():
            setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in blob["state_dict"].items():
        owner, _, leaf = key.rpartition(".")
        module = model.get_submodule(owner)
        if module._parameters.get(leaf) is not None:
            old = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty_like(tensor), old.requires_grad)
        elif module._buffers.get(leaf) is not None:
            module._buffers[leaf] = torch.empty_like(tensor)
    model.load_state_dict(blob["state_dict"])


def load_model(path: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_model`, in eval mode on the CPU."""
    import hydra.utils

    blob = read_model_file(path)
    arch = dict(blob["arch"])
    if arch.get("_target_") not in BUILDERS:
        raise IcepError(f"{path} names builder {arch.get('_target_')!r}, which icep does not load")
    model = hydra.utils.instantiate(arch)
    try:
        load_pruned(model, blob)
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        said = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise IcepError(
            f"{path} does not load into {arch.get('name', arch['_target_'])} "
            f"({said[:300] or type(exc).__name__})"
        ) from None
    return model.eval()
