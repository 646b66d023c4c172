"""Structured pruning of any CNN through Torch-Pruning's dependency graph (METHOD.md section 1).

The :class:`PruningEngine` traces the model once, finds its pruning units and removes channels
physically: a pruned model is a smaller dense model. No code here knows an architecture.

Unit discovery
--------------
Torch-Pruning groups every set of coupled channels (a conv's output filters, the BatchNorm that
follows, the input channels of the next conv, ...). A group is a candidate unit when

1. it cuts the output channels of exactly one *feature* layer, an ``nn.Conv2d`` or an
   ``nn.Linear`` inside a block that holds a conv (the 1x1-conv MLP of a ConvNeXt block). Layers
   that merely follow their feature layer do not count: a depthwise conv (its input and output
   channels are coupled) and a *gate* (its output only scales another tensor by an elementwise
   product, as the expand conv of a squeeze-and-excitation module does). Groups tied to a
   residual add cut several feature layers and are left out;
2. none of its channels reach the model output, or a concatenation with other features
   (DenseNet's concatenated widths, and with them its stem and transitions). A concatenation of
   the group's own channels is fine: a Ghost module joins its primary conv's output with a cheap
   depthwise copy of it;
3. it touches no ignored layer, the classifier included (the last ``nn.Linear``, ignored
   automatically), not even its input channels; so the width feeding the classifier stays;
4. its feature conv is not the stem (the first conv in forward order).

Candidates are grouped by block: the deepest module above the layer that is not a plain container
(``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict`` or subclasses) and holds more than one
conv or linear layer that is not depthwise, so the conv-norm-act wrappers of torchvision and timm
and a Ghost module (one primary conv, one depthwise) are skipped. A squeeze-and-excitation module
(a block that holds a gate) joins the unit of the block around it, so its squeeze width is pruned
with the block's expansion. Units are ordered by the first forward call of their layers, recorded
while the graph is traced.

Grouped convolutions
--------------------
A grouped conv (``groups = G``, not depthwise) splits its channels into G equal groups, so a
group of coupled channels that holds one (as input or output) is cut the same way in every group,
as Torch-Pruning's own pruners do: a layer of C channels loses ``k`` positions of each group of
``s = C / G``, ``G * k`` channels in all, the positions whose scores averaged over the G groups
are lowest. A ratio removes ``ceil(ratio * s)`` positions per group, and every group keeps at least
two channels (a grouped conv with one output channel per group would turn depthwise). A layer
whose groups hold two channels or fewer cannot be cut: its unit leaves it out, and
``PruningEngine.excluded`` says why. GroupNorm's groups count the same way.

What that gives (``tests/test_pruning.py`` and ``tests/test_model_matrix.py`` check it, vgg11_bn
aside):

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
- torchvision resnext50_32x4d, regnet_x/y and timm regnetx: ``conv1`` (or ``a``) with the grouped
  ``conv2`` (``b``), cut alike in every group; torchvision convnext_tiny: 18 units, the hidden
  width of each block's MLP (``block.3``, a linear layer); timm ghostnet_100: 17 units, the
  primary conv of each bottleneck's ``ghost1``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency.node import Node
from torch_pruning.ops import OPTYPE

from icep import distributed
from icep.errors import ConfigError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# Float noise must not add a channel: 0.7 * 10 is 7.000000000000001 in binary.
_CEIL_TOLERANCE = 1e-9
# How many elementwise activations may sit between a gate conv and its product.
_MAX_GATE_HOPS = 8
_FEATURE_TYPES = (OPTYPE.CONV, OPTYPE.LINEAR)


@dataclass
class Unit:
    """One pruning unit: the inside of one block, pruned in one step."""

    index: int  # position in forward order
    name: str  # block path, e.g. "layer1.0"
    convs: list[str]  # qualified names of the layers (convs, or linears) whose outputs it cuts
    channels: list[int] = field(default_factory=list)  # current out channels of those layers


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
        ties: str = "stable",
        round_to: int = 1,
    ):
        """``ties``: how equal scores are ordered where a cut falls among them: ``stable`` (the
        lower channel index is cut first) or ``sort`` (``torch.sort``'s order, not stable, on
        the scores' device: the reference code's). ``round_to``: the widths a ratio gives are
        rounded to multiples of it (:meth:`rounded`)."""
        if ties not in ("stable", "sort"):
            raise ValueError(f"ties must be stable or sort, not {ties!r}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, not {round_to}")
        self.round_to = round_to
        self.model = model
        self.example_inputs = example_inputs
        self.ties = ties
        self.ignored_layers = list(ignored_layers or [])
        classifier = _last_linear(model)
        if classifier is not None and classifier not in self.ignored_layers:
            self.ignored_layers.append(classifier)
        self.graph, order = _trace(model, example_inputs)
        # Layers a candidate unit leaves out, with the reason (a grouped conv too narrow to cut).
        self.excluded: dict[str, str] = {}
        # How many equal groups each unit layer's coupled channels form (1: no grouped conv).
        self.channel_groups: dict[str, int] = {}
        self.units = self._find_units(order)
        # Schedules are shares of these counts, so rounding never drifts from step to step.
        self.original_widths = self.unit_widths()
        # Every conv and linear layer whose channels some unit cuts: what "remaining" counts.
        self.touched = self.touched_convs()
        self.original_weights = self.touched_weights()

    def _find_units(self, order: list[nn.Module]) -> list[Unit]:
        names = {module: name for name, module in self.model.named_modules()}
        rank = {layer: i for i, layer in enumerate(order)}
        convs = [layer for layer in order if isinstance(layer, nn.Conv2d)]
        stem = convs[0] if convs else None
        ignored = set(self.ignored_layers)

        blocks: dict[str, list[nn.Module]] = {}
        groups = self.graph.get_all_groups(
            ignored_layers=self.ignored_layers, root_module_types=[nn.Conv2d, nn.Linear]
        )
        for group in groups:
            layer = self._feature_layer(group, ignored)
            if layer is None or layer is stem or layer not in rank:
                continue
            block = _block_name(self.model, names[layer])
            if isinstance(layer, nn.Linear) and not _holds_conv(self.model, block):
                continue  # an MLP head or a transformer block: not a CNN block's inside
            count = _channel_groups(group)
            if out_width(layer) // count <= (2 if count > 1 else 1):
                self.excluded[names[layer]] = (
                    f"its {out_width(layer)} channels form {count} groups of a grouped layer, "
                    "too few per group to remove any"
                )
                continue
            self.channel_groups[names[layer]] = count
            blocks.setdefault(block, []).append(layer)

        # A squeeze-and-excitation module (a block holding a gate) joins the unit of the block
        # around it: its squeeze width is part of that block's inside.
        gates = {
            node.module
            for node in self.graph.module2node.values()
            if node.type in _FEATURE_TYPES and _is_gate(node)
        }
        for block in sorted(blocks, key=len, reverse=True):
            outer = _block_name(self.model, block)
            holds_gate = any(m in gates for m in self.model.get_submodule(block).modules())
            if holds_gate and outer != block and outer in blocks:
                blocks[outer].extend(blocks.pop(block))

        ordered = sorted(blocks.items(), key=lambda kv: min(rank[c] for c in kv[1]))
        units = []
        for index, (block, layers) in enumerate(ordered):
            layers = sorted(layers, key=rank.__getitem__)
            units.append(
                Unit(index, block, [names[c] for c in layers], [out_width(c) for c in layers])
            )
        return units

    def _feature_layer(self, group: tp.Group, ignored: set[nn.Module]) -> nn.Module | None:
        """The single feature layer whose outputs ``group`` cuts, or None if it is no unit."""
        graph = self.graph
        features = []
        nodes = {dep.target for dep, _ in group} | {dep.source for dep, _ in group}
        for dep, _ in group:
            node = dep.target
            if node.module in ignored or node.type == OPTYPE.OUTPUT:
                return None
            if node.type == OPTYPE.CONCAT and not all(n in nodes for n in node.inputs):
                return None  # joined with other features (DenseNet), not only its own
            if (
                node.type in _FEATURE_TYPES
                and graph.is_out_channel_pruning_fn(dep.handler)
                and not _is_gate(node)
                and node.module not in features
            ):
                features.append(node.module)
        if len(features) != 1 or not isinstance(features[0], (nn.Conv2d, nn.Linear)):
            return None
        return features[0]

    def cut(self, name: str, ratio: float) -> int:
        """How many output channels ``ratio`` removes from unit layer ``name`` now:
        ``ceil(ratio * C)`` (``ceil(ratio * C / G)`` per group of a grouped layer), leaving at least
        one channel (two per group)."""
        groups = self.channel_groups.get(name, 1)
        per_group = out_width(self.model.get_submodule(name)) // groups
        floor = 2 if groups > 1 else 1
        return groups * max(0, min(ceil_share(ratio, per_group), per_group - floor))

    def prune_unit(
        self, index: int, ratio: float, criterion: Callable[[nn.Conv2d], torch.Tensor]
    ) -> int:
        """Remove ``ceil(ratio * C)`` output channels (at most ``C - 1``) of each layer of unit
        ``index``, the ones ``criterion`` scores lowest, with everything coupled to them
        (grouped layers: :meth:`cut`).

        Returns the number of output channels removed. Parameters that did not require grad
        before still do not.
        """
        if not 0 <= index < len(self.units):
            raise IndexError(f"unit {index} does not exist; the model has {len(self.units)} units")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"pruning ratio must lie in [0, 1], got {ratio}")
        return self.prune_to_widths(self.unit_widths_after(index, ratio), criterion)

    def unit_widths_after(self, index: int, ratio: float) -> dict[str, int]:
        """The widths :meth:`prune_unit` gives unit ``index``'s layers for ``ratio`` now."""
        widths = {}
        for name in self.units[index].convs:
            current = out_width(self.model.get_submodule(name))
            widths[name] = self.rounded(name, current - self.cut(name, ratio))
        return widths

    def rounded(self, name: str, width: int) -> int:
        """``width`` for unit layer ``name`` as a multiple of ``round_to`` (GPUs run channel
        counts that are multiples of 8 faster): the nearest one (halves up), at least one
        multiple and at most the layer's current width; a layer no wider than one multiple keeps
        its width. A grouped layer rounds to a multiple of both ``round_to`` and its groups."""
        step = math.lcm(self.round_to, self.channel_groups.get(name, 1))
        if self.round_to == 1:
            return width
        current = out_width(self.model.get_submodule(name))
        if current <= step:
            return current
        return min(current, max(step, step * math.floor(width / step + 0.5)))

    def prune_to_widths(
        self,
        widths: dict[str, int],
        criterion: Callable[[nn.Conv2d], torch.Tensor] | None = None,
    ) -> int:
        """Cut each unit layer named in ``widths`` down to that many output channels: the ones
        ``criterion`` scores lowest go. Without a criterion the first ones go, which rebuilds a
        pruned model's structure on its unpruned form before the caller loads its weights
        (resuming a run from its checkpoint). Returns the number of channels removed."""
        with self._keep_frozen():
            removed = 0
            for name, width in widths.items():
                channels = out_width(self.model.get_submodule(name))
                groups = self.channel_groups.get(name, 1)
                n = channels - width
                if n < 0 or n >= channels or n % groups:
                    multiple = f" (a multiple of {groups})" if groups > 1 else ""
                    raise ValueError(
                        f"{name} has {channels} channels; cannot make it {width} wide{multiple}"
                    )
                if n:
                    # Scored just before its own cut: cutting an earlier layer of the same unit
                    # changes this one's filters (their input channels).
                    scores = None if criterion is None else self.scores(name, criterion)
                    self._prune_layer(name, self.lowest(name, n, scores))
                    removed += n
        return removed

    def lowest(self, name: str, n: int, scores: torch.Tensor | None) -> list[int]:
        """The ``n`` channels of unit layer ``name`` with the lowest ``scores`` (None: the first
        ones); for a grouped layer, the same positions in every group, ranked by their mean."""
        groups = self.channel_groups.get(name, 1)
        width = out_width(self.model.get_submodule(name))
        size = width // groups
        if scores is None:
            positions = list(range(n // groups))
        else:
            means = scores if groups == 1 else scores.view(groups, size).mean(dim=0)
            order = torch.sort(means, stable=self.ties == "stable").indices
            positions = order[: n // groups].tolist()
        return sorted(p + g * size for g in range(groups) for p in positions)

    def prune_channels(self, channels: dict[str, Sequence[int]]) -> int:
        """Remove the given output channels (indices into the current width) of each named unit
        layer, with everything coupled to them; a grouped layer's must be the same positions in
        every group. Returns the number of channels removed."""
        for name, idxs in channels.items():
            groups = self.channel_groups.get(name, 1)
            size = out_width(self.model.get_submodule(name)) // groups
            positions = {i % size for i in idxs}
            if groups > 1 and set(idxs) != {p + g * size for g in range(groups) for p in positions}:
                raise ValueError(
                    f"{name} is cut in {groups} equal groups: remove the same positions in each"
                )
        with self._keep_frozen():
            for name, idxs in channels.items():
                if len(idxs):
                    self._prune_layer(name, sorted(idxs))
        return sum(len(idxs) for idxs in channels.values())

    def scores(self, name: str, criterion: Callable[[nn.Conv2d], torch.Tensor]) -> torch.Tensor:
        """``criterion``'s score for each output channel of layer ``name``, on the CPU. In a
        data-parallel run, the mean of every rank's (a data criterion saw each rank's part of
        its batches): the same numbers, so the same channels go, on every rank."""
        layer = self.model.get_submodule(name)
        scores = criterion(layer)
        if scores.shape != (out_width(layer),):
            raise ValueError(
                f"{criterion!r} gave scores of shape {tuple(scores.shape)} for {name}, "
                f"expected ({out_width(layer)},)"
            )
        return distributed.mean_across(scores.detach().float().cpu())

    def _prune_layer(self, name: str, idxs: list[int]) -> None:
        layer = self.model.get_submodule(name)
        group = self.graph.get_pruning_group(layer, _out_channel_fn(layer), idxs)
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
        """The current output channels of every unit layer, in unit order."""
        return {
            name: c
            for unit in self.units
            for name, c in zip(unit.convs, unit.channels, strict=True)
        }

    def pruned_share(self) -> float:
        """The share of the unit layers' original output channels removed so far."""
        original = sum(self.original_widths.values())
        return 1.0 - sum(self.unit_widths().values()) / original if original else 0.0

    def touched_convs(self) -> list[str]:
        """Every conv (or linear layer) whose channels some unit cuts, output or input side, in
        the order the units come.

        For a CIFAR ResNet these are each block's ``conv1`` and ``conv2``: the layers ICE's
        freezing analysis scores (METHOD.md section 3.2).
        """
        return self.layers_cut([name for unit in self.units for name in unit.convs])

    def layers_cut(self, layer_names: Sequence[str]) -> list[str]:
        """Every conv or linear layer whose channels cutting the outputs of ``layer_names``
        changes (those layers, and the ones reading their channels), in that order."""
        names = {module: name for name, module in self.model.named_modules()}
        ignored = set(self.ignored_layers)
        found: dict[str, None] = {}
        for layer_name in layer_names:
            layer = self.model.get_submodule(layer_name)
            for dep, _ in self.graph.get_pruning_group(layer, _out_channel_fn(layer), [0]):
                module = dep.target.module
                if isinstance(module, (nn.Conv2d, nn.Linear)) and module not in ignored:
                    found.setdefault(names[module])
        return list(found)

    def touched_weights(self) -> int:
        """Non-zero weights of the layers the units cut (:attr:`touched`).

        On a CIFAR ResNet these are the 3x3 convs after the stem, the count of the reference code
        (METHOD.md section 1); on any model, what the units prune and nothing they cannot."""
        return sum(
            int(torch.count_nonzero(self.model.get_submodule(n).weight.detach()))
            for n in self.touched
        )

    def remaining(self) -> float:
        """The remaining fraction x (METHOD.md section 1): :meth:`touched_weights` now over
        before pruning."""
        if not self.original_weights:
            raise ValueError("the model has no pruning unit; there is no remaining fraction")
        return self.touched_weights() / self.original_weights

    def norm_after(self, conv_name: str) -> str | None:
        """The normalization layer fed directly by ``conv_name`` (its BatchNorm), if any."""
        node = self.graph.module2node.get(self.model.get_submodule(conv_name))
        names = {module: name for name, module in self.model.named_modules()}
        outputs = list(node.outputs) if node is not None else []
        for out in outputs:
            if isinstance(out.module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                return names[out.module]
            # A norm that calls its functional form itself (timm's BatchNormAct2d) sits behind
            # the norm op's own node.
            if out.type == OPTYPE.ELEMENTWISE and "Norm" in type(out.grad_fn).__name__:
                outputs += out.outputs
        return None

    def norm_before(self, conv_name: str) -> str | None:
        """The normalization layer that feeds ``conv_name`` through activations only (the
        ``norm1`` of a pre-activation DenseNet layer's BN-ReLU-conv), if any."""
        node = self.graph.module2node.get(self.model.get_submodule(conv_name))
        names = {module: name for name, module in self.model.named_modules()}
        for _ in range(_MAX_GATE_HOPS):
            if node is None or len(node.inputs) != 1:
                return None
            node = node.inputs[0]
            if isinstance(node.module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                return names[node.module]
            if node.type != OPTYPE.ELEMENTWISE or len(node.outputs) != 1:
                return None
        return None

    def refresh(self) -> None:
        """Re-read the current out channels of every unit's layers."""
        for unit in self.units:
            unit.channels = [out_width(self.model.get_submodule(n)) for n in unit.convs]


def ignored_modules(model: nn.Module, patterns: Sequence[str], model_name: str) -> list[nn.Module]:
    """The modules ``model.ignored_layers`` names (shell patterns on qualified names, such as
    ``blocks.*.attn``), with everything inside them."""
    names = dict(model.named_modules())
    found: list[nn.Module] = []
    for pattern in patterns:
        matched = [
            module for name, module in names.items() if name and fnmatch.fnmatchcase(name, pattern)
        ]
        if not matched:
            examples = ", ".join(n for n in list(names)[1:6])
            raise ConfigError(
                "model.ignored_layers",
                f"'{pattern}' names no layer of {model_name}; give qualified module names or "
                f"shell patterns, e.g. {examples}",
            )
        for module in matched:
            found += [m for m in module.modules() if m not in found]
    return found


def ceil_share(share: float, count: int) -> int:
    """``ceil(share * count)``, without float noise adding one (0.7 * 10 is 7.000000000000001)."""
    return math.ceil(share * count - _CEIL_TOLERANCE)


def uniform_widths(
    original: dict[str, int], share: float, groups: dict[str, int] | None = None
) -> dict[str, int]:
    """Scope ``uniform``: every layer keeps ``C - ceil(share * C)`` of its ORIGINAL C channels
    (at least one), so a cumulative schedule gives the same widths whatever the steps before.
    A layer cut in G equal ``groups`` keeps that share of each group (at least two per group)."""
    widths = {}
    for name, channels in original.items():
        count = (groups or {}).get(name, 1)
        size = channels // count
        floor = 2 if count > 1 else 1
        widths[name] = count * max(floor, size - ceil_share(share, size))
    return widths


def select_global(
    scores: dict[str, torch.Tensor],
    original: dict[str, int],
    share: float,
    min_channels_share: float,
    groups: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Scope ``global``: the channels to remove so that ``ceil(share * N)`` of the N original
    channels of all layers are gone, chosen by one ranking across layers.

    ``scores`` holds each layer's current per-channel scores. They are divided by the layer's
    largest absolute score, so every layer's best channel scores 1 whatever the scale of its
    weights; the lowest normalised scores go first. A floor keeps at least
    ``max(1, ceil(min_channels_share * C_orig))`` channels in every layer: when the floors stop
    the ranking short of the target, the share ends below it. A layer cut in G equal ``groups``
    is ranked by position (the mean over its groups), each position counting G channels, and
    keeps at least two channels per group; the last position taken may pass the target by
    fewer than G channels.
    """
    groups = groups or {}
    total = sum(original.values())
    already = total - sum(len(s) for s in scores.values())
    wanted = ceil_share(share, total) - already
    candidates = []
    for layer, (name, layer_scores) in enumerate(scores.items()):
        count = groups.get(name, 1)
        size = len(layer_scores) // count
        floor = max(2 if count > 1 else 1, ceil_share(min_channels_share, original[name] // count))
        normalised = layer_scores / layer_scores.abs().max().clamp_min(torch.finfo().tiny)
        means = normalised.view(count, size).mean(dim=0)
        order = torch.argsort(means, stable=True)
        removable = order[: max(0, size - floor)].tolist()
        candidates += [(float(means[p]), layer, p, name) for p in removable]
    chosen: dict[str, list[int]] = {name: [] for name in scores}
    for _, _, position, name in sorted(candidates):
        if wanted <= 0:
            break
        count = groups.get(name, 1)
        size = len(scores[name]) // count
        chosen[name] += [position + g * size for g in range(count)]
        wanted -= count
    return {name: sorted(idxs) for name, idxs in chosen.items()}


def _as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    # Torch-Pruning first tries model(*example_inputs): a bare batch-of-one tensor would be
    # unpacked into one unbatched image. A tuple makes that first call the right one.
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _trace(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[tp.DependencyGraph, list[nn.Module]]:
    """Build the dependency graph in eval mode (BatchNorm statistics stay untouched) and record
    the order in which convs and linear layers first run. Every module's training flag is restored afterwards;
    frozen parameters (``requires_grad=False``) do not hide layers from the trace."""
    # Inputs that require grad give every op a grad_fn even where parameters are frozen.
    inputs = tuple(
        t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in _as_tuple(example_inputs)
    )
    flags = {m: m.training for m in model.modules()}
    order: list[nn.Module] = []
    seen: set[nn.Module] = set()

    def record(module: nn.Module, *_) -> None:
        if module not in seen:
            seen.add(module)
            order.append(module)

    hooks = [
        m.register_forward_hook(record)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
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
    """Whether a layer's output, through unary elementwise ops and reshapes only, multiplies another
    computed tensor (a product with a parameter, such as ConvNeXt's layer scale, is no gate)."""
    for _ in range(_MAX_GATE_HOPS):
        if len(node.outputs) != 1:
            return False
        node, before = node.outputs[0], node
        if node.type not in (OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE, OPTYPE.EXPAND):
            return False
        others = [n for n in node.inputs if n is not before]
        if type(node.grad_fn).__name__.startswith("MulBackward") and others:
            return any(n.type != OPTYPE.PARAMETER for n in others)
        if others:
            return False
    return False


def _block_name(model: nn.Module, layer_name: str) -> str:
    """The deepest module above the layer that is not a plain container and holds more than one
    conv or linear layer; else the deepest that is not a plain container (a conv-norm-act
    wrapper on its own in a stage); else the layer itself."""
    parts = layer_name.split(".")
    paths = [".".join(parts[:depth]) for depth in range(len(parts) - 1, 0, -1)]
    blocks = [p for p in paths if not isinstance(model.get_submodule(p), _CONTAINERS)]
    for path in blocks:
        modules = model.get_submodule(path).modules()
        if sum(isinstance(m, (nn.Conv2d, nn.Linear)) and not _depthwise(m) for m in modules) > 1:
            return path
    return blocks[0] if blocks else layer_name


def _depthwise(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups == layer.out_channels > 1


def _holds_conv(model: nn.Module, path: str) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.get_submodule(path).modules())


def out_width(layer: nn.Module) -> int:
    """Output channels of a conv, output features of a linear layer."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def _out_channel_fn(layer: nn.Module) -> Callable:
    if isinstance(layer, nn.Conv2d):
        return tp.prune_conv_out_channels
    return tp.prune_linear_out_channels


def _channel_groups(group: tp.Group) -> int:
    """Into how many equal groups ``group``'s channels are cut: the least common multiple of the
    groups of its grouped convs (depthwise ones aside, their channels map one to one) and of its
    GroupNorms; 1 when it has none."""
    count = 1
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not _depthwise(module):
            count = math.lcm(count, module.groups)
        elif isinstance(module, nn.GroupNorm):
            count = math.lcm(count, module.num_groups)
    return count


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


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
