"""Filter-importance criteria (METHOD.md section 5): one score per output channel of a conv.

A criterion is a class with one ``__call__(conv) -> Tensor`` that returns a score for each output
filter of ``conv``; the engine removes the lowest-scoring filters first. Scores are compared only
within one layer, so they need no normalisation.

Criteria that need data or gradients (Taylor, mean activation, entropy) fit the same interface:
they set ``needs_data = True`` and collect what they need in ``prepare(model, batches)``, which a
pipeline calls right before each pruning step; ``__call__`` then reads the collected statistics
for the given conv. The weight-only criteria below ignore ``prepare``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from icep.errors import ConfigError


class Criterion:
    """Scores the output filters of a conv; low score = pruned first."""

    name: ClassVar[str] = ""
    #: True when ``prepare`` must see data (forward or backward passes) before scoring.
    needs_data: ClassVar[bool] = False

    def prepare(self, model: nn.Module, batches: Iterable[Any]) -> None:
        """Collect whatever the scores need from ``model`` on ``batches`` (no-op by default)."""

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        """A float tensor of shape ``[conv.out_channels]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FilterNorm(Criterion):
    """The p-norm of each filter's weights (all input channels and kernel positions)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        weight = conv.weight.detach().flatten(1).float()
        return torch.linalg.vector_norm(weight, ord=self.p, dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class L1(FilterNorm):
    """Sum of the absolute weights of each filter."""

    name = "l1"

    def __init__(self):
        super().__init__(p=1)

    def __repr__(self) -> str:
        return "L1()"


class L2(FilterNorm):
    """Euclidean norm of each filter."""

    name = "l2"

    def __init__(self):
        super().__init__(p=2)

    def __repr__(self) -> str:
        return "L2()"


CRITERIA: dict[str, type[Criterion]] = {"l1": L1, "l2": L2}


def build_criterion(name: str, **kwargs: Any) -> Criterion:
    """The criterion registered as ``name``, built with ``kwargs`` (the rest of its config)."""
    if name not in CRITERIA:
        raise ConfigError(
            "criterion.name", f"unknown criterion '{name}'; choose one of: {', '.join(CRITERIA)}"
        )
    try:
        return CRITERIA[name](**kwargs)
    except TypeError as exc:  # an option the criterion does not take
        raise ConfigError("criterion", f"bad options for '{name}': {exc}") from None
