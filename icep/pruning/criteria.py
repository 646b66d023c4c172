"""Filter-importance criteria (METHOD.md section 5): one score per output channel of a conv.

A criterion is a class with one ``__call__(conv) -> Tensor`` that returns a score for each output
filter of ``conv``; the engine removes the lowest-scoring filters first. Scores are compared only
within one layer, so they need no normalisation.

Before each pruning step the pipeline calls :func:`prepare_criterion`, which hands the criterion
the engine (the model and its graph), the names of the convs about to be scored and, when the
criterion sets ``needs_data``, the training loader. ``prepare`` collects what ``__call__`` then
reads: the BatchNorm after each conv (bn_scale), gradients (taylor), activations
(mean_activation, entropy). Its time counts as pruning cost. Weight-only criteria ignore it.

Torch-Pruning's importance classes score a whole coupled group (the conv, its BatchNorm and the
next layer's input channels) and reduce over it; METHOD.md defines each criterion on the filter
(or its one BatchNorm channel) alone, so the criteria below compute their scores directly.

Every criterion has a config in conf/criterion/ whose ``_target_`` names its class; a new one is a
class here plus a YAML file there (``python -m icep.criteria_agreement --list`` lists them).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from icep.errors import IcepError
from icep.pruning.engine import out_width

if TYPE_CHECKING:
    from icep.pruning.engine import PruningEngine


class Criterion:
    """Scores the output filters of a conv; low score = pruned first."""

    name: ClassVar[str] = ""
    #: True when ``prepare`` must see training batches (forward or backward passes).
    needs_data: ClassVar[bool] = False
    #: True when ``prepare`` also runs backward passes (counted as work: icep.compute).
    needs_gradients: ClassVar[bool] = False

    def prepare(
        self,
        engine: PruningEngine,
        convs: Sequence[str],
        loader: Iterable[Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """Collect what scoring the convs named ``convs`` needs (no-op by default). ``loader``
        yields ``(inputs, targets)`` batches; it is None unless ``needs_data`` is set."""

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        """A float tensor of shape ``[conv.out_channels]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def prepare_criterion(
    criterion: Any,
    engine: PruningEngine,
    convs: Sequence[str],
    loader: Iterable[Any] | None,
    device: torch.device | str,
) -> None:
    """Let ``criterion`` look at the model before it scores ``convs`` (a plain callable has no
    ``prepare`` and is left alone); the loader goes only to criteria that need data."""
    prepare = getattr(criterion, "prepare", None)
    if prepare is not None:
        needs_data = getattr(criterion, "needs_data", False)
        prepare(engine, convs, loader if needs_data else None, device)


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


class FPGM(Criterion):
    """Sum of Euclidean distances from each filter to the other filters of the layer.

    FPGM (He et al., 2019): a filter near the geometric median of its layer is redundant; its
    score is small and it is pruned first."""

    name = "fpgm"

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        weight = conv.weight.detach().flatten(1).float()
        return torch.cdist(weight, weight).sum(dim=1)


class BNScale(Criterion):
    """|gamma| of the BatchNorm channel that follows the conv (Liu et al., 2017)."""

    name = "bn_scale"

    def __init__(self):
        self.norms: dict[nn.Module, nn.Module] = {}

    def prepare(self, engine, convs, loader=None, device="cpu") -> None:
        self.norms = {}
        for name in convs:
            norm = engine.norm_after(name)
            module = engine.model.get_submodule(norm) if norm is not None else None
            if not isinstance(module, nn.modules.batchnorm._NormBase) or module.weight is None:
                raise IcepError(
                    f"criterion bn_scale: {name} is not followed by a BatchNorm with a scale; "
                    "choose another criterion for this model"
                )
            self.norms[engine.model.get_submodule(name)] = module

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        if conv not in self.norms:
            raise ValueError("bn_scale: call prepare() with this conv's name before scoring it")
        return self.norms[conv].weight.detach().abs().float()


class _DataCriterion(Criterion):
    """A criterion computed from ``batches`` training batches; ``prepare`` stores one score
    tensor per conv, ``__call__`` returns it."""

    needs_data = True

    def __init__(self, batches: int = 8):
        if batches < 1:
            raise ValueError(f"batches must be at least 1, got {batches}")
        self.batches = batches
        self.scores: dict[nn.Module, torch.Tensor] = {}

    def prepare(self, engine, convs, loader=None, device="cpu") -> None:
        if loader is None:
            raise ValueError(f"{self.name} needs training batches to score filters")
        model = engine.model
        modules = [model.get_submodule(name) for name in convs]
        flags = {m: m.training for m in model.modules()}
        model.eval()  # BatchNorm statistics and dropout stay as they are
        try:
            self.scores = self.collect(engine, convs, modules, loader, device)
        finally:
            for module, training in flags.items():
                module.training = training

    def collect(
        self,
        engine: PruningEngine,
        names: Sequence[str],
        convs: list[nn.Conv2d],
        loader: Iterable[Any],
        device: torch.device | str,
    ) -> dict[nn.Module, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        scores = self.scores.get(conv)
        if scores is None:
            raise ValueError(f"{self.name}: call prepare() with this conv's name before scoring it")
        if scores.shape != (out_width(conv),):
            raise ValueError(f"{self.name}: scores were collected for another width of this conv")
        return scores

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batches={self.batches})"


class Taylor(_DataCriterion):
    """First-order Taylor: (sum over the filter of grad * weight)^2, summed over batches.

    Molchanov et al. (2019); the gradient is that of the cross-entropy loss on ``batches``
    training batches, in eval mode (BatchNorm statistics untouched)."""

    name = "taylor"
    needs_gradients = True

    def collect(self, engine, names, convs, loader, device):
        weights = [conv.weight for conv in convs]
        flags = [w.requires_grad for w in weights]
        scores = [torch.zeros(out_width(conv), device=device) for conv in convs]
        try:
            for w in weights:  # a frozen conv is scored too; it needs a gradient meanwhile
                w.requires_grad_(True)
            with torch.enable_grad():
                for x, y in islice(loader, self.batches):
                    x, y = x.to(device), y.to(device)
                    loss = F.cross_entropy(engine.model(x), y)
                    grads = torch.autograd.grad(loss, weights)
                    for score, w, g in zip(scores, weights, grads, strict=True):
                        score += (g.detach() * w.detach()).flatten(1).sum(dim=1).float().pow(2)
        finally:
            for w, flag in zip(weights, flags, strict=True):
                w.requires_grad_(flag)
        return {conv: s.cpu() for conv, s in zip(convs, scores, strict=True)}


class _ActivationCriterion(_DataCriterion):
    """Scores from the per-image mean of each channel's ReLU'd BatchNorm output (the conv's own
    output when no BatchNorm follows)."""

    def collect(self, engine, names, convs, loader, device):
        means: dict[nn.Module, list[torch.Tensor]] = {conv: [] for conv in convs}
        hooks = []
        for name, conv in zip(names, convs, strict=True):
            norm = engine.norm_after(name)
            watched = engine.model.get_submodule(norm) if norm is not None else conv

            def record(_module, _inputs, output, conv=conv):
                means[conv].append(_per_image_channel_means(output, conv))

            hooks.append(watched.register_forward_hook(record))
        try:
            with torch.no_grad():
                for x, _ in islice(loader, self.batches):
                    engine.model(x.to(device))
        finally:
            for hook in hooks:
                hook.remove()
        return {conv: self.reduce(torch.cat(per_image)) for conv, per_image in means.items()}

    def reduce(self, per_image: torch.Tensor) -> torch.Tensor:
        """``[images, channels]`` per-image means -> one score per channel."""
        raise NotImplementedError


def _per_image_channel_means(output: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``[images, channels]``: the mean over positions of each ReLU'd channel. A conv's channels
    are dimension 1; a linear layer's the last one (ConvNeXt's MLP runs channels-last)."""
    values = output.detach().float().relu()
    if isinstance(layer, nn.Linear):
        values = values.movedim(-1, 1)
    return values.flatten(2).mean(dim=2).cpu() if values.dim() > 2 else values.cpu()


class MeanActivation(_ActivationCriterion):
    """Mean over images and positions of the ReLU'd BatchNorm output of each channel."""

    name = "mean_activation"

    def reduce(self, per_image: torch.Tensor) -> torch.Tensor:
        return per_image.mean(dim=0)


class Entropy(_ActivationCriterion):
    """Entropy of a histogram of each channel's per-image mean activation.

    ``bins`` bins over the channel's own range, in nats: a channel that is always the same
    carries no information and scores 0."""

    name = "entropy"

    def __init__(self, batches: int = 8, bins: int = 20):
        super().__init__(batches)
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.bins = bins

    def reduce(self, per_image: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros(per_image.shape[1])
        for c, values in enumerate(per_image.double().T):
            low, high = values.min().item(), values.max().item()
            if high - low <= 1e-12 * max(1.0, abs(high)):
                continue  # constant: one bin, zero entropy
            p = torch.histc(values, bins=self.bins, min=low, max=high)
            p = p[p > 0] / values.numel()
            scores[c] = float(-(p * p.log()).sum())
        return scores

    def __repr__(self) -> str:
        return f"Entropy(batches={self.batches}, bins={self.bins})"


class Random(Criterion):
    """A uniformly random choice of filters without replacement (a control).

    Each conv gets a random permutation as its scores. The permutation depends on ``seed`` and,
    after ``prepare``, on the conv's name and width only, so a resumed run draws the same one."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.names: dict[nn.Module, str] = {}
        self._fallback = torch.Generator().manual_seed(self.seed)

    def prepare(self, engine, convs, loader=None, device="cpu") -> None:
        self.names = {engine.model.get_submodule(name): name for name in convs}

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        name = self.names.get(conv)
        if name is None:  # no prepare: one stream of draws from the seed
            generator = self._fallback
        else:
            key = zlib.crc32(f"{self.seed}/{name}/{out_width(conv)}".encode())
            generator = torch.Generator().manual_seed(key)
        return torch.randperm(out_width(conv), generator=generator).float()

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"
