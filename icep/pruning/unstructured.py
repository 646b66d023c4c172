"""Unstructured pruning (METHOD.md section 6): global magnitude masks over conv and linear weights.

Nothing shrinks physically: a masked weight is set to zero and kept there. icep keeps its own
masks instead of ``torch.nn.utils.prune``'s reparametrisation, so the model's state dict stays a
plain one (checkpoints, resume and ``model.pt`` need nothing special) and a resumed run finds its
masks again as the zeros of its weights. A gradient hook zeroes the gradient of every masked
weight; with SGD (weight decay and momentum included) a weight that is zero with a zero gradient
stays exactly zero, as long as the optimizer is built after the prune (every pipeline builds a
fresh one after each step).
"""

from __future__ import annotations

import torch
from torch import nn

from icep.pruning.engine import ceil_share


class MagnitudePruner:
    """Global magnitude pruning of the weights of every ``nn.Conv2d`` and ``nn.Linear``.

    Masks start as the weights' non-zeros, so a run resumed from a checkpoint picks up where it
    stopped. :meth:`prune_to` raises the cumulative sparsity; :meth:`make_permanent` drops the
    hooks at the end (the zeros stay).
    """

    def __init__(self, model: nn.Module):
        self.weights = {
            name: module.weight
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        }
        self.total = sum(w.numel() for w in self.weights.values())
        self.masks = {name: w.detach() != 0 for name, w in self.weights.items()}
        self._hooks = [
            w.register_hook(lambda grad, name=name: grad * self.masks[name])
            for name, w in self.weights.items()
        ]

    def prune_to(self, sparsity: float) -> int:
        """Mask the smallest-magnitude weights across all layers until exactly
        ``ceil(sparsity * total)`` of them are masked (those masked before stay masked).
        Returns how many were masked by this call."""
        wanted = min(ceil_share(sparsity, self.total), self.total)
        before = self.masked()
        if wanted <= before:
            return 0
        flat = torch.cat(
            [
                w.detach().abs().flatten().float().masked_fill(~self.masks[n].flatten(), -1.0)
                for n, w in self.weights.items()
            ]
        )
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, wanted, largest=False).indices] = False
        offset = 0
        with torch.no_grad():
            for name, w in self.weights.items():
                mask = keep[offset : offset + w.numel()].view_as(w).to(w.device)
                self.masks[name] = mask
                w.mul_(mask)
                offset += w.numel()
        return wanted - before

    def masked(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        """The exact share of zero weights among the prunable ones."""
        zeros = sum(int((w.detach() == 0).sum()) for w in self.weights.values())
        return zeros / self.total

    def make_permanent(self) -> None:
        """Remove the gradient hooks; the masked weights stay zero."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


__all__ = ["MagnitudePruner"]
