"""icep.data: the dataset configs and their checks, splits, subsets, transforms and the sources
(digits, synthetic, ImageFolder, CIFAR)."""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from icep.config import validate
from icep.data import (
    Cifar10,
    Cifar100,
    Data,
    Digits,
    ImageFolderTree,
    Synthetic,
    build_data,
    build_dataset,
)
from icep.errors import ConfigError, IcepError

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED_CIFAR = CONF.parents[1] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ("ant", "bee", "cat")


def run_cfg(*overrides: str) -> DictConfig:
    """The whole config as the app composes it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def dataset_cfg(name: str, **values) -> DictConfig:
    """The ``dataset`` node as the app composes it, with ``values`` set on top."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+dataset={name}"]).dataset
    for key, value in values.items():
        cfg[key] = value
    return cfg


@pytest.fixture(autouse=True)
def run_in_tmp(tmp_path, monkeypatch):
    """Each test starts in its own folder: a cache a test does not name lands there."""
    monkeypatch.chdir(tmp_path)


def build(cfg: DictConfig, seed: int = 0, cache_dir: Path | str = "cache", **kw) -> Data:
    args = {"batch_size": 16, "eval_batch_size": 32, "num_workers": 0, **kw}
    return build_data(cfg, seed=seed, cache_dir=cache_dir, **args)


def indices(data: Data) -> dict[str, list[int]]:
    return {split: getattr(data, split).dataset.indices for split in ("train", "val", "test")}


def make_tree(root: Path, splits=("train", "test"), per_class: int = 4) -> Path:
    """A tiny ImageFolder tree: one flat colour per class, PNG and JPEG mixed, odd image sizes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((36, 40, 3), 60 * c + 20, np.uint8)
                pixels += rng.integers(0, 20, pixels.shape, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def make_archive(tree: Path, archive: Path, inner: str = "pack/tiny") -> Path:
    """``tree`` packed as a .tar.gz, nested in ``inner`` folders like real archives often are."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=inner)
    return archive


def make_cifar10(root: Path, per_batch: int = 20) -> Path:
    """A fake torchvision ``cifar-10-batches-py`` with the real file names and pickle keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture
def fake_cifar_checks(monkeypatch):
    """Let torchvision's CIFAR10 accept the fake files (it checks their md5 sums)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kw: True)  # batches.meta


# --- the configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, cls",
    [
        ("cifar10", Cifar10),
        ("cifar100", Cifar100),
        ("image_folder", ImageFolderTree),
        ("digits", Digits),
        ("synthetic", Synthetic),
    ],
)
def test_each_dataset_config_builds_its_class(name, cls):
    """The config is the class's schema: every key is a field, ``name`` stays the label."""
    validate(run_cfg(f"dataset={name}"))
    spec = build_dataset(dataset_cfg(name))
    assert type(spec) is cls and spec.name == name


def test_a_key_the_dataset_does_not_take_names_the_node():
    cfg = dataset_cfg("digits")
    with open_dict(cfg):
        cfg.image_size = 32  # digits are 8x8, always
    with pytest.raises(ConfigError, match="^dataset: cannot build icep.data.Digits: .*image_size"):
        build(cfg)


def test_a_node_without_a_dataset_class_names_target():
    with pytest.raises(ConfigError, match="^dataset._target_: got None"):
        build(DictConfig({"name": "mnist"}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["dataset.val_fraction=-0.1"], "got -0.1; must be a number in [0, 1)"),
        (["dataset.val_fraction=1.0"], "got 1.0; must be a number in [0, 1)"),
        (["dataset.train_subset=1"], "got 1; must be null or an integer >= 2"),
        (["dataset.train_subset=0.5"], "got 0.5; must be null or an integer >= 2"),
        (["dataset.test_subset=0"], "got 0; must be null or an integer >= 1"),
        (["dataset.std=[0.0]"], "got [0.0]; must be a list of numbers > 0, one per channel"),
        (["dataset=image_folder", "dataset.augment=mixup"], "got 'mixup'; must be cifar, imagenet"),
        (["dataset=image_folder", "dataset.bad_images=ignore"], "got 'ignore'; must be error or"),
        (["dataset=image_folder", "dataset.image_size=0"], "got 0; must be an integer >= 1"),
        (["dataset=image_folder", "dataset.center_crop=2"], "got 2; must be a number in (0, 1]"),
        (["dataset=cifar10", "dataset.crop_padding=-1"], "got -1; must be an integer >= 0"),
        (["dataset=cifar10", "dataset.download=yes"], "got 'yes'; must be true or false"),
        (["dataset=synthetic", "dataset.num_classes=1"], "got 1; must be an integer >= 2"),
        (["dataset=synthetic", "dataset.noise=-1"], "got -1; must be a number >= 0"),
    ],
)
def test_bad_dataset_values_are_refused_before_any_data(overrides, message):
    """One rule per key in icep.config.RULES, checked before the data is touched."""
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}: {re.escape(message)}"):
        validate(run_cfg(*overrides))


# --- digits and synthetic -----------------------------------------------------------------------


def test_digits_splits_add_up_and_are_disjoint():
    data = build(dataset_cfg("digits"))
    split = indices(data)
    assert set(split["train"]).isdisjoint(split["val"])
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 1797
    assert len(split["test"]) == math.ceil(1797 * 0.2)  # sklearn rounds the test share up
    assert len(split["val"]) == round((1797 - len(split["test"])) * 0.1)
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert data.train.num_workers == 0  # in-memory: workers forced off

    x, y = next(iter(data.train))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    pixels = torch.cat([x for x, _ in data.train])
    assert abs(pixels.mean()) < 0.1 and abs(pixels.std() - 1) < 0.1  # normalized


def test_split_depends_on_seed_only():
    cfg = dataset_cfg("digits")
    first, again, other = (indices(build(cfg, seed=s)) for s in (0, 0, 1))
    assert first == again
    assert first["val"] != other["val"] and first["train"] != other["train"]
    assert first["test"] == other["test"]  # a fixed test set, like CIFAR's


def test_val_fraction_is_configurable():
    split = indices(build(dataset_cfg("digits", val_fraction=0.25)))
    n_pool = len(split["train"]) + len(split["val"])
    assert len(split["val"]) == round(n_pool * 0.25)


@pytest.mark.parametrize("batching", ["workers", "device"])
def test_val_fraction_zero_trains_on_the_whole_train_pool(batching, tmp_path):
    """The ICE reference's data: every train image trains, decisions are on test, no val."""
    data = build(dataset_cfg("digits", val_fraction=0), batching=batching)
    assert data.val is None
    assert len(data.train.dataset) + len(data.test.dataset) == 1797
    tree = make_tree(tmp_path / "tiny", splits=("train", "val", "test"), per_class=2)
    data = build(dataset_cfg("image_folder", root=str(tree), val_fraction=0), batching=batching)
    assert data.val is None and len(data.train.dataset) == 6  # its val/ folder is not read


def test_deciding_on_val_without_a_val_split_is_refused():
    with pytest.raises(ConfigError, match="^pipeline.decision_split: got val, but dataset.val_fr"):
        validate(run_cfg("dataset.val_fraction=0"))
    validate(run_cfg("dataset.val_fraction=0", "pipeline.decision_split=test"))


def test_subsets_are_seeded():
    cfg = dataset_cfg("digits", train_subset=100, test_subset=30)
    split = indices(build(cfg))
    assert len(split["train"]) + len(split["val"]) == 100 and len(split["val"]) == 10
    assert len(split["test"]) == 30
    assert split == indices(build(cfg))
    assert split["train"] != indices(build(cfg, seed=1))["train"]


def test_a_split_that_leaves_no_train_sample_names_val_fraction():
    """What the rules cannot know: how many samples the data has."""
    with pytest.raises(ConfigError, match="^dataset.val_fraction: leaves 0 train and 2 val"):
        build(dataset_cfg("digits", train_subset=2, val_fraction=0.9))


def test_synthetic_shapes_and_determinism():
    cfg = dataset_cfg("synthetic", num_samples=100, num_test=40, num_classes=4, image_size=16)
    data = build(cfg)
    assert data.num_classes == 4 and data.input_shape == (3, 16, 16)
    assert len(data.train.dataset) + len(data.val.dataset) == 100 and len(data.test.dataset) == 40

    def batches(d: Data) -> list[torch.Tensor]:
        return [x for loader in (d.train, d.val, d.test) for x, _ in loader]

    same, other = build(cfg), build(cfg, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches(data), batches(same), strict=True))
    assert not torch.equal(batches(data)[0], batches(other)[0])


def test_synthetic_is_learnable():
    data = build(dataset_cfg("synthetic"))
    x, y = (torch.cat(t) for t in zip(*data.train, strict=True))
    means = torch.stack([x[y == c].mean(0) for c in range(data.num_classes)]).flatten(1)
    x_test, y_test = (torch.cat(t) for t in zip(*data.test, strict=True))
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)  # nearest class mean
    assert (predicted == y_test).float().mean() > 0.9


# --- ImageFolder --------------------------------------------------------------------------------


def test_image_folder_from_a_folder(tmp_path):
    tree = make_tree(tmp_path / "tiny")
    cfg = dataset_cfg("image_folder", root=str(tree), image_size=24, val_fraction=0.25)
    data = build(cfg, cache_dir=tmp_path / "cache")
    assert data.num_classes == 3 and data.input_shape == (3, 24, 24)
    split = indices(data)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (9, 3, 12)
    # nothing unpacked; the decoded pixels of the whole folder kept for the next run
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["decoded"]
    x, y = next(iter(data.test))
    assert x.shape == (12, 3, 24, 24) and sorted(set(y.tolist())) == [0, 1, 2]


def test_augmentation_in_workers_repeats_from_the_restored_loader_state(tmp_path):
    """What resume relies on: with the train loader's generator state restored, the next epoch
    draws the same order and the same random crops and flips, worker processes included."""
    tree = make_tree(tmp_path / "tiny")
    cfg = dataset_cfg("image_folder", root=str(tree), image_size=24, val_fraction=0.25)
    data = build(cfg, cache_dir=tmp_path / "cache", num_workers=1, batch_size=4, batching="workers")
    assert not data.train.persistent_workers and data.train.num_workers == 1
    next(iter(data.train))  # an epoch in progress, as before a checkpoint
    state = data.train.generator.get_state()
    first = [x for x, _ in data.train]
    data.train.generator.set_state(state)
    again = [x for x, _ in data.train]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    later = [x for x, _ in data.train]  # the epoch after: other crops
    assert not all(torch.equal(a, b) for a, b in zip(first, later, strict=True))


def test_image_folder_uses_a_val_folder(tmp_path):
    tree = make_tree(tmp_path / "tiny", splits=("train", "val", "test"), per_class=2)
    data = build(dataset_cfg("image_folder", root=str(tree)), batching="workers")
    assert len(data.train.dataset) == 6 and len(data.val.dataset) == 6
    assert data.val.dataset.base.root.endswith("val")
    # train_subset caps train + val together, val in the proportion val_fraction
    cfg = dataset_cfg("image_folder", root=str(tree), train_subset=4, val_fraction=0.25)
    for batches in ("workers", "device"):
        data = build(cfg, batching=batches)
        assert len(data.train.dataset) == 3 and len(data.val.dataset) == 1


def test_image_folder_archive_is_unpacked_once(tmp_path, caplog):
    archive = make_archive(make_tree(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    cfg = dataset_cfg("image_folder", root=str(archive))
    with caplog.at_level(logging.INFO, logger="icep.data"):
        first = build(cfg, cache_dir=cache, batching="workers")
    assert "unpacking" in caplog.text
    (unpacked,) = cache.iterdir()  # no temp folder left behind
    assert unpacked.name.startswith("tiny-")
    stamp = unpacked.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="icep.data"):
        second = build(cfg, cache_dir=cache, batching="workers")
    assert "unpacking" not in caplog.text
    assert unpacked.stat().st_mtime_ns == stamp and list(cache.iterdir()) == [unpacked]
    assert first.num_classes == second.num_classes == 3
    assert indices(first) == indices(second)
    assert first.train.dataset.base.root == str(unpacked / "pack" / "tiny" / "train")


def test_racing_unpack_keeps_the_first_copy(tmp_path, monkeypatch, caplog):
    archive = make_archive(make_tree(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    cache = tmp_path / "cache"
    rename = os.rename

    def lose_the_race(src, dst):  # another run renames its whole copy into place first
        shutil.copytree(src, dst)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", lose_the_race)
    with caplog.at_level(logging.INFO, logger="icep.data"):
        data = build(
            dataset_cfg("image_folder", root=str(archive)), cache_dir=cache, batching="workers"
        )
    (unpacked,) = cache.iterdir()  # our temp copy is gone, theirs is used
    assert data.train.dataset.base.root == str(unpacked / "pack" / "tiny" / "train")
    assert "another run unpacked" in caplog.text


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "none"])
def test_val_is_not_augmented(tmp_path, augment):
    tree = make_tree(tmp_path / "tiny")
    data = build(dataset_cfg("image_folder", root=str(tree), augment=augment), batching="workers")
    torch.manual_seed(0)
    val = [torch.cat([x for x, _ in data.val]) for _ in range(3)]
    assert torch.equal(val[0], val[1]) and torch.equal(val[0], val[2])
    train = [data.train.dataset[0][0] for _ in range(8)]
    assert any(not torch.equal(train[0], t) for t in train) == (augment != "none")


@pytest.mark.parametrize("layout", ["missing", "empty", "no_train", "no_test", "unset"])
def test_image_folder_bad_root_names_dataset_root(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "no_train":
        (root / "images").mkdir(parents=True)
    elif layout == "no_test":
        make_tree(root, splits=("train",))
    cfg = dataset_cfg("image_folder", root=None if layout == "unset" else str(root))
    with pytest.raises(ConfigError, match="dataset.root") as err:
        build(cfg, cache_dir=tmp_path / "cache")
    assert "train/" in str(err.value) and "\n" not in str(err.value)


def test_image_folder_empty_class_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "tree" / split / "ant").mkdir(parents=True)
    with pytest.raises(ConfigError, match="dataset.root"):
        build(dataset_cfg("image_folder", root=str(tmp_path / "tree")))


def test_image_folder_test_classes_must_match(tmp_path):
    tree = make_tree(tmp_path / "tiny")
    (tree / "test" / "ant").rename(tree / "test" / "ape")
    with pytest.raises(ConfigError, match="classes"):
        build(dataset_cfg("image_folder", root=str(tree)))


def test_image_folder_root_at_a_split_says_to_use_its_parent(tmp_path):
    tree = make_tree(tmp_path / "tiny")
    with pytest.raises(ConfigError, match=f"one split of a tree: set dataset.root={tree}$"):
        build(dataset_cfg("image_folder", root=str(tree / "train")))


def test_damaged_archive_names_the_file_and_leaves_no_cache(tmp_path):
    archive = make_archive(make_tree(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(ConfigError, match="tiny.tar.gz cannot be unpacked.*download it again"):
        build(dataset_cfg("image_folder", root=str(archive)), cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # the half-unpacked copy is gone


def spoil(tree: Path) -> list[Path]:
    """Make two images of ``tree`` undecodable: one truncated, one not an image at all."""
    truncated, garbage = tree / "train" / "bee" / "1.png", tree / "test" / "cat" / "2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:60])
    garbage.write_bytes(b"<html>not found</html>")
    return [truncated, garbage]


@pytest.mark.parametrize("workers", [0, 1, "device"])
def test_undecodable_image_is_an_error_naming_it(tmp_path, workers):
    tree = make_tree(tmp_path / "tiny")
    bad, _ = spoil(tree)
    with pytest.raises(IcepError) as err:  # from a worker too: one line, not its traceback
        if workers == "device":  # decoded up front, when the data is built
            build(dataset_cfg("image_folder", root=str(tree)), batching="device")
        data = build(
            dataset_cfg("image_folder", root=str(tree)), num_workers=workers, batching="workers"
        )
        for _ in data.train:
            pass
    assert str(err.value).startswith(f"dataset: cannot decode image {bad} (")
    assert str(err.value).endswith("or set dataset.bad_images=skip to leave undecodable images out")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["image_folder", "cifar10"])
def test_undecodable_images_are_skipped_with_one_warning(tmp_path, caplog, name):
    tree = make_tree(tmp_path / "tiny")
    bad = spoil(tree)
    with caplog.at_level(logging.WARNING, logger="icep.data"):
        data = build(dataset_cfg(name, root=str(tree), bad_images="skip"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"dataset.bad_images=skip: left out 2 image(s) that cannot be decoded: {bad[0]}, {bad[1]}"
    ]
    assert len(data.train.dataset) + len(data.val.dataset) == 11
    assert len(data.test.dataset) == 11
    assert sum(len(y) for _, y in data.train) == len(data.train.dataset)  # all decode


# --- CIFAR --------------------------------------------------------------------------------------


def test_cifar10_torchvision_format(tmp_path, fake_cifar_checks):
    root = make_cifar10(tmp_path / "data")
    data = build(dataset_cfg("cifar10", root=str(root)), batching="workers")
    split = indices(data)
    assert len(split["train"]) + len(split["val"]) == 100 and len(split["val"]) == 10
    assert len(split["test"]) == 20
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    x, y = next(iter(data.train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long

    # val and test see the eval transform: exactly the normalized stored pixels.
    cfg = dataset_cfg("cifar10")
    image, _ = data.val.dataset.base[data.val.dataset.indices[0]]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255
    mean, std = (torch.tensor(list(v)).view(3, 1, 1) for v in (cfg.mean, cfg.std))
    torch.testing.assert_close(data.val.dataset[0][0], (pixels - mean) / std)


def test_cifar10_from_an_image_folder_archive(tmp_path):
    archive = make_archive(make_tree(tmp_path / "tiny"), tmp_path / "cifar10-jpeg.tar.gz")
    cfg = dataset_cfg("cifar10", root=str(archive))
    data = build(cfg, cache_dir=tmp_path / "cache")
    assert data.name == "cifar10" and data.num_classes == 3
    assert data.input_shape == (3, 32, 32)  # resized to CIFAR's size


def test_cifar10_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError) as err:
        build(dataset_cfg("cifar10", root=str(tmp_path / "nowhere")))
    message = str(err.value)
    assert err.value.key == "dataset.root" and message.startswith("dataset.root: ")
    assert "holds no CIFAR-10" in message and "cifar-10-batches-py" in message
    assert "dataset.download=true" in message and "\n" not in message


def test_cifar100_missing_root_names_its_folder(tmp_path):
    with pytest.raises(ConfigError, match="holds no CIFAR-100.*cifar-100-python"):
        build(dataset_cfg("cifar100", root=str(tmp_path)))


def test_cifar10_corrupt_folder(tmp_path):
    root = make_cifar10(tmp_path / "data")  # real md5 checks: the fake files fail them
    with pytest.raises(ConfigError, match="dataset.root.*corrupt"):
        build(dataset_cfg("cifar10", root=str(root)))


def test_cifar_rejects_imagenet_augment(tmp_path, fake_cifar_checks):
    root = make_cifar10(tmp_path / "data")
    with pytest.raises(ConfigError, match="^dataset.augment: got 'imagenet'; CIFAR-10 takes cifar"):
        build(dataset_cfg("cifar10", root=str(root), augment="imagenet"))


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"{SHARED_CIFAR} not present")
def test_real_cifar10_jpeg_archive(cache_dir, capsys):
    cfg = dataset_cfg("cifar10", root=str(SHARED_CIFAR), train_subset=500, test_subset=200)
    start = time.perf_counter()
    data = build(cfg, cache_dir=cache_dir, num_workers=2, batch_size=64, batching="workers")
    with capsys.disabled():
        print(f"\nCIFAR-10 JPEG archive ready in {time.perf_counter() - start:.1f} s")
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    assert len(data.train.dataset) == 450 and len(data.val.dataset) == 50
    assert len(data.test.dataset) == 200
    assert len(data.train.dataset.base) == 50_000 and len(data.test.dataset.base) == 10_000
    x, y = next(iter(data.train))
    assert x.shape == (64, 3, 32, 32) and y.min() >= 0 and y.max() < 10
    x, _ = next(iter(data.test))
    assert x.shape[1:] == (3, 32, 32) and abs(x.mean()) < 0.5
    # The device path decodes the same files the same way: the same test images, bit for bit.
    held = build(cfg, cache_dir=cache_dir, batch_size=64, batching="device")
    torch.testing.assert_close(next(iter(held.test))[0], x, rtol=0, atol=1e-5)


def test_stretch_fit_keeps_the_whole_image_on_both_paths(tmp_path):
    """dataset.fit=stretch is the ICE reference's Resize((S, S)): a wide image keeps both ends
    (a crop loses them), and the device path decodes what the workers' transforms give."""
    from PIL import Image

    tree = tmp_path / "wide"
    for split in ("train", "test"):
        for c, name in enumerate(CLASSES):
            folder = tree / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.zeros((8, 32, 3), dtype=np.uint8)
                pixels[:, :8] = 255  # a white left end: gone after a centre crop
                pixels[:, 8:, c] = 100 + 10 * i
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = dataset_cfg("image_folder", root=str(tree), image_size=8, augment="none", fit="stretch")
    raw = {}
    for batching in ("workers", "device"):
        data = build(cfg, cache_dir=tmp_path / "cache", batching=batching)
        x, _ = next(iter(data.test))
        raw[batching] = x
    torch.testing.assert_close(raw["device"], raw["workers"], atol=1e-5, rtol=0)
    left = raw["workers"][:, 0, :, :2]  # the red channel of the first two columns
    assert (left > 1.5).all()  # white, normalized: (1 - 0.485) / 0.229 > 2
    crop = dataset_cfg("image_folder", root=str(tree), image_size=8, augment="none")
    cropped = build(crop, cache_dir=tmp_path / "cache2", batching="workers")
    x, _ = next(iter(cropped.test))
    assert not (x[:, 0, :, :2] > 1.5).any()
