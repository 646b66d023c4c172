"""The fast data path (icep.device_batches): splits held whole as tensors, batches augmented
in place.

It must give the same images as the file-backed DataLoaders, augment as torchvision's RandomCrop
with padding + RandomHorizontalFlip do, repeat from a restored generator (resume), and be chosen
by ``trainer.batching=auto`` only where it can do the dataset's augmentation.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_data import (  # noqa: F401 (fixtures)
    build,
    dataset_cfg,
    fake_cifar_checks,
    make_cifar10,
    make_tree,
    run_cfg,
    run_in_tmp,
)
from torch import nn
from torch.utils.data import DataLoader

from icep.config import validate
from icep.data import subsample
from icep.device_batches import DeviceLoader, TensorSplit, _crop_flip
from icep.errors import ConfigError
from icep.train import Trainer, sgd


def reference_crop_flip(image: torch.Tensor, top: int, left: int, flip: bool, pad: int):
    """torchvision's order: zero-pad, crop at (top, left), then flip."""
    h, w = image.shape[-2:]
    out = nn.functional.pad(image, (pad,) * 4)[..., top : top + h, left : left + w]
    return out.flip(-1) if flip else out


def test_crop_and_flip_match_pad_crop_flip_per_sample():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=g)
    pad = 3
    draws = torch.stack(
        [
            torch.randint(0, 2 * pad + 1, (16,), generator=g),
            torch.randint(0, 2 * pad + 1, (16,), generator=g),
            torch.randint(0, 2, (16,), generator=g),
        ]
    )
    out = _crop_flip(images, draws, pad, torch.arange(7), torch.arange(9))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last)  # what channels_last convs take
    for i in range(16):
        top, left, flip = draws[:, i].tolist()
        assert torch.equal(out[i], reference_crop_flip(images[i], top, left, bool(flip), pad))


def candidates(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    return [
        reference_crop_flip(image, top, left, flip, pad)
        for top in range(2 * pad + 1)
        for left in range(2 * pad + 1)
        for flip in (False, True)
    ]


def test_every_augmented_image_is_a_padded_crop_of_its_source_flipped_or_not():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 1, 5, 5), dtype=torch.uint8, generator=g)
    split = TensorSplit(images, torch.arange(40), range(40), scale=1.0)  # identity normalization
    loader = DeviceLoader(split, 8, shuffle=True, generator=g, crop_padding=2, flip=True)
    seen_flips, seen_offsets = set(), set()
    for x, y in loader:
        for image, label in zip(x, y, strict=True):
            options = candidates(images[label].float(), 2)
            match = [i for i, c in enumerate(options) if torch.equal(c, image)]
            assert match, f"sample {label} is no padded crop / flip of its source"
            seen_offsets.add(match[0] // 2)
            seen_flips.add(match[0] % 2)
    assert seen_flips == {0, 1} and len(seen_offsets) > 5  # both flips, many offsets drawn


def test_restored_generator_repeats_the_epoch_and_the_next_differs():
    """What resume relies on, as for the DataLoader path."""
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(30) % 3, range(30), mean=[0.5] * 3, std=[0.2] * 3)
    loader = DeviceLoader(
        split,
        7,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        crop_padding=2,
        flip=True,
    )
    assert len(loader) == 5
    next(iter(loader))
    state = loader.generator.get_state()
    first = [x for x, _ in loader]
    loader.generator.set_state(state)
    again = [x for x, _ in loader]
    later = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, later, strict=True))
    assert sum(len(x) for x in first) == 30


def test_device_split_normalizes_like_the_eval_transform():
    images = torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    split = TensorSplit(
        images, torch.zeros(4, dtype=torch.long), range(4), mean=mean, std=std, scale=1 / 255
    )
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1
    )
    x, _ = next(iter(DeviceLoader(split, 4)))
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(split[2][0], expected[2])


def every_batch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("name", ["digits", "synthetic", "image_folder", "cifar10"])
def test_the_device_path_gives_the_file_backed_images(tmp_path, name, fake_cifar_checks):  # noqa: F811
    """The same samples, the same pixels: val and test, and an unaugmented train epoch in the
    same order (both shuffle with one randperm of the seeded generator)."""
    values = {}
    if name == "image_folder":
        values = {"root": str(make_tree(tmp_path / "tiny")), "augment": "none"}
    elif name == "cifar10":
        values = {"root": str(make_cifar10(tmp_path / "data")), "augment": "none"}
    cfg = dataset_cfg(name, **values)
    files = build(cfg, batching="workers", cache_dir=tmp_path / "cache")
    held = build(cfg, batching="device", cache_dir=tmp_path / "cache")
    assert isinstance(held.train, DeviceLoader) and isinstance(files.train, DataLoader)
    assert held.input_shape == files.input_shape and held.num_classes == files.num_classes
    for split in ("train", "val", "test"):
        a, b = getattr(files, split), getattr(held, split)
        assert a.dataset.indices == b.dataset.indices and len(a) == len(b)
        xa, ya = every_batch(a)
        xb, yb = every_batch(b)
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-5)


def test_auto_holds_small_data_on_the_device_and_leaves_the_rest_to_workers(tmp_path, caplog):
    tree = str(make_tree(tmp_path / "tiny"))
    assert isinstance(build(dataset_cfg("digits")).train, DeviceLoader)
    assert isinstance(build(dataset_cfg("image_folder", root=tree)).train, DeviceLoader)
    with caplog.at_level(logging.INFO, logger="icep.data"):
        imagenet = build(dataset_cfg("image_folder", root=tree, augment="imagenet"))
        too_big = build(dataset_cfg("image_folder", root=tree), device_data_gb=0)
    assert isinstance(imagenet.train, DataLoader) and isinstance(too_big.train, DataLoader)
    assert "is not one the device path does" in caplog.text
    assert "over trainer.device_data_gb=0" in caplog.text
    with pytest.raises(ConfigError, match="^trainer.batching: device: its train augmentation"):
        build(dataset_cfg("image_folder", root=tree, augment="imagenet"), batching="device")
    with pytest.raises(ConfigError, match="^trainer.batching: got 'gpu'; must be auto, device or"):
        validate(run_cfg("trainer.batching=gpu"))


def test_a_whole_folder_is_decoded_once_and_a_changed_file_decodes_again(tmp_path, caplog):
    tree = make_tree(tmp_path / "tiny")
    cfg = dataset_cfg("image_folder", root=str(tree))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="icep.data"):
        first = build(cfg, cache_dir=cache, batching="device")
        assert caplog.text.count("decoding 12 images") == 2  # train pool and test
        caplog.clear()
        again = build(cfg, cache_dir=cache, batching="device")
        assert "decoding" not in caplog.text
        (tree / "test" / "ant" / "0.jpg").touch()  # a replaced file: the test cache is stale
        caplog.clear()
        build(cfg, cache_dir=cache, batching="device")
        assert caplog.text.count("decoding 12 images") == 1
    assert torch.equal(first.test.dataset.images, again.test.dataset.images)


def test_subsample_keeps_the_device_path(tmp_path):
    data = build(dataset_cfg("digits"), batching="device")
    small = subsample(data, 0.25, 0.5, seed=0)
    assert isinstance(small.train, DeviceLoader) and small.train.augments == data.train.augments
    assert len(small.train.dataset) == round(len(data.train.dataset) * 0.25)
    assert len(small.val.dataset) == round(len(data.val.dataset) * 0.5)
    assert set(small.train.dataset.indices) <= set(data.train.dataset.indices)
    assert subsample(data, 0.25, 0.5, seed=0).train.dataset.indices == small.train.dataset.indices


def test_compiled_training_follows_the_pruned_shapes():
    """trainer.compile: the model trains through torch.compile, compiled anew once a prune has
    changed its shapes, and the updates land in the model itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    images = torch.randint(0, 256, (32, 3, 6, 6), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(32) % 4, range(32), scale=1 / 255)
    loader = DeviceLoader(split, 8, shuffle=True)
    trainer = Trainer(torch.device("cpu"), compile=True, compile_backend="eager")
    model(split.normalize(images[:1]))  # materialize the lazy layer
    before = model[0].weight.detach().clone()
    trainer.train_epoch(model, loader, sgd(model, 0.1))
    first = trainer._compiled
    assert first is not None and not torch.equal(model[0].weight, before)
    trainer.train_epoch(model, loader, sgd(model, 0.1))
    assert trainer._compiled is first  # same shapes: the compiled model is reused
    model[0] = nn.Conv2d(3, 6, 3)  # as a prune does: other shapes
    model[3] = nn.Linear(6 * 16, 4)
    trainer.train_epoch(model, loader, sgd(model, 0.1))
    assert trainer._compiled is not first
