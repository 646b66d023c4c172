"""Model builders: CIFAR ResNets, any torchvision or timm classifier by name, and checkpoint loading.

Every builder takes ``num_classes`` and ``in_channels`` (both come from the dataset), so a model
config only names the architecture.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icep.errors import ConfigError
from icep.models.cifar_resnet import DEPTHS, SHORTCUTS, CifarResNet
from icep.serialization import FORMAT, is_model_file, load_pruned, read_model_file


def cifar_resnet(
    depth: int = 56, num_classes: int = 10, in_channels: int = 3, shortcut: str = "B"
) -> nn.Module:
    """ResNet-{20,32,44,56,110,152} for 32x32 inputs (any 6n+2 depth works), with option-A
    (parameter-free, the reference's) or option-B (1x1 conv) shortcuts."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ConfigError(
            "model.arch.depth", f"got {depth}; a CIFAR ResNet has depth 6n+2, e.g. {DEPTHS}"
        )
    if shortcut not in SHORTCUTS:
        raise ConfigError(
            "model.arch.shortcut",
            f"got {shortcut!r}; must be A (zero-padded identity, the paper's) or B (1x1 conv)",
        )
    return CifarResNet(depth, num_classes, in_channels, shortcut)


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the stem conv for one taking ``in_channels`` (torchvision models are RGB-only)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    child.kernel_size,
                    child.stride,
                    child.padding,
                    child.dilation,
                    1,
                    child.bias is not None,
                )
                setattr(parent, name, new)
                return


def torchvision_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    weights: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Any torchvision classification model by name (``torchvision.models.list_models``);
    further keys go to its builder (``+model.arch.aux_logits=false`` for googlenet)."""
    import torchvision

    _check_torchvision_name(name)
    if weights is not None:
        # Pretrained heads have 1000 classes: build with them, then swap the classifier.
        model = _build(torchvision.models.get_model, name, weights=weights, **kwargs)
        _reset_classifier(model, num_classes)
    else:
        model = _build(
            torchvision.models.get_model, name, weights=None, num_classes=num_classes, **kwargs
        )
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _reset_classifier(model: nn.Module, num_classes: int) -> None:
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None or last.out_features == num_classes:
        return
    parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
    setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_classes))


def timm_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Any timm model by name (``timm.list_models``); further keys go to ``timm.create_model``
    (``+model.arch.drop_path_rate=0.1``)."""
    import timm

    _check_timm_name(name)
    return _build(
        timm.create_model,
        name,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_channels,
        **kwargs,
    )


def _build(builder: Any, name: str, **kwargs: Any) -> nn.Module:
    """``builder(name, **kwargs)``; a key the model does not take is one line naming it."""
    try:
        return builder(name, **kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ConfigError(
            "model.arch", f"{name} does not take that key ({exc}); remove it from model.arch"
        ) from None


def _check_torchvision_name(name: str) -> None:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = [m for m in available if name.split("_")[0] in m][:8] or available[:8]
        raise ConfigError(
            "model.name", f"unknown torchvision model '{name}'; e.g. {', '.join(close)}"
        )


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
        close = close or timm.list_models(f"*{name.split('_')[0]}*")[:8] or names[:8]
        raise ConfigError(
            "model.name",
            f"unknown timm model '{name}'; e.g. {', '.join(close)} (all {len(names)}: "
            "python -c 'import timm; print(timm.list_models())')",
        )


def check_name(builder: str, name: str) -> None:
    """Refuse a ``model.name`` that the ``model.arch`` builder (its ``_target_``) does not know,
    before any data is loaded: torchvision's and timm's names are listed without building."""
    if builder == f"{__name__}.torchvision_model":
        _check_torchvision_name(name)
    elif builder == f"{__name__}.timm_model":
        _check_timm_name(name)


def missing_file(path: Path, what: str) -> str:
    """Why ``path`` is not a file one can read, and what to give instead."""
    if path.is_dir():
        return f"{path} is a folder; give the path of {what} file in it"
    return f"{path} does not exist; give the path of {what}"


def load_checkpoint(
    model: nn.Module, path: str | Path, arch: dict[str, Any] | None = None
) -> nn.Module:
    """Load trained weights into ``model`` without unpickling anything.

    Accepts a model file icep saved (a run's ``model.pt``, pruned or not: ``model`` takes its
    layer shapes; ``arch``, the builder call that made ``model``, must be the file's), a
    ``.safetensors`` file, a plain state dict saved with ``torch.save``, or a dict that holds one
    under ``state_dict`` / ``model`` (the usual training-script layouts), with the ``module.``
    prefix of a DataParallel model or not. A model may rename foreign keys with a
    ``state_dict_aliases`` mapping of prefixes (the CIFAR ResNet reads the ICE reference code's
    ``linear.`` classifier as its ``fc.``).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError("model.checkpoint", missing_file(path, "a trained model"))
    if path.stat().st_size == 0:
        raise ConfigError(
            "model.checkpoint", f"{path} is empty (0 bytes); save the trained weights again"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                icep_export = (f.metadata() or {}).get("format") == json.dumps(FORMAT)
            if icep_export:  # python -m icep.export's: layer shapes and all
                return _load_model_file(model, path, read_model_file(path), arch)
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise ConfigError(
            "model.checkpoint",
            f"{path} cannot be read ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:120]}); give a state dict or .safetensors file",
        ) from None
    if is_model_file(state):
        return _load_model_file(model, path, state, arch)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            "model.checkpoint",
            f"{path} holds no state dict (a mapping of parameter names to tensors, at the top "
            "or under 'state_dict'); save one with torch.save(model.state_dict(), path)",
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    for theirs, ours in getattr(model, "state_dict_aliases", {}).items():
        state = {
            ours + k[len(theirs) :] if k.startswith(theirs) else k: v for k, v in state.items()
        }
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        what = (
            f"shape of {mismatched[0]}: {tuple(state[mismatched[0]].shape)} there, "
            f"{tuple(own[mismatched[0]].shape)} here"
            if mismatched
            else f"missing {missing[0]}"
            if missing
            else f"unexpected {unexpected[0]}"
        )
        raise ConfigError(
            "model.checkpoint",
            f"{path} does not fit this model ({what}); it is for another architecture or class "
            "count: check model= and dataset=",
        )
    model.load_state_dict(state)
    return model


# Builder keys that only say how the unpruned model was initialised, not what it is.
_INIT_KEYS = ("weights", "pretrained")


def _load_model_file(
    model: nn.Module, path: Path, blob: dict[str, Any], arch: dict[str, Any] | None
) -> nn.Module:
    """Load an icep model file into ``model``: its layer shapes (a pruned model stays pruned),
    then its weights, once its builder call is known to be ``arch``'s."""
    if arch is not None:
        theirs = {k: v for k, v in blob["arch"].items() if k not in _INIT_KEYS}
        ours = {k: v for k, v in arch.items() if k not in _INIT_KEYS}
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        if differ:
            said = ", ".join(f"{k}={theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ)
            saved_as = blob.get("meta", {}).get("model")
            hint = f"model={saved_as}" if saved_as else "the model= it was saved with"
            if "num_classes" in differ or "in_channels" in differ:
                hint += " and the dataset= it was trained on"
            raise ConfigError(
                "model.checkpoint",
                f"{path} is an icep model of another architecture ({said}); run with {hint}",
            )
    try:
        load_pruned(model, blob)
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        said = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
        raise ConfigError(
            "model.checkpoint", f"{path} does not load ({said[:200] or type(exc).__name__})"
        ) from None
    return model
