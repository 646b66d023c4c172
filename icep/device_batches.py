"""The fast data path: a split held whole as one tensor on the training device.

Small datasets (CIFAR, digits, synthetic, any ImageFolder of small images) fit in GPU memory as
uint8. :class:`DeviceLoader` then cuts each batch out of that tensor, applies the padded random
crop and the horizontal flip there, in one gather for the whole batch, and normalizes it: no
DataLoader workers, no host-to-device copy per batch, no per-image Python. On the CPU the same
path replaces PIL's per-image transforms with batched tensor ops.

Shuffling and augmentation draw from the loader's CPU ``generator`` (one permutation and one set of
offsets per epoch), so the same seed gives the same batches on any device and a resumed run that
restores the generator augments exactly as an uninterrupted one. In a data-parallel run every rank
draws the whole batch and keeps its share (``shard``): the run trains on the batches, and the
augmentations, of a run on one process.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset


def check_normalization(
    channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> None:
    """``dataset.mean`` and ``dataset.std`` give one value per channel of the images (torch would
    broadcast 2 values over a 1-channel image into a 2-channel one without a word)."""
    from icep.errors import ConfigError

    for key, values in (("dataset.mean", mean), ("dataset.std", std)):
        if values is not None and len(values) != channels:
            raise ConfigError(
                key,
                f"has {len(values)} values, but the images have {channels} channel"
                f"{'s' if channels != 1 else ''}; give one value per channel",
            )


class TensorSplit(Dataset):
    """The samples of one split as whole tensors on one device.

    ``images`` is (N, C, H, W), uint8 (scaled by ``scale`` to [0, 1], then normalized by ``mean``
    and ``std``) or float (taken as they are when ``scale`` is 1 and mean/std are 0/1).
    ``indices`` are the samples' positions in the pool they were drawn from, as for the file-backed
    splits. Indexing one sample gives the normalized image, as the file-backed splits do.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int],
        *,
        scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        if images.dim() != 4 or len(images) != len(labels) or len(images) != len(indices):
            raise ValueError(
                f"images {tuple(images.shape)}, labels {len(labels)} and indices {len(indices)} "
                "must describe the same N samples as (N, C, H, W)"
            )
        self.images = images
        self.labels = labels
        self.indices = list(indices)
        channels = images.shape[1]
        check_normalization(channels, mean, std)
        mean_t = torch.tensor(list(mean) if mean is not None else [0.0] * channels)
        std_t = torch.tensor(list(std) if std is not None else [1.0] * channels)
        # x * scale, minus mean, over std: one multiply-add per pixel.
        self._mul = (scale / std_t).view(1, -1, 1, 1).to(images.device)
        self._add = (-mean_t / std_t).view(1, -1, 1, 1).to(images.device)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[i : i + 1])[0], int(self.labels[i])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 or float images of this split to normalized float32."""
        return torch.addcmul(self._add, batch.float(), self._mul)

    def subset(self, picked: Sequence[int]) -> TensorSplit:
        """The samples at positions ``picked`` of this split."""
        at = torch.as_tensor(list(picked), dtype=torch.long, device=self.device)
        part = copy.copy(self)  # the same normalization
        part.images, part.labels = self.images[at], self.labels[at]
        part.indices = [self.indices[i] for i in picked]
        return part


class DeviceLoader:
    """Batches of a :class:`TensorSplit`, made on its device.

    ``crop_padding`` > 0: a random crop of the image's size out of the image zero-padded by that
    many pixels on each side (torchvision's ``RandomCrop(size, padding)``); ``flip``: a horizontal
    flip with probability 1/2. Both are drawn per sample from ``generator``.

    It answers what the pipelines ask of a DataLoader: iteration over (images, labels),
    ``len()`` in batches, ``batch_size``, ``dataset``, ``generator``, ``num_workers``.

    ``shard=(rank, ranks)``: each batch of ``batch_size`` (the whole run's) is cut into ``ranks``
    near-equal parts and this loader gives part ``rank`` (:func:`share`); a last batch too small to
    give every rank a sample is left out when shuffling (training: every rank takes each step).
    """

    num_workers = 0
    pin_memory = False

    def __init__(
        self,
        dataset: TensorSplit,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator if generator is not None else torch.Generator()
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.drop_last = drop_last
        self.shard = shard

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    def __len__(self) -> int:
        n, ranks = len(self.dataset), self.shard[1]
        if self.drop_last or (self.shuffle and ranks > 1 and 0 < n % self.batch_size < ranks):
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def with_dataset(self, dataset: TensorSplit, generator: torch.Generator) -> DeviceLoader:
        """The same loader over another split (a subset), shuffled by ``generator``."""
        return DeviceLoader(
            dataset,
            self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            crop_padding=self.crop_padding,
            flip=self.flip,
            drop_last=self.drop_last,
            shard=self.shard,
        )

    def with_batch_size(self, batch_size: int) -> DeviceLoader:
        """The same loader in batches of ``batch_size``, drawing from the same ``generator``
        object, so shuffling and augmentation go on from its state (and a run that restores it
        resumes them)."""
        return DeviceLoader(
            self.dataset,
            batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            crop_padding=self.crop_padding,
            flip=self.flip,
            drop_last=self.drop_last,
            shard=self.shard,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        split = self.dataset
        n, device = len(split), split.device
        # A DataLoader draws its workers' base seed first, then the sampler's permutation: the
        # same two draws here give the same order as the DataLoader path from the same seed.
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(device, non_blocking=True)
        else:
            order = torch.arange(n, device=device)
        if self.augments:
            # One draw per sample per epoch, on the CPU generator, in one copy to the device.
            pad, size = self.crop_padding, split.images.shape[-2:]
            shift = torch.randint(0, 2 * pad + 1, (2, n), generator=self.generator)
            flips = (
                torch.rand(n, generator=self.generator) < 0.5
                if self.flip
                else torch.zeros(n, dtype=torch.bool)
            )
            draws = torch.cat([shift, flips[None].long()]).to(device, non_blocking=True)
            rows = torch.arange(size[0], device=device)
            cols = torch.arange(size[1], device=device)
        stop = min(n, len(self) * self.batch_size)
        rank, ranks = self.shard
        for start in range(0, stop, self.batch_size):
            at = order[start : start + self.batch_size]
            if ranks > 1:
                begin, end = share(len(at), rank, ranks)
                at = at[begin:end]
                if not len(at):
                    continue  # an evaluation's last batch, smaller than the ranks
            images = split.images[at]
            if self.augments:
                images = _crop_flip(images, draws[:, at], self.crop_padding, rows, cols)
            yield split.normalize(images), split.labels[at]


def share(n: int, rank: int, ranks: int) -> tuple[int, int]:
    """Where part ``rank`` of a batch of ``n`` cut into ``ranks`` near-equal parts begins and ends
    (the first ``n % ranks`` parts one longer, as ``torch.tensor_split``)."""
    size, longer = divmod(n, ranks)
    begin = rank * size + min(rank, longer)
    return begin, begin + size + (rank < longer)


def _crop_flip(
    images: torch.Tensor, draws: torch.Tensor, pad: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Per-sample padded random crop and horizontal flip of a batch, as one gather.

    ``draws`` is (3, B): the crop's top and left offset into the padded image, and the flip.
    Pixels that fall into the padding are zero, as torchvision's RandomCrop pads them.
    """
    if pad > 0:
        images = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    top, left, flip = draws[0], draws[1], draws[2].bool()
    width = cols.numel()
    r = top[:, None] + rows  # (B, H)
    c = torch.where(flip[:, None], width - 1 - cols, cols) + left[:, None]  # (B, W)
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    # (B, H, W, C) out of (B, C, H', W'): advanced indices first, then the channel slice.
    out = images.permute(0, 2, 3, 1)[batch, r[:, :, None], c[:, None, :]]
    return out.permute(0, 3, 1, 2)
