"""Datasets and their loaders: CIFAR-10/100, ImageFolder trees (or a .tar.gz of one), sklearn's
digits and synthetic tensors.

Each ``conf/dataset/*.yaml`` names its class with ``_target_`` (:class:`Cifar10`,
:class:`Cifar100`, :class:`ImageFolderTree`, :class:`Digits`, :class:`Synthetic`); its keys are
that dataclass's fields. Every dataset then goes through the same steps in :func:`build_data`: its
``load()`` returns the untransformed train pool and test set with their transforms, a seeded split
holds out the validation set (the one every pruning decision looks at), optional seeded subsets
shrink train/test for toy runs, and the loaders are made.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    TensorDataset,
)
from torchvision import datasets
from torchvision import transforms as T

from icep.device_batches import DeviceLoader, TensorSplit, check_normalization, share
from icep.errors import ConfigError, IcepError
from icep.interrupts import leave_signals_to_the_main_process, signals_held

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_EXPECTED_TREE = (
    "a folder holding train/<class>/*.jpg and test/<class>/*.jpg ImageFolder trees "
    "(optionally val/), or a .tar.gz of one"
)
_CIFAR_IMAGE_SIZE = 32
_LISTED_BAD_IMAGES = 20  # the skip warning names this many files, then counts the rest
_DIGITS_MAX = 16  # load_digits pixels run 0..16
_DECODE_REPORT_EVERY = 10_000  # a progress line per this many decoded images


@dataclass
class Data:
    """The splits' loaders: DataLoaders, or DeviceLoaders over data held on the device (both give
    (images, labels) batches and have ``dataset``, ``batch_size`` and, for train, ``generator``)."""

    name: str
    train: DataLoader | DeviceLoader  # augmented, shuffled with a seeded generator
    # Held out from train, not augmented; every decision uses it. None with dataset.val_fraction=0
    # (train on all of it, decide on test: the ICE reference's setup).
    val: DataLoader | DeviceLoader | None
    test: DataLoader | DeviceLoader  # only reported
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    classes: list[str] = field(default_factory=list)  # class names, by label
    # How a raw image becomes the model's input (saved with a model, for users of the file):
    # ``scale`` the raw pixel values (uint8 0..255; digits 0..16), subtract ``mean``, divide by
    # ``std`` (null: not normalized); images read from files are first resized so their short
    # side is ``resize``, then center-cropped to ``crop`` (``fit: stretch``: resized to
    # ``crop`` x ``crop``).
    preprocessing: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    """What a dataset builder hands back: untransformed datasets and the transforms to apply."""

    train_pool: Dataset
    test: Dataset
    num_classes: int
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    val_pool: Dataset | None = None  # a separate val/ folder; None: split val off train_pool
    in_memory: bool = False  # tensors in memory: worker processes only add overhead
    description: str = ""
    # The device path (icep.device_batches): ``pixels(dataset, indices)`` gives those samples as
    # (N, C, H, W) uint8 (or float) images and their labels; None: this source cannot give them.
    pixels: Callable[[Dataset, list[int]], tuple[torch.Tensor, torch.Tensor]] | None = None
    scale: float = 1 / 255  # uint8 to [0, 1]; then (x - mean) / std
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    # The train augmentation on the device, (crop padding, flip); None: only the transforms do it.
    device_augment: tuple[int, bool] | None = (0, False)
    sample_bytes: int = 0  # one sample's pixels as the device path holds them
    classes: Sequence[str] | None = None  # class names by label; None: the labels as text
    resize: dict[str, Any] | None = None  # images from files: resize, crop, fit (Data)


class _Split(Dataset):
    """The samples of ``base`` at ``indices``, passed through the split's transform."""

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable | None = None):
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.base[self.indices[i]]
        return (self.transform(x) if self.transform is not None else x), y


@dataclass(kw_only=True)
class DatasetSpec:
    """What a ``conf/dataset/*.yaml`` says, built from its ``_target_``: the keys every dataset
    has. A subclass per kind of dataset adds its own keys (its config file is its schema) and
    reads its pools in :meth:`load`."""

    name: str  # the dataset's label: cache keys, reports, W&B tags
    val_fraction: float  # seeded share of the train pool held out for validation
    train_subset: int | None  # a seeded subset of that many train + val samples (toy runs)
    test_subset: int | None  # a seeded subset of that many test samples (toy runs)

    def load(self, *, seed: int, cache_dir: Path) -> _Source:
        """The untransformed pools and their transforms. ``seed``: the run's, for generated
        data; ``cache_dir``: where archives are unpacked and decoded images are kept."""
        raise NotImplementedError


# How batches are made (trainer.batching; see build_data).
Batching = Literal["auto", "device", "workers"]


def build_data(
    dataset: DictConfig | DatasetSpec,
    *,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    cache_dir: str | Path,
    device: torch.device | str = "cpu",
    batching: Batching = "auto",
    device_data_gb: float = 8.0,
    prefetch_factor: int = 4,
    shard: tuple[int, int] = (0, 1),
) -> Data:
    """Build the train/val/test loaders of ``dataset``: the ``dataset`` config node (built from
    its ``_target_``) or the spec built from it.

    The val split and the optional ``train_subset``/``test_subset`` are drawn from ``seed``: the
    same seed gives the same samples. Archives named by ``dataset.root`` are unpacked once into
    ``cache_dir``.

    ``batching``: ``device`` holds every split whole on ``device`` as uint8 and augments batches
    there (:mod:`icep.device_batches`); ``workers`` reads samples through DataLoaders with
    ``num_workers`` processes (pinned memory on CUDA, ``prefetch_factor`` batches ahead);
    ``auto`` takes ``device`` when the source can give its pixels, its train augmentation can be
    done on tensors and all its samples take at most ``device_data_gb`` GiB, else ``workers``.

    ``shard=(rank, ranks)``: a rank of a data-parallel run (:mod:`icep.distributed`). Its loaders
    give it its part of every batch of ``batch_size`` and ``eval_batch_size`` (the whole run's
    batches; :class:`ShardSampler`), drawn from the same seeded order on every rank.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else build_dataset(dataset)
    device = torch.device(device)
    source = spec.load(seed=seed, cache_dir=_absolute(cache_dir))

    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = _split_train_val(source, spec, generator)
    test_idx = _subset(len(source.test), spec.test_subset, generator)
    val_base = source.val_pool if source.val_pool is not None else source.train_pool
    n_samples = len(train_idx) + len(val_idx) + len(test_idx)
    on_device = _use_device_path(source, batching, n_samples, device_data_gb, device)

    if on_device:
        train, val, test = _tensor_splits(
            source, val_base, (train_idx, val_idx, test_idx), device, cache_dir
        )
        padding, flip = source.device_augment
        splits = {
            "train": DeviceLoader(
                train,
                batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
                crop_padding=padding,
                flip=flip,
                shard=shard,
            ),
            "val": DeviceLoader(val, eval_batch_size, shard=shard) if val is not None else None,
            "test": DeviceLoader(test, eval_batch_size, shard=shard),
        }
    else:
        train = _Split(source.train_pool, train_idx, source.train_transform)
        val = _Split(val_base, val_idx, source.eval_transform)
        test = _Split(source.test, test_idx, source.eval_transform)
        workers = 0 if source.in_memory else num_workers
        pin = device.type == "cuda"
        splits = {
            name: _loader(
                split,
                size,
                torch.Generator().manual_seed(seed) if name == "train" else None,
                workers,
                pin,
                prefetch_factor,
                shard,
            )
            for name, split, size in (
                ("train", train, batch_size),
                ("val", val, eval_batch_size),
                ("test", test, eval_batch_size),
            )
        }

    if not val_idx:  # dataset.val_fraction=0: no val split
        splits["val"] = None
    input_shape = tuple(test[0][0].shape)
    log.info(
        "dataset %s%s: %d train / %d val / %d test samples, %d classes, input %s; %s",
        spec.name,
        f" ({source.description})" if source.description else "",
        len(train),
        len(val_idx),
        len(test),
        source.num_classes,
        "x".join(map(str, input_shape)),
        f"held on {device} as {train.images.dtype}, batches augmented there"
        if on_device
        else f"read by DataLoaders with {splits['train'].num_workers} workers",
    )
    return Data(
        name=spec.name,
        **splits,
        num_classes=source.num_classes,
        input_shape=input_shape,
        classes=[str(c) for c in source.classes or range(source.num_classes)],
        preprocessing={
            "input_shape": list(input_shape),
            "scale": source.scale,
            "mean": None if source.mean is None else [float(m) for m in source.mean],
            "std": None if source.std is None else [float(s) for s in source.std],
            **(source.resize or {"resize": None, "crop": None, "fit": None}),
        },
    )


def _loader(
    dataset: Dataset,
    size: int,
    generator: torch.Generator | None,
    workers: int,
    pin_memory: bool,
    prefetch_factor: int | None,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader:
    """A loader in batches of ``size`` (a data-parallel rank: its part of them), shuffled by
    ``generator`` (None: in order)."""
    rank, ranks = shard
    shuffle = generator is not None
    if ranks > 1:
        order = (
            RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        )
        # An evaluation's parts may be one shorter than others: the loader batches this rank's
        # indices in the longest part's size, which keeps every train part a batch of its own.
        sampler = ShardSampler(order, size, rank, ranks, drop_small=shuffle)
        batching = {"batch_size": -(-size // ranks), "sampler": sampler}
    else:
        batching = {"batch_size": size, "shuffle": shuffle}
    return _Loader(
        dataset,
        **batching,
        generator=generator,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        # Train workers restart each epoch, seeded from the loader's generator, so a resumed
        # run (which restores that generator) augments exactly as an uninterrupted one.
        persistent_workers=workers > 0 and not shuffle,
        drop_last=False,
        worker_init_fn=leave_signals_to_the_main_process,
    )


class ShardSampler(Sampler[int]):
    """This rank's part of every batch: ``order``'s indices grouped in batches of ``batch_size``
    (the whole run's), each cut into ``ranks`` near-equal parts (the first ones one longer when it
    does not divide), part ``rank`` kept. Every rank draws the same order, so the parts of one
    batch are the batch a run on one process trains on. ``drop_small``: a last batch smaller
    than ``ranks`` is left out (training: DDP needs a sample on every rank at every step)."""

    def __init__(
        self, order: Sampler[int], batch_size: int, rank: int, ranks: int, drop_small: bool
    ):
        self.order = order
        self.batch_size = batch_size
        self.rank = rank
        self.ranks = ranks
        self.drop_small = drop_small

    def _part(self, batch: list[int]) -> list[int]:
        begin, end = share(len(batch), self.rank, self.ranks)
        return batch[begin:end]

    def __iter__(self):
        batch: list[int] = []
        for i in self.order:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield from self._part(batch)
                batch = []
        if batch and not (self.drop_small and len(batch) < self.ranks):
            yield from self._part(batch)

    def __len__(self) -> int:
        full, tail = divmod(len(self.order), self.batch_size)
        count = full * len(self._part(list(range(self.batch_size))))
        if tail and not (self.drop_small and tail < self.ranks):
            count += len(self._part(list(range(tail))))
        return count


class _Loader(DataLoader):
    """A DataLoader whose worker processes start with SIGINT and SIGTERM held, until their
    ``worker_init_fn`` ignores them (:mod:`icep.interrupts`): a run stops in its main process."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        with signals_held():  # the workers start here (each epoch, unless persistent)
            return super()._get_iterator()

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, ranks) of the data-parallel run this loader gives its part of each batch."""
        if isinstance(self.sampler, ShardSampler):
            return self.sampler.rank, self.sampler.ranks
        return 0, 1

    @property
    def global_batch_size(self) -> int:
        """The batch size of the whole run (this rank gets its part of each batch)."""
        if isinstance(self.sampler, ShardSampler):
            return self.sampler.batch_size
        return self.batch_size

    @property
    def shuffles(self) -> bool:
        order = self.sampler.order if isinstance(self.sampler, ShardSampler) else self.sampler
        return isinstance(order, RandomSampler)


def with_batch_size(
    loader: DataLoader | DeviceLoader, batch_size: int
) -> DataLoader | DeviceLoader:
    """``loader`` in batches of ``batch_size`` (dense training's ``dense.batch_size``): the same
    samples, augmentation, workers and the same ``generator`` object, so the run's random stream
    stays the one a single loader would draw, and restoring the generator resumes both."""
    if batch_size == loader.global_batch_size:
        return loader
    if isinstance(loader, DeviceLoader):
        return loader.with_batch_size(batch_size)
    return _loader(
        loader.dataset,
        batch_size,
        loader.generator if loader.shuffles else None,
        loader.num_workers,
        loader.pin_memory,
        loader.prefetch_factor,
        loader.shard,
    )


def build_dataset(node: DictConfig) -> DatasetSpec:
    """The :class:`DatasetSpec` a ``dataset`` config node names with ``_target_``; a node that
    cannot be built is a ConfigError naming ``dataset``."""
    from icep.config import build

    spec = build(
        OmegaConf.create({"dataset": OmegaConf.to_container(node, resolve=True)}), "dataset"
    )
    if not isinstance(spec, DatasetSpec):
        raise ConfigError(
            "dataset._target_",
            f"got {node.get('_target_')!r}; expected a DatasetSpec class, e.g. icep.data.Cifar10",
        )
    return spec


def _use_device_path(
    source: _Source, batching: Batching, n_samples: int, limit_gb: float, device: torch.device
) -> bool:
    """Whether the splits go on the device (see :func:`build_data`'s ``batching``)."""
    if batching == "workers":
        return False
    why_not = None
    if source.pixels is None:
        why_not = "this dataset cannot be held as tensors"
    elif source.device_augment is None:
        why_not = "its train augmentation (dataset.augment) is not one the device path does"
    gib = n_samples * source.sample_bytes / 2**30
    if batching == "device":
        if why_not is not None:
            raise ConfigError(
                "trainer.batching", f"device: {why_not}; use trainer.batching=workers or auto"
            )
        return True
    if why_not is not None:
        log.info("trainer.batching=auto: DataLoader workers, as %s", why_not)
        return False
    if gib > limit_gb:
        log.info(
            "trainer.batching=auto: DataLoader workers, as the %d samples take %.1f GiB as uint8, "
            "over trainer.device_data_gb=%g",
            n_samples,
            gib,
            limit_gb,
        )
        return False
    return True


def _tensor_splits(
    source: _Source,
    val_base: Dataset,
    indices: tuple[list[int], list[int], list[int]],
    device: torch.device,
    cache_dir: str | Path,
) -> tuple[TensorSplit, TensorSplit | None, TensorSplit]:
    """train, val and test as :class:`TensorSplit` on ``device``: each pool's needed samples are
    read once (ImageFolder trees: decoded, and cached when the whole pool is read). No val
    indices, no val split."""
    train_idx, val_idx, test_idx = indices
    norm = {"scale": source.scale, "mean": source.mean, "std": source.std}

    def split(images: torch.Tensor, labels: torch.Tensor, idx: list[int]) -> TensorSplit:
        return TensorSplit(images.to(device), labels.to(device), idx, **norm)

    if val_base is source.train_pool:
        both = sorted(set(train_idx) | set(val_idx))
        images, labels = source.pixels(source.train_pool, both)
        where = {j: i for i, j in enumerate(both)}
        at_train = torch.tensor([where[j] for j in train_idx], dtype=torch.long)
        at_val = torch.tensor([where[j] for j in val_idx], dtype=torch.long)
        train = split(images[at_train], labels[at_train], train_idx)
        val = split(images[at_val], labels[at_val], val_idx)
    else:
        train = split(*source.pixels(source.train_pool, train_idx), train_idx)
        val = split(*source.pixels(val_base, val_idx), val_idx) if val_idx else None
    test = split(*source.pixels(source.test, test_idx), test_idx)
    return train, val, test


def data_from_config(cfg: DictConfig, device: torch.device | str = "cpu") -> Data:
    """The run's data from its whole config: ``dataset``, the ``trainer`` batch sizes, how
    batches are made and workers, the run seed and the dataset cache under ``paths.cache``, for
    ``device``; in a data-parallel run, this rank's part of every batch."""
    from icep import distributed

    trainer = cfg.trainer
    here = distributed.world()
    dense = cfg.get("dense") or {}
    for key, size in (
        ("trainer.batch_size", trainer.batch_size),
        ("dense.batch_size", dense.get("batch_size")),
    ):
        if size is not None and size % here.size:
            raise ConfigError(
                key,
                f"{size} is the batch of the whole run, which {here.size} ranks share equally; "
                f"make it a multiple of {here.size}",
            )
    return build_data(
        cfg.dataset,
        seed=cfg.seed,
        batch_size=trainer.batch_size,
        eval_batch_size=trainer.eval_batch_size,
        num_workers=trainer.num_workers,
        cache_dir=Path(cfg.paths.cache) / "datasets",
        device=device,
        batching=trainer.get("batching", "auto"),
        device_data_gb=trainer.get("device_data_gb", 8.0),
        prefetch_factor=trainer.get("prefetch_factor", 4),
        shard=(here.rank, here.size),
    )


def subsample(data: Data, train_fraction: float, eval_fraction: float, seed: int) -> Data:
    """A seeded share of each split of ``data`` (the tuning stage's small data): ``train_fraction``
    of train, ``eval_fraction`` of val and of test, at least one sample each. Same seed, same
    samples; the loaders keep their batch sizes and workers."""

    def shrink(loader: DataLoader | DeviceLoader, fraction: float, shuffle: bool):
        dataset = loader.dataset
        n = len(dataset)
        size = max(1, round(n * fraction))
        picked = sorted(torch.randperm(n, generator=generator)[:size].tolist())
        if isinstance(loader, DeviceLoader):
            return loader.with_dataset(dataset.subset(picked), torch.Generator().manual_seed(seed))
        if isinstance(dataset, _Split):
            part = _Split(dataset.base, [dataset.indices[i] for i in picked], dataset.transform)
        else:
            part = torch.utils.data.Subset(dataset, picked)
        return _loader(
            part,
            loader.global_batch_size,
            torch.Generator().manual_seed(seed) if shuffle else None,
            loader.num_workers,
            loader.pin_memory,
            loader.prefetch_factor,
            loader.shard,
        )

    generator = torch.Generator().manual_seed(seed)
    return replace(
        data,
        train=shrink(data.train, train_fraction, shuffle=True),
        val=None if data.val is None else shrink(data.val, eval_fraction, shuffle=False),
        test=shrink(data.test, eval_fraction, shuffle=False),
    )


# --- splits -------------------------------------------------------------------------------------


def _split_train_val(
    source: _Source, spec: DatasetSpec, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Seeded train/val indices. ``train_subset`` caps train + val together, in the proportion
    ``val_fraction``, whether val is split off train or comes from its own folder."""
    val_fraction, train_subset = spec.val_fraction, spec.train_subset
    if source.val_pool is None:
        pool = torch.randperm(len(source.train_pool), generator=generator).tolist()
        if train_subset is not None:
            pool = pool[:train_subset]
        n_val = max(1, round(len(pool) * val_fraction)) if val_fraction > 0 else 0
        val, train = pool[:n_val], pool[n_val:]
    else:
        train = torch.randperm(len(source.train_pool), generator=generator).tolist()
        val = torch.randperm(len(source.val_pool), generator=generator).tolist()
        if val_fraction == 0:
            val = []
        if train_subset is not None:
            n_val = max(1, round(train_subset * val_fraction)) if val_fraction > 0 else 0
            train, val = train[: train_subset - n_val], val[:n_val]
    if not train or (not val and val_fraction > 0):
        raise ConfigError(
            "dataset.val_fraction",
            f"leaves {len(train)} train and {len(val)} val samples; both need at least one",
        )
    return sorted(train), sorted(val)


def _subset(n: int, size: int | None, generator: torch.Generator) -> list[int]:
    """All of ``range(n)``, or a seeded random ``size`` of them (all when size >= n)."""
    if size is None:
        return list(range(n))
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


# --- image datasets -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Images(DatasetSpec):
    """RGB images read from files (or CIFAR's arrays): where they are, how undecodable files are
    handled, the augmentation and the normalization."""

    root: str | None  # a folder or archive; relative to where the run starts
    bad_images: str  # error | skip (ImageFolder trees only)
    augment: str  # cifar | imagenet | none
    crop_padding: int  # augment=cifar: pixels of zero padding before the random crop
    mean: Sequence[float]  # per-channel normalization of the images scaled to [0, 1]
    std: Sequence[float]

    def _transforms(
        self, image_size: int, center_crop: float | None = None, fit: str = "crop"
    ) -> tuple[Callable, Callable]:
        """(train, eval) transforms from PIL images to normalized tensors of ``image_size``."""
        # Resize + CenterCrop (or a stretch) make any folder of images square; on images already
        # that size they copy.
        fit = _fit(image_size, fit)
        if self.augment == "cifar":
            train = [
                *fit,
                T.RandomCrop(image_size, padding=self.crop_padding),
                T.RandomHorizontalFlip(),
            ]
            val = fit
        elif self.augment == "imagenet":
            train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
            val = [T.Resize(int(image_size / center_crop)), T.CenterCrop(image_size)]
        else:
            train = val = fit
        to_tensor = [T.ToTensor(), _Normalize(list(self.mean), list(self.std))]
        return T.Compose([*train, *to_tensor]), T.Compose([*val, *to_tensor])

    def _device_augment(self) -> tuple[int, bool] | None:
        """The train augmentation as the device path does it: (crop padding, flip); None for
        ``imagenet``, whose RandomResizedCrop needs the images at full size."""
        return {"cifar": (int(self.crop_padding), True), "none": (0, False)}.get(self.augment)

    def _source(
        self, image_size: int, center_crop: float | None = None, fit: str = "crop", **fields
    ) -> _Source:
        """A _Source of RGB images of ``image_size`` with this dataset's normalization and both
        paths' augmentation."""
        train_tf, eval_tf = self._transforms(image_size, center_crop, fit)
        if self.augment == "imagenet":
            resize = {"resize": int(image_size / center_crop), "crop": image_size, "fit": "crop"}
        else:
            resize = {"resize": image_size, "crop": image_size, "fit": fit}
        return _Source(
            train_transform=train_tf,
            eval_transform=eval_tf,
            mean=list(self.mean),
            std=list(self.std),
            device_augment=self._device_augment(),
            sample_bytes=3 * image_size * image_size,
            classes=getattr(fields["train_pool"], "classes", None),
            resize=resize,
            **fields,
        )

    def _tree_source(
        self,
        tree: Path,
        image_size: int,
        cache_dir: Path,
        center_crop: float | None = None,
        fit: str = "crop",
    ) -> _Source:
        """The ImageFolder tree at ``tree`` (train/, test/ and optionally val/)."""
        if not (tree / "test").is_dir():
            raise ConfigError(
                "dataset.root", f"{tree} has train/ but no test/; expected {_EXPECTED_TREE}"
            )
        train = _image_folder(tree / "train")
        test = _image_folder(tree / "test", classes=train.classes)
        val = (
            _image_folder(tree / "val", classes=train.classes) if (tree / "val").is_dir() else None
        )
        if self.bad_images == "skip":
            _drop_undecodable([d for d in (train, val, test) if d is not None])
        return self._source(
            image_size,
            center_crop,
            fit,
            train_pool=train,
            test=test,
            num_classes=len(train.classes),
            val_pool=val,
            description=f"ImageFolder {tree}",
            pixels=functools.partial(
                _decoded_pixels, image_size=image_size, cache_dir=cache_dir, fit=fit
            ),
        )


# --- CIFAR --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class _Cifar(_Images):
    """torchvision's CIFAR files under ``root``, or the same images as an ImageFolder tree (or a
    .tar.gz of one, such as the CIFAR-10 JPEG archive), at 32x32."""

    download: bool  # torchvision downloads its files into root when missing

    torchvision_class: ClassVar[type[datasets.CIFAR10]]
    title: ClassVar[str]

    def load(self, *, seed: int, cache_dir: Path) -> _Source:
        cls, title = self.torchvision_class, self.title
        if self.augment == "imagenet":  # RandomResizedCrop is for large images
            raise ConfigError("dataset.augment", f"got 'imagenet'; {title} takes cifar or none")
        root = _absolute(self.root)

        if not (root / cls.base_folder).is_dir():
            # The same images as an ImageFolder tree, e.g. the CIFAR-10 JPEG archive.
            tree = _find_tree(_unpack(root, cache_dir) if _is_archive(root) else root)
            if tree is not None:
                return self._tree_source(tree, _CIFAR_IMAGE_SIZE, cache_dir)
            if not self.download:
                raise ConfigError(
                    "dataset.root",
                    f"{root} holds no {title} (expected {cls.base_folder}/ or an ImageFolder tree "
                    "/ .tar.gz with train/ and test/); set dataset.root=... or "
                    "dataset.download=true",
                )
        try:
            train = cls(str(root), train=True, download=self.download)
            test = cls(str(root), train=False, download=self.download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise ConfigError(
                "dataset.root",
                f"{root / cls.base_folder} is incomplete or corrupt ({err}); "
                "fix the files or set dataset.download=true",
            ) from None
        return self._source(
            _CIFAR_IMAGE_SIZE,
            train_pool=train,
            test=test,
            num_classes=len(train.classes),
            description=f"torchvision {root}",
            pixels=_array_pixels,
        )


@dataclass(kw_only=True)
class Cifar10(_Cifar):
    """CIFAR-10 (conf/dataset/cifar10.yaml): cifar-10-batches-py/ or an ImageFolder tree."""

    torchvision_class: ClassVar[type[datasets.CIFAR10]] = datasets.CIFAR10
    title: ClassVar[str] = "CIFAR-10"


@dataclass(kw_only=True)
class Cifar100(_Cifar):
    """CIFAR-100 (conf/dataset/cifar100.yaml): cifar-100-python/ or an ImageFolder tree."""

    torchvision_class: ClassVar[type[datasets.CIFAR10]] = datasets.CIFAR100
    title: ClassVar[str] = "CIFAR-100"


# --- ImageFolder --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ImageFolderTree(_Images):
    """Any image classification set in torchvision's ImageFolder layout, or a .tar.gz of one
    (conf/dataset/image_folder.yaml), resized and center-cropped to ``image_size``."""

    image_size: int
    center_crop: float  # augment=imagenet: share of the resized eval image the crop keeps
    fit: str = "crop"  # crop: Resize(short side) + CenterCrop | stretch: Resize((S, S))

    def load(self, *, seed: int, cache_dir: Path) -> _Source:
        if self.root is None:
            raise ConfigError("dataset.root", f"is not set; expected {_EXPECTED_TREE}")
        root = _absolute(self.root)
        if not root.exists():
            raise ConfigError("dataset.root", f"{root} does not exist; expected {_EXPECTED_TREE}")
        tree = _find_tree(_unpack(root, cache_dir) if _is_archive(root) else root)
        if tree is None:
            split = root.name in ("train", "val", "test") and (root.parent / "train").is_dir()
            hint = f"; it is one split of a tree: set dataset.root={root.parent}" if split else ""
            raise ConfigError(
                "dataset.root", f"{root} holds no train/ folder; expected {_EXPECTED_TREE}{hint}"
            )
        return self._tree_source(tree, self.image_size, cache_dir, self.center_crop, self.fit)


def _image_folder(folder: Path, classes: list[str] | None = None) -> datasets.ImageFolder:
    try:
        dataset = datasets.ImageFolder(str(folder), loader=load_image)
    except FileNotFoundError as err:  # no class folders, or no images in them
        raise ConfigError("dataset.root", f"{err}; expected {_EXPECTED_TREE}") from None
    if classes is not None and dataset.classes != classes:
        raise ConfigError(
            "dataset.root",
            f"{folder} has classes {dataset.classes} but train/ has {classes}; they must match",
        )
    return dataset


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _decodes(path: str | Path) -> bool:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, still reads every byte
            image.load()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        return False
    return True


def load_image(path: str) -> Image.Image:
    """ImageFolder's loader, with an error naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as exc:
        raise IcepError(
            f"dataset: cannot decode image {path} ({_reason(exc)}); replace or delete the file, "
            "or set dataset.bad_images=skip to leave undecodable images out"
        ) from None


def _drop_undecodable(folders: list[datasets.ImageFolder]) -> None:
    """dataset.bad_images=skip: decode every image once and leave out those that fail, with one
    warning that names them."""
    start = time.perf_counter()
    bad: list[str] = []
    for dataset in folders:
        keep = []
        for path, target in dataset.samples:
            if _decodes(path):
                keep.append((path, target))
            else:
                bad.append(path)
        dataset.samples = dataset.imgs = keep
        dataset.targets = [target for _, target in keep]
        if not keep:
            raise ConfigError("dataset.root", f"{dataset.root} holds no image that decodes")
    log.info(
        "dataset.bad_images=skip: checked %d images in %.1f s",
        sum(len(d) for d in folders) + len(bad),
        time.perf_counter() - start,
    )
    if bad:
        shown = ", ".join(bad[:_LISTED_BAD_IMAGES])
        more = f" and {len(bad) - _LISTED_BAD_IMAGES} more" if len(bad) > _LISTED_BAD_IMAGES else ""
        log.warning(
            "dataset.bad_images=skip: left out %d image(s) that cannot be decoded: %s%s",
            len(bad),
            shown,
            more,
        )


def _find_tree(root: Path, max_depth: int = 3) -> Path | None:
    """The shallowest folder under ``root`` (itself included) that holds ``train/``; an archive
    may wrap the tree in a folder or two."""
    level = [root] if root.is_dir() else []
    for _ in range(max_depth + 1):
        for folder in level:
            if (folder / "train").is_dir():
                return folder
        level = sorted(
            child
            for folder in level
            for child in folder.iterdir()
            if child.is_dir() and not child.name.startswith(".")
        )
    return None


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_ARCHIVE_SUFFIXES)


def _unpack(archive: Path, cache_dir: Path) -> Path:
    """Unpack ``archive`` once into ``cache_dir/<stem>-<hash of size and mtime>/`` and return it.

    It is unpacked into a temp folder beside the target and renamed into place, so a crash never
    leaves half a tree behind and two runs racing each other both end with one whole copy.
    """
    stat = archive.stat()
    stem = next(archive.name[: -len(s)] for s in _ARCHIVE_SUFFIXES if archive.name.endswith(s))
    key = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = cache_dir / f"{stem}-{key}"
    if target.is_dir():
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("unpacking %s into %s (once; later runs reuse it)", archive, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{target.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        try:
            with tarfile.open(archive) as tar:
                # The "data" filter refuses absolute paths, links out of the folder and devices.
                tar.extractall(tmp, filter="data")
        except tarfile.FilterError as exc:  # a member the "data" filter refuses
            raise ConfigError(
                "dataset.root",
                f"{archive} holds a member icep does not unpack, for safety ({type(exc).__name__}: "
                f"{exc}); pack the tree again without absolute paths, links that leave it or "
                "device files (tar -czf x.tar.gz -C parent folder)",
            ) from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise ConfigError(
                "dataset.root",
                f"{archive} cannot be unpacked ({type(exc).__name__}: {exc}); the archive is "
                "damaged or truncated: copy or download it again",
            ) from None
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("another run unpacked %s first; using its copy", archive)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked %s in %.1f s", archive.name, time.perf_counter() - start)
    return target


# --- pixels for the device path -----------------------------------------------------------------


def _array_pixels(dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's CIFAR: its ``data`` array (N, H, W, C) uint8 and ``targets``."""
    at = torch.tensor(indices, dtype=torch.long)
    images = torch.from_numpy(dataset.data)[at].permute(0, 3, 1, 2)
    return images, torch.tensor(dataset.targets, dtype=torch.long)[at]


def _tensor_pixels(dataset: TensorDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    at = torch.tensor(indices, dtype=torch.long)
    images, labels = dataset.tensors
    return images[at], labels[at]


def _decoded_pixels(
    folder: datasets.ImageFolder,
    indices: list[int],
    *,
    image_size: int,
    cache_dir: Path,
    fit: str = "crop",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of an ImageFolder at ``indices``, decoded, resized and center-cropped (or
    stretched, ``fit``) to ``image_size`` as uint8 (N, 3, S, S), and their labels.

    All of a folder is decoded once and kept in ``cache_dir/decoded/`` (keyed on the files'
    paths, sizes and times, and the size), so later runs load it in a second; a subset (toy runs)
    is decoded on the spot.
    """
    labels = torch.tensor([folder.targets[i] for i in indices], dtype=torch.long)
    whole = len(indices) == len(folder)
    cache = _decoded_cache(folder, image_size, cache_dir, fit) if whole else None
    if cache is not None and cache.exists():
        images = torch.from_numpy(np.load(cache))
        if len(images) == len(folder):
            return images[torch.tensor(indices, dtype=torch.long)].permute(0, 3, 1, 2), labels
    paths = [folder.samples[i][0] for i in indices]
    fit = T.Compose(_fit(image_size, fit))
    start = time.perf_counter()
    log.info("decoding %d images of %s into memory", len(paths), folder.root)

    def decode(path: str) -> np.ndarray:
        return np.asarray(fit(load_image(path)), dtype=np.uint8)

    pixels = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    # PIL decodes outside the GIL: threads share the work without pickling images.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(pool.map(decode, paths)):
            pixels[i] = image
            if (i + 1) % _DECODE_REPORT_EVERY == 0:
                log.info("decoded %d/%d images", i + 1, len(paths))
    log.info("decoded %d images in %.1f s", len(paths), time.perf_counter() - start)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, pixels)
        os.replace(tmp, cache)  # whole or absent, also when two runs race
        log.info("kept the decoded images in %s for later runs", cache)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2), labels


def _fit(image_size: int, how: str) -> list[Callable]:
    """Square images of ``image_size``: the short side resized, then the centre cropped
    (``crop``), or the whole image resized to a square (``stretch``, the ICE reference's
    Resize((224, 224)))."""
    if how == "stretch":
        return [T.Resize((image_size, image_size))]
    return [T.Resize(image_size), T.CenterCrop(image_size)]


def _decoded_cache(
    folder: datasets.ImageFolder, image_size: int, cache_dir: Path, fit: str = "crop"
) -> Path:
    # Crop was the only fit when the cache began: its files keep their keys.
    key = hashlib.sha256(f"{image_size}\n{'' if fit == 'crop' else fit}".encode())
    for path, target in folder.samples:
        stat = os.stat(path)
        key.update(f"{path}\t{target}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    name = Path(folder.root).name
    return cache_dir / "decoded" / f"{name}-{image_size}px-{key.hexdigest()[:12]}.npy"


# --- in-memory datasets -------------------------------------------------------------------------


@dataclass(kw_only=True)
class Digits(DatasetSpec):
    """sklearn's load_digits (conf/dataset/digits.yaml): 1,797 8x8 grayscale digits, in memory,
    no augmentation."""

    test_fraction: float  # stratified share held out as the test set
    test_split_seed: int  # the test split is fixed like CIFAR's; the run seed moves train/val
    mean: Sequence[float]  # of the pixels scaled to [0, 1]
    std: Sequence[float]

    def load(self, *, seed: int, cache_dir: Path) -> _Source:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # 0..16
        labels = torch.tensor(digits.target, dtype=torch.long)
        # A fixed test split, like CIFAR's test set: the run seed only moves train/val.
        train_idx, test_idx = train_test_split(
            range(len(labels)),
            test_size=self.test_fraction,
            random_state=self.test_split_seed,
            stratify=labels.numpy(),
        )
        return _Source(
            TensorDataset(images[train_idx], labels[train_idx]),
            TensorDataset(images[test_idx], labels[test_idx]),
            num_classes=int(labels.max()) + 1,
            train_transform=_ScaleNormalize(1 / _DIGITS_MAX, self.mean, self.std),
            eval_transform=_ScaleNormalize(1 / _DIGITS_MAX, self.mean, self.std),
            in_memory=True,
            description="sklearn load_digits",
            pixels=_tensor_pixels,
            scale=1 / _DIGITS_MAX,
            mean=list(self.mean),
            std=list(self.std),
            sample_bytes=images[0].numel(),
        )


class _ScaleNormalize:
    """A uint8 tensor image to float, scaled to [0, 1] and normalized (digits' workers path)."""

    def __init__(self, scale: float, mean: Sequence[float], std: Sequence[float]):
        self.scale = scale
        self.mean = torch.tensor(list(mean)).view(-1, 1, 1)
        self.std = torch.tensor(list(std)).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        check_normalization(image.shape[-3] if image.dim() >= 3 else 1, self.mean, self.std)
        return (image.float() * self.scale - self.mean) / self.std


class _Normalize(T.Normalize):
    """torchvision's Normalize, refusing a mean or std that does not give one value per channel
    (:func:`check_normalization`)."""

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        check_normalization(tensor.shape[-3], self.mean, self.std)
        return super().forward(tensor)


@dataclass(kw_only=True)
class Synthetic(DatasetSpec):
    """Generated tensors (conf/dataset/synthetic.yaml): each class is a fixed coarse pattern,
    upsampled to ``image_size``, plus Gaussian noise, all drawn from the run seed. A small CNN
    learns it in an epoch or two, which makes it a cheap end-to-end check."""

    num_samples: int  # train + val pool
    num_test: int
    num_classes: int
    channels: int
    image_size: int
    pattern_size: int  # class patterns are drawn on this coarse grid, then upsampled
    noise: float  # std of the noise added to the pattern (the pattern's own std is 1)

    def load(self, *, seed: int, cache_dir: Path) -> _Source:
        generator = torch.Generator().manual_seed(seed)
        shape = (self.num_classes, self.channels, self.pattern_size, self.pattern_size)
        patterns = F.interpolate(torch.randn(shape, generator=generator), size=self.image_size)

        def sample(n: int) -> TensorDataset:
            labels = torch.randint(self.num_classes, (n,), generator=generator)
            noise = torch.randn((n, *patterns.shape[1:]), generator=generator)
            return TensorDataset(patterns[labels] + self.noise * noise, labels)

        return _Source(
            sample(self.num_samples),
            sample(self.num_test),
            num_classes=self.num_classes,
            in_memory=True,
            pixels=_tensor_pixels,
            scale=1.0,
            sample_bytes=patterns[0].numel() * patterns.element_size(),
        )


def _absolute(path: str | Path) -> Path:
    """``path`` against the directory the run was started from, even if Hydra changed into its
    output folder."""
    return Path(to_absolute_path(str(Path(path).expanduser())))
