"""Structured pruning of any CNN through Torch-Pruning's dependency graph (METHOD.md section 1).

The :class:`PruningEngine` traces the model once, finds its pruning units and removes channels
physically: a pruned model is a smaller dense model. No code here knows an architecture.

Unit discovery
--------------
Torch-Pruning groups every set of coupled channels (a conv's output filters, the BatchNorm that
follows, the input channels of the next conv, ...). A group is a candidate unit when

1. it cuts the output channels of exactly one *feature* conv. Convs that merely follow their
   feature conv do not count: a depthwise conv (its input and output channels are coupled) and a
   *gate* conv (its output only scales another tensor by an elementwise product, as the expand
   conv of a squeeze-and-excitation module does). Groups tied to a residual add cut several
   feature convs and are left out;
2. none of its channels reach a concatenation (DenseNet's concatenated widths, and with them its
   stem and transitions) or the model output;
3. it touches no ignored layer, the classifier included (the last ``nn.Linear``, ignored
   automatically), not even its input channels; so the width feeding the classifier stays;
4. its feature conv is not the stem (the first conv in forward order).

Candidates are grouped by block: the deepest module above the conv that is not a plain container
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict`` or subclasses, so the conv-norm-act
wrappers of torchvision and timm are skipped). A squeeze-and-excitation module (a block that
holds a gate conv) joins the unit of the block around it, so its squeeze width is pruned with the
block's expansion. Units are ordered by the first forward call of their convs, recorded while the
graph is traced.

What that gives (``tests/test_pruning.py`` checks all but the last two items):

- CIFAR ResNet-(6n+2): one unit per BasicBlock (``conv1``), 3n units: 9 for ResNet-20, 27 for
  ResNet-56, ``layer1.0`` ... ``layer3.{n-1}``.
- torchvision resnet18 (BasicBlock): 8 units, ``layer1.0.conv1`` ... ``layer4.1.conv1``.
  resnet50 (Bottleneck): 16 units of two convs each (``conv1`` and ``conv2``).
- torchvision densenet121: 58 units, one per dense layer (``conv1``, the 1x1 bottleneck); stem,
  transitions and growth convs all feed concatenations.
- torchvision mobilenet_v2: 17 units, ``features.1`` ... ``features.17``: the expansion conv of
  every inverted residual (its depthwise conv follows), plus the projection of ``features.1``
  and ``features.17``, whose outputs meet no residual add. The stem and the 1280-wide last conv
  (it feeds the classifier) stay.
- timm mobilenetv3_small_050: 12 units, ``blocks.0.0`` ... ``blocks.5.0``: each block's
  expansion (for ``blocks.0.0``, which has none, its projection) together with its
  squeeze-and-excitation width; ``blocks.5.0`` is the 1x1 conv before pooling. The stem and
  ``conv_head`` (it feeds the classifier) stay.
- timm resnet18: as torchvision's, 8 units; torchvision mobilenet_v3_small: like timm's, 12.
- timm efficientnet_b0: 16 units (expansion + SE width per block); torchvision vgg11_bn: 7, one
  per conv but the first.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.node import Node
from torch_pruning.ops import OPTYPE

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Float noise must not add a channel: 0.7 * 10 is 7.000000000000001 in binary.
_CEIL_TOLERANCE = 1e-9
# How many elementwise activations may sit between a gate conv and its product.
_MAX_GATE_HOPS = 8


@dataclass
class Unit:
    """One pruning unit: the inside of one block, pruned in one step."""

    index: int  # position in forward order
    name: str  # block path, e.g. "layer1.0"
    convs: list[str]  # qualified names of the convs whose output channels this unit cuts
    channels: list[int] = field(default_factory=list)  # current out channels of those convs


class PruningEngine:
    """Finds the pruning units of ``model`` and prunes them one at a time, in place.

    The dependency graph is built once; Torch-Pruning swaps the pruned weights for new, smaller
    Parameters on the same module objects, so the graph stays valid across any number of
    ``prune_unit`` calls. An optimizer built before a prune holds the old Parameters: build a new
    one after each step (the pipelines do).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        ignored_layers: list[nn.Module] | None = None,
    ):
        self.model = model
        self.example_inputs = example_inputs
        self.ignored_layers = list(ignored_layers or [])
        classifier = _last_linear(model)
        if classifier is not None and classifier not in self.ignored_layers:
            self.ignored_layers.append(classifier)
        self.graph, conv_order = _trace(model, example_inputs)
        self.units = self._find_units(conv_order)
        # Schedules are shares of these counts, so rounding never drifts from step to step.
        self.original_widths = self.unit_widths()

    def _find_units(self, conv_order: list[nn.Conv2d]) -> list[Unit]:
        names = {module: name for name, module in self.model.named_modules()}
        rank = {conv: i for i, conv in enumerate(conv_order)}
        stem = conv_order[0] if conv_order else None
        ignored = set(self.ignored_layers)

        blocks: dict[str, list[nn.Conv2d]] = {}
        groups = self.graph.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=[nn.Conv2d]
        )
        for group in groups:
            conv = self._feature_conv(group, ignored)
            if conv is None or conv is stem or conv not in rank:
                continue
            blocks.setdefault(_block_name(self.model, names[conv]), []).append(conv)

        # A squeeze-and-excitation module (a block holding a gate conv) joins the unit of the
        # block around it: its squeeze width is part of that block's inside.
        gates = {
            node.module
            for node in self.graph.module2node.values()
            if node.type == OPTYPE.CONV and _is_gate(node)
        }
        for block in sorted(blocks, key=len, reverse=True):
            outer = _block_name(self.model, block)
            holds_gate = any(m in gates for m in self.model.get_submodule(block).modules())
            if holds_gate and outer != block and outer in blocks:
                blocks[outer].extend(blocks.pop(block))

        ordered = sorted(blocks.items(), key=lambda kv: min(rank[c] for c in kv[1]))
        units = []
        for index, (block, convs) in enumerate(ordered):
            convs = sorted(convs, key=rank.__getitem__)
            units.append(
                Unit(index, block, [names[c] for c in convs], [c.out_channels for c in convs])
            )
        return units

    def _feature_conv(self, group: tp.Group, ignored: set[nn.Module]) -> nn.Conv2d | None:
        """The single feature conv whose outputs ``group`` cuts, or None if it is no unit."""
        graph = self.graph
        features = []
        for dep, _ in group:
            node = dep.target
            if node.module in ignored or node.type in (OPTYPE.CONCAT, OPTYPE.OUTPUT):
                return None
            if (
                node.type == OPTYPE.CONV
                and graph.is_out_channel_pruning_fn(dep.handler)
                and not _is_gate(node)
                and node.module not in features
            ):
                features.append(node.module)
        if len(features) != 1 or not isinstance(features[0], nn.Conv2d):
            return None
        return features[0]

    def prune_unit(
        self, index: int, ratio: float, criterion: Callable[[nn.Conv2d], torch.Tensor]
    ) -> int:
        """Remove ``ceil(ratio * C)`` output channels (at most ``C - 1``) of each conv of unit
        ``index``, the ones ``criterion`` scores lowest, with everything coupled to them.

        Returns the number of conv output channels removed. Parameters that did not require
        grad before still do not.
        """
        if not 0 <= index < len(self.units):
            raise IndexError(f"unit {index} does not exist; the model has {len(self.units)} units")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"pruning ratio must lie in [0, 1], got {ratio}")
        widths = {}
        for name in self.units[index].convs:
            channels = self.model.get_submodule(name).out_channels
            widths[name] = channels - min(ceil_share(ratio, channels), channels - 1)
        return self.prune_to_widths(widths, criterion)

    def prune_to_widths(
        self,
        widths: dict[str, int],
        criterion: Callable[[nn.Conv2d], torch.Tensor] | None = None,
    ) -> int:
        """Cut each unit conv named in ``widths`` down to that many output channels: the ones
        ``criterion`` scores lowest go. Without a criterion the first ones go, which rebuilds a
        pruned model's structure on its unpruned form before the caller loads its weights
        (resuming a run from its checkpoint). Returns the number of channels removed."""
        with self._keep_frozen():
            removed = 0
            for name, width in widths.items():
                conv = self.model.get_submodule(name)
                n = conv.out_channels - width
                if n < 0 or n >= conv.out_channels:
                    raise ValueError(
                        f"{name} has {conv.out_channels} channels; cannot make it {width} wide"
                    )
                if n:
                    # Scored just before its own cut: cutting an earlier conv of the same unit
                    # changes this one's filters (their input channels).
                    if criterion is None:
                        idxs = list(range(n))
                    else:
                        order = torch.argsort(self.scores(name, criterion), stable=True)
                        idxs = order[:n].tolist()
                    self._prune_conv(name, idxs)
                    removed += n
        return removed

    def prune_channels(self, channels: dict[str, Sequence[int]]) -> int:
        """Remove the given output channels (indices into the current width) of each named unit
        conv, with everything coupled to them. Returns the number of channels removed."""
        with self._keep_frozen():
            for name, idxs in channels.items():
                if len(idxs):
                    self._prune_conv(name, list(idxs))
        return sum(len(idxs) for idxs in channels.values())

    def scores(self, name: str, criterion: Callable[[nn.Conv2d], torch.Tensor]) -> torch.Tensor:
        """``criterion``'s score for each output channel of conv ``name``, on the CPU."""
        conv = self.model.get_submodule(name)
        scores = criterion(conv)
        if scores.shape != (conv.out_channels,):
            raise ValueError(
                f"{criterion!r} gave scores of shape {tuple(scores.shape)} for {name}, "
                f"expected ({conv.out_channels},)"
            )
        return scores.detach().float().cpu()

    def _prune_conv(self, name: str, idxs: list[int]) -> None:
        conv = self.model.get_submodule(name)
        group = self.graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
        if not self.graph.check_pruning_group(group):
            raise RuntimeError(
                f"pruning {len(idxs)} channels of {name} would empty a coupled layer"
            )
        with torch.no_grad():
            group.prune()

    @contextlib.contextmanager
    def _keep_frozen(self) -> Iterator[None]:
        """Torch-Pruning's new Parameters always require grad; frozen layers must stay frozen.
        The unit widths are re-read at the end."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        try:
            yield
        finally:
            for name, param in self.model.named_parameters():
                if name in frozen:
                    param.requires_grad_(False)
            self.refresh()

    def unit_widths(self) -> dict[str, int]:
        """The current output channels of every unit conv, in unit order."""
        return {
            name: c
            for unit in self.units
            for name, c in zip(unit.convs, unit.channels, strict=True)
        }

    def pruned_share(self) -> float:
        """The share of the unit convs' original output channels removed so far."""
        original = sum(self.original_widths.values())
        return 1.0 - sum(self.unit_widths().values()) / original if original else 0.0

    def touched_convs(self) -> list[str]:
        """Every conv whose channels some unit cuts (output or input side), in forward order.

        For a CIFAR ResNet these are each block's ``conv1`` and ``conv2``: the layers ICE's
        freezing analysis scores (METHOD.md section 3.2).
        """
        names = {module: name for name, module in self.model.named_modules()}
        found: dict[str, None] = {}
        for unit in self.units:
            for conv_name in unit.convs:
                conv = self.model.get_submodule(conv_name)
                group = self.graph.get_pruning_group(conv, tp.prune_conv_out_channels, [0])
                for dep, _ in group:
                    module = dep.target.module
                    if isinstance(module, nn.Conv2d) and module not in self.ignored_layers:
                        found.setdefault(names[module])
        return list(found)

    def norm_after(self, conv_name: str) -> str | None:
        """The normalization layer fed directly by ``conv_name`` (its BatchNorm), if any."""
        node = self.graph.module2node.get(self.model.get_submodule(conv_name))
        names = {module: name for name, module in self.model.named_modules()}
        for out in node.outputs if node is not None else []:
            if isinstance(out.module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                return names[out.module]
        return None

    def refresh(self) -> None:
        """Re-read the current out channels of every unit's convs."""
        for unit in self.units:
            unit.channels = [self.model.get_submodule(n).out_channels for n in unit.convs]


def ceil_share(share: float, count: int) -> int:
    """``ceil(share * count)``, without float noise adding one (0.7 * 10 is 7.000000000000001)."""
    return math.ceil(share * count - _CEIL_TOLERANCE)


def uniform_widths(original: dict[str, int], share: float) -> dict[str, int]:
    """Scope ``uniform``: every conv keeps ``C - ceil(share * C)`` of its ORIGINAL C channels
    (at least one), so a cumulative schedule gives the same widths whatever the steps before."""
    return {name: max(1, c - ceil_share(share, c)) for name, c in original.items()}


def select_global(
    scores: dict[str, torch.Tensor],
    original: dict[str, int],
    share: float,
    min_channels_share: float,
) -> dict[str, list[int]]:
    """Scope ``global``: the channels to remove so that ``ceil(share * N)`` of the N original
    channels of all convs are gone, chosen by one ranking across layers.

    ``scores`` holds each conv's current per-channel scores. They are divided by the layer's
    largest absolute score, so every layer's best channel scores 1 whatever the scale of its
    weights; the lowest normalised scores go first. A floor keeps at least
    ``max(1, ceil(min_channels_share * C_orig))`` channels in every conv: when the floors stop
    the ranking short of the target, the share ends below it.
    """
    total = sum(original.values())
    already = total - sum(len(s) for s in scores.values())
    wanted = ceil_share(share, total) - already
    candidates = []
    for layer, (name, layer_scores) in enumerate(scores.items()):
        floor = max(1, ceil_share(min_channels_share, original[name]))
        normalised = layer_scores / layer_scores.abs().max().clamp_min(torch.finfo().tiny)
        order = torch.argsort(normalised, stable=True)
        removable = order[: max(0, len(layer_scores) - floor)].tolist()
        candidates += [(float(normalised[i]), layer, i, name) for i in removable]
    chosen: dict[str, list[int]] = {name: [] for name in scores}
    for _, _, index, name in sorted(candidates)[: max(0, wanted)]:
        chosen[name].append(index)
    return chosen


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    # Torch-Pruning first tries model(*example_inputs): a bare batch-of-one tensor would be
    # unpacked into one unbatched image. A tuple makes that first call the right one.
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _trace(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[tp.DependencyGraph, list[nn.Conv2d]]:
    """Build the dependency graph in eval mode (BatchNorm statistics stay untouched) and record
    the order in which convs first run. Every module's training flag is restored afterwards;
    frozen parameters (``requires_grad=False``) do not hide layers from the trace."""
    # Inputs that require grad give every op a grad_fn even where parameters are frozen.
    inputs = tuple(
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in _as_tuple(example_inputs)
    )
    flags = {m: m.training for m in model.modules()}
    order: list[nn.Conv2d] = []
    seen: set[nn.Module] = set()

    def record(module: nn.Module, *_) -> None:
        if module not in seen:
            seen.add(module)
            order.append(module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        model.eval()
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=inputs, verbose=False
            )
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in flags.items():
            module.training = training
    return graph, order


def _is_gate(node: Node) -> bool:
    """Whether a conv's output, through unary elementwise ops only, multiplies another tensor."""
    for _ in range(_MAX_GATE_HOPS):
        if len(node.outputs) != 1:
            return False
        node = node.outputs[0]
        if node.type != OPTYPE.ELEMENTWISE:
            return False
        if type(node.grad_fn).__name__.startswith("MulBackward") and len(node.inputs) > 1:
            return True
        if len(node.inputs) != 1:
            return False
    return False


def _block_name(model: nn.Module, conv_name: str) -> str:
    """The deepest module above the conv that is not a plain container; the conv itself if none."""
    parts = conv_name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:depth])
        if not isinstance(model.get_submodule(path), _CONTAINERS):
            return path
    return conv_name


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def spatial_conv_weights(model: nn.Module) -> int:
    """Non-zero weights of all ``nn.Conv2d`` with a kernel larger than 1x1, except the first such
    conv in registration order (the stem; every torchvision, timm and icep model registers its
    stem first, and pruning never reorders modules, so no example input is needed)."""
    convs = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and math.prod(m.kernel_size) > 1
    ]
    return sum(int(torch.count_nonzero(m.weight.detach())) for m in convs[1:])


def remaining_fraction(model: nn.Module, original_count: int) -> float:
    """The remaining fraction x (METHOD.md section 1): ``spatial_conv_weights`` now over before."""
    if original_count <= 0:
        raise ValueError(f"original_count must be positive, got {original_count}")
    return spatial_conv_weights(model) / original_count


def count_macs_params(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on ``example_inputs``.

    Torch-Pruning counts on a deep copy in eval mode, so ``model`` (its training flags and
    BatchNorm statistics included) is left as it was.
    """
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, _as_tuple(example_inputs))
    return int(macs), int(params)
