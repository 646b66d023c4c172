"""Counting the work a run does, so that its cost compares across machines and loads.

The counting model (README, "Compute accounting"):

- Only convolutions and linear layers count: their multiply-accumulates (MACs) per image, measured
  with forward hooks on one image at the model's current shape, so every prune shows in the next
  count. Normalisation, activations, pooling, residual adds, the optimizer step and the data
  augmentation are not counted (a few percent of a CNN's arithmetic).
- A forward pass costs 2 FLOPs per MAC.
- A backward pass costs twice the forward: the gradient with respect to each layer's input and the
  one with respect to its weight each cost what the forward did. A layer whose weight is frozen
  (``requires_grad=False``) skips its weight-gradient half. The input gradient of the first layer,
  which autograd also skips, is counted: a small overestimate, the same for every pipeline.
- A distillation teacher costs one forward pass per training image.

So a trained image costs ``6 * MACs - 2 * frozen MACs`` FLOPs and an evaluated one ``2 * MACs``.
The counts are exact integers: the same run twice gives the same counts on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads when a cost is measured: the report reads counts without it
    import torch
    from torch import nn

WORK_KEYS = ("images_fwd", "images_bwd", "flops")


@dataclass(frozen=True)
class ModelCost:
    """Per-image MACs of one forward pass: all counted layers, and those with a frozen weight."""

    macs: int
    frozen_macs: int = 0

    @property
    def forward_flops(self) -> int:
        return 2 * self.macs

    @property
    def train_flops(self) -> int:
        """Forward plus backward: 2 + 2 + 2 FLOPs per MAC, less the weight gradients of the
        frozen layers."""
        return 6 * self.macs - 2 * self.frozen_macs


def _layer_macs(module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """MACs of one call of a conv or linear layer on one image."""
    from torch import nn

    weight = module.weight
    if isinstance(module, nn.Linear):
        return output.numel() * weight.shape[1]
    if getattr(module, "transposed", False):
        # weight (in, out / groups, *kernel): each input value feeds out / groups x kernel outputs
        return inputs.numel() * weight[0].numel()
    # weight (out, in / groups, *kernel): each output value sums in / groups x kernel products
    return output.numel() * weight[0].numel()


def measure_cost(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """The :class:`ModelCost` of ``model`` for one input of ``input_shape`` (without the batch
    dimension), from one forward pass in eval mode without gradients: BatchNorm statistics and the
    training flag are left as they were."""
    import torch
    from torch import nn

    counted = (nn.modules.conv._ConvNd, nn.Linear)  # the layers whose arithmetic is counted
    per_layer: list[tuple[nn.Module, int]] = []

    def hook(module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            per_layer.append((module, _layer_macs(module, inputs[0], output)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return ModelCost(
        macs=sum(macs for _, macs in per_layer),
        frozen_macs=sum(macs for m, macs in per_layer if not m.weight.requires_grad),
    )


class CostCache:
    """:func:`measure_cost` per model state: measured again only when a prune changed a shape or
    freezing changed which weights train."""

    def __init__(self, size: int = 32):
        self.size = size
        self._costs: dict[tuple, ModelCost] = {}

    def __call__(self, model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
        key = (
            id(model),
            tuple(input_shape),
            tuple((tuple(p.shape), p.requires_grad) for p in model.parameters()),
        )
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= self.size:
                self._costs.clear()
            cost = self._costs[key] = measure_cost(model, tuple(input_shape))
        return cost


def format_flops(flops: float) -> str:
    """``1.23 TFLOP``-style text for a FLOP count."""
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if flops >= div:
            return f"{flops / div:.3g} {prefix}FLOP"
    return f"{int(flops)} FLOP"
