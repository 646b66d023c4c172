"""Datasets and their loaders: CIFAR-10/100, ImageFolder trees (or a .tar.gz of one), sklearn's
digits and synthetic tensors.

Every dataset goes through the same steps in :func:`build_data`: a builder returns the untransformed
train pool and test set with their transforms, then a seeded split holds out the validation set
(the one every pruning decision looks at), optional seeded subsets shrink train/test for toy runs,
and the loaders are made.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import datasets
from torchvision import transforms as T

from icep.errors import ConfigError, IcepError

log = logging.getLogger(__name__)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_EXPECTED_TREE = (
    "a folder holding train/<class>/*.jpg and test/<class>/*.jpg ImageFolder trees "
    "(optionally val/), or a .tar.gz of one"
)
_CIFAR = {"cifar10": (datasets.CIFAR10, "CIFAR-10"), "cifar100": (datasets.CIFAR100, "CIFAR-100")}
_CIFAR_IMAGE_SIZE = 32
_AUGMENTS = ("cifar", "imagenet", "none")
_BAD_IMAGES = ("error", "skip")
_LISTED_BAD_IMAGES = 20  # the skip warning names this many files, then counts the rest
_DIGITS_MAX = 16  # load_digits pixels run 0..16


@dataclass
class Data:
    name: str
    train: DataLoader  # augmented, shuffled with a seeded generator
    val: DataLoader  # seeded split held out from train, eval transform; used for every decision
    test: DataLoader  # only reported
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)


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


def build_data(
    cfg: DictConfig,
    *,
    seed: int,
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    cache_dir: str | Path,
) -> Data:
    """Build the train/val/test loaders of the ``dataset`` config node ``cfg``.

    The val split and the optional ``train_subset``/``test_subset`` are drawn from ``seed``: the
    same seed gives the same samples. Archives named by ``dataset.root`` are unpacked once into
    ``cache_dir``.
    """
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise ConfigError("dataset.name", f"got {cfg.name!r}; expected one of {sorted(_BUILDERS)}")
    source = builder(cfg, seed=seed, cache_dir=_absolute(cache_dir))

    generator = torch.Generator().manual_seed(seed)
    train_idx, val_idx = _split_train_val(source, cfg, generator)
    test_idx = _subset(len(source.test), cfg.get("test_subset"), generator, "dataset.test_subset")
    val_base = source.val_pool if source.val_pool is not None else source.train_pool
    train = _Split(source.train_pool, train_idx, source.train_transform)
    val = _Split(val_base, val_idx, source.eval_transform)
    test = _Split(source.test, test_idx, source.eval_transform)

    workers = 0 if source.in_memory else num_workers

    def loader(dataset: Dataset, size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=workers,
            pin_memory=pin_memory,
            # Train workers restart each epoch, seeded from the loader's generator, so a resumed
            # run (which restores that generator) augments exactly as an uninterrupted one.
            persistent_workers=workers > 0 and not shuffle,
            drop_last=False,
        )

    input_shape = tuple(test[0][0].shape)
    log.info(
        "dataset %s%s: %d train / %d val / %d test samples, %d classes, input %s",
        cfg.name,
        f" ({source.description})" if source.description else "",
        len(train),
        len(val),
        len(test),
        source.num_classes,
        "x".join(map(str, input_shape)),
    )
    return Data(
        name=cfg.name,
        train=loader(train, batch_size, shuffle=True),
        val=loader(val, eval_batch_size, shuffle=False),
        test=loader(test, eval_batch_size, shuffle=False),
        num_classes=source.num_classes,
        input_shape=input_shape,
    )


def data_from_config(cfg: DictConfig, pin_memory: bool = False) -> Data:
    """The run's data from its whole config: ``dataset``, the ``trainer`` batch sizes and
    workers, the run seed and the dataset cache under ``paths.cache``."""
    return build_data(
        cfg.dataset,
        seed=cfg.seed,
        batch_size=cfg.trainer.batch_size,
        eval_batch_size=cfg.trainer.eval_batch_size,
        num_workers=cfg.trainer.num_workers,
        pin_memory=pin_memory,
        cache_dir=Path(cfg.paths.cache) / "datasets",
    )


def subsample(data: Data, train_fraction: float, eval_fraction: float, seed: int) -> Data:
    """A seeded share of each split of ``data`` (the tuning stage's small data): ``train_fraction``
    of train, ``eval_fraction`` of val and of test, at least one sample each. Same seed, same
    samples; the loaders keep their batch sizes and workers."""

    def shrink(loader: DataLoader, fraction: float, key: str, shuffle: bool) -> DataLoader:
        dataset = loader.dataset
        if not 0 < fraction <= 1:
            raise ConfigError(key, f"got {fraction}; must be in (0, 1]")
        n = len(dataset)
        size = max(1, round(n * fraction))
        picked = sorted(torch.randperm(n, generator=generator)[:size].tolist())
        if isinstance(dataset, _Split):
            part = _Split(dataset.base, [dataset.indices[i] for i in picked], dataset.transform)
        else:
            part = torch.utils.data.Subset(dataset, picked)
        workers = loader.num_workers
        return DataLoader(
            part,
            batch_size=loader.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=workers,
            pin_memory=loader.pin_memory,
            persistent_workers=workers > 0 and not shuffle,  # as in build_data
        )

    generator = torch.Generator().manual_seed(seed)
    return Data(
        name=data.name,
        train=shrink(data.train, train_fraction, "tune.train_fraction", shuffle=True),
        val=shrink(data.val, eval_fraction, "tune.eval_fraction", shuffle=False),
        test=shrink(data.test, eval_fraction, "tune.eval_fraction", shuffle=False),
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )


# --- splits -------------------------------------------------------------------------------------


def _split_train_val(
    source: _Source, cfg: DictConfig, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Seeded train/val indices. ``train_subset`` caps train + val together, in the proportion
    ``val_fraction``, whether val is split off train or comes from its own folder."""
    val_fraction = cfg.val_fraction
    if not 0 < val_fraction < 1:
        raise ConfigError("dataset.val_fraction", f"got {val_fraction}; expected 0 < x < 1")
    train_subset = cfg.get("train_subset")
    if train_subset is not None and train_subset < 2:
        raise ConfigError(
            "dataset.train_subset", f"got {train_subset}; expected null or at least 2"
        )

    if source.val_pool is None:
        pool = torch.randperm(len(source.train_pool), generator=generator).tolist()
        if train_subset is not None:
            pool = pool[:train_subset]
        n_val = max(1, round(len(pool) * val_fraction))
        val, train = pool[:n_val], pool[n_val:]
    else:
        train = torch.randperm(len(source.train_pool), generator=generator).tolist()
        val = torch.randperm(len(source.val_pool), generator=generator).tolist()
        if train_subset is not None:
            n_val = max(1, round(train_subset * val_fraction))
            train, val = train[: train_subset - n_val], val[:n_val]
    if not train or not val:
        raise ConfigError(
            "dataset.val_fraction",
            f"leaves {len(train)} train and {len(val)} val samples; both need at least one",
        )
    return sorted(train), sorted(val)


def _subset(n: int, size: int | None, generator: torch.Generator, key: str) -> list[int]:
    """All of ``range(n)``, or a seeded random ``size`` of them (all when size >= n)."""
    if size is None:
        return list(range(n))
    if size < 1:
        raise ConfigError(key, f"got {size}; expected null or a positive number of samples")
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


# --- transforms ---------------------------------------------------------------------------------


def _augment_mode(cfg: DictConfig, allowed: Sequence[str] = _AUGMENTS) -> str:
    value = cfg.get("augment")
    mode = "none" if value in (None, False) else str(value)
    if mode not in allowed:
        raise ConfigError(
            "dataset.augment", f"got {value!r}; expected one of {' | '.join(allowed)}"
        )
    return mode


def _image_transforms(cfg: DictConfig, image_size: int, mode: str) -> tuple[Callable, Callable]:
    """(train, eval) transforms from PIL images to normalized tensors of ``image_size``."""
    # Resize + CenterCrop make any folder of images square; on images already that size they copy.
    fit = [T.Resize(image_size), T.CenterCrop(image_size)]
    if mode == "cifar":
        train = [
            *fit,
            T.RandomCrop(image_size, padding=cfg.crop_padding),
            T.RandomHorizontalFlip(),
        ]
        val = fit
    elif mode == "imagenet":
        train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        val = [T.Resize(int(image_size / cfg.center_crop)), T.CenterCrop(image_size)]
    else:
        train = val = fit
    to_tensor = [T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose([*train, *to_tensor]), T.Compose([*val, *to_tensor])


# --- CIFAR --------------------------------------------------------------------------------------


def _build_cifar(cfg: DictConfig, *, seed: int, cache_dir: Path) -> _Source:
    cls, title = _CIFAR[cfg.name]
    root = _absolute(cfg.root)
    mode = _augment_mode(cfg, allowed=("cifar", "none"))
    train_tf, eval_tf = _image_transforms(cfg, _CIFAR_IMAGE_SIZE, mode)

    if not (root / cls.base_folder).is_dir():
        # The same images as an ImageFolder tree, e.g. the CIFAR-10 JPEG archive.
        tree = _find_tree(_unpack(root, cache_dir) if _is_archive(root) else root)
        if tree is not None:
            return _image_folder_source(tree, train_tf, eval_tf, _bad_images_mode(cfg))
        if not cfg.download:
            raise ConfigError(
                "dataset.root",
                f"{root} holds no {title} (expected {cls.base_folder}/ or an ImageFolder tree / "
                ".tar.gz with train/ and test/); set dataset.root=... or dataset.download=true",
            )
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise ConfigError(
            "dataset.root",
            f"{root / cls.base_folder} is incomplete or corrupt ({err}); "
            "fix the files or set dataset.download=true",
        ) from None
    return _Source(
        train, test, len(train.classes), train_tf, eval_tf, description=f"torchvision {root}"
    )


# --- ImageFolder --------------------------------------------------------------------------------


def _build_image_folder(cfg: DictConfig, *, seed: int, cache_dir: Path) -> _Source:
    if cfg.root is None:
        raise ConfigError("dataset.root", f"is not set; expected {_EXPECTED_TREE}")
    root = _absolute(cfg.root)
    if not root.exists():
        raise ConfigError("dataset.root", f"{root} does not exist; expected {_EXPECTED_TREE}")
    tree = _find_tree(_unpack(root, cache_dir) if _is_archive(root) else root)
    if tree is None:
        split = root.name in ("train", "val", "test") and (root.parent / "train").is_dir()
        hint = f"; it is one split of a tree: set dataset.root={root.parent}" if split else ""
        raise ConfigError(
            "dataset.root", f"{root} holds no train/ folder; expected {_EXPECTED_TREE}{hint}"
        )
    train_tf, eval_tf = _image_transforms(cfg, cfg.image_size, _augment_mode(cfg))
    return _image_folder_source(tree, train_tf, eval_tf, _bad_images_mode(cfg))


def _image_folder_source(
    tree: Path, train_tf: Callable, eval_tf: Callable, bad_images: str = "error"
) -> _Source:
    if not (tree / "test").is_dir():
        raise ConfigError(
            "dataset.root", f"{tree} has train/ but no test/; expected {_EXPECTED_TREE}"
        )
    train = _image_folder(tree / "train")
    test = _image_folder(tree / "test", classes=train.classes)
    val = _image_folder(tree / "val", classes=train.classes) if (tree / "val").is_dir() else None
    if bad_images == "skip":
        _drop_undecodable([d for d in (train, val, test) if d is not None])
    return _Source(
        train,
        test,
        len(train.classes),
        train_tf,
        eval_tf,
        val_pool=val,
        description=f"ImageFolder {tree}",
    )


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


def _bad_images_mode(cfg: DictConfig) -> str:
    mode = cfg.get("bad_images", "error")
    if mode not in _BAD_IMAGES:
        raise ConfigError("dataset.bad_images", f"got {mode!r}; expected error or skip")
    return mode


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


# --- in-memory datasets -------------------------------------------------------------------------


def _build_digits(cfg: DictConfig, *, seed: int, cache_dir: Path) -> _Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / _DIGITS_MAX
    images = T.Normalize(list(cfg.mean), list(cfg.std))(images)
    labels = torch.tensor(digits.target, dtype=torch.long)
    # A fixed test split, like CIFAR's test set: the run seed only moves train/val.
    train_idx, test_idx = train_test_split(
        range(len(labels)),
        test_size=cfg.test_fraction,
        random_state=cfg.test_split_seed,
        stratify=labels.numpy(),
    )
    return _Source(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=int(labels.max()) + 1,
        in_memory=True,
        description="sklearn load_digits",
    )


def _build_synthetic(cfg: DictConfig, *, seed: int, cache_dir: Path) -> _Source:
    """Each class is a fixed coarse pattern, upsampled to ``image_size``, plus Gaussian noise: a
    small CNN learns it in an epoch or two, which makes it a cheap end-to-end check."""
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.num_classes, cfg.channels, cfg.pattern_size, cfg.pattern_size)
    patterns = F.interpolate(torch.randn(shape, generator=generator), size=cfg.image_size)

    def sample(n: int) -> TensorDataset:
        labels = torch.randint(cfg.num_classes, (n,), generator=generator)
        noise = torch.randn((n, *patterns.shape[1:]), generator=generator)
        return TensorDataset(patterns[labels] + cfg.noise * noise, labels)

    return _Source(
        sample(cfg.num_samples),
        sample(cfg.num_test),
        num_classes=cfg.num_classes,
        in_memory=True,
    )


_BUILDERS: dict[str, Callable[..., _Source]] = {
    "cifar10": _build_cifar,
    "cifar100": _build_cifar,
    "image_folder": _build_image_folder,
    "digits": _build_digits,
    "synthetic": _build_synthetic,
}


def _absolute(path: str | Path) -> Path:
    """``path`` against the directory the run was started from, even if Hydra changed into its
    output folder."""
    return Path(to_absolute_path(str(Path(path).expanduser())))
