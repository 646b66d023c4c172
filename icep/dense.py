"""The unpruned model a pruning run starts from: loaded from ``model.checkpoint``, or trained from
scratch with the ``dense`` settings and cached under ``paths.cache`` (keyed by the config that
produced it), so later runs with the same setup reuse it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from icep import distributed
from icep.data import Data, with_batch_size
from icep.errors import IcepError
from icep.locks import locked
from icep.models import load_checkpoint
from icep.serialization import atomic_save, load_model, save_model
from icep.train import Trainer, global_batch_size, sgd

log = logging.getLogger(__name__)

# dense keys added after models were cached, and the value that trains as before they existed:
# at that value a key stays out of the cache key, so models cached earlier keep theirs.
_KEYED_UNLESS = {"nesterov": False, "label_smoothing": 0.0}
_ONECYCLE_KEYS = ("warmup_share", "div_factor")  # in the cache key with schedule=onecycle only


def arch_spec(cfg: DictConfig, data: Data) -> dict[str, Any]:
    """The builder call for the unpruned model, as plain data (also stored in saved models)."""
    arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
    return {**arch, "num_classes": data.num_classes, "in_channels": data.input_shape[0]}


def model_meta(cfg: DictConfig, data: Data) -> dict[str, Any]:
    """What a model file of this run says besides its weights (icep.serialization): how inputs
    are prepared, the class names, and the dataset config and seed it was trained and pruned on
    (``python -m icep.eval`` evaluates on it by default; a relative ``root`` is made absolute)."""
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    if isinstance(dataset.get("root"), str):
        dataset["root"] = str(Path(hydra.utils.to_absolute_path(dataset["root"])))
    return {
        "model": cfg.model.name,
        "preprocessing": data.preprocessing,
        "classes": data.classes,
        "dataset": dataset,
        "seed": cfg.seed,
    }


def build_model(cfg: DictConfig, data: Data, weights: bool = True) -> nn.Module:
    """The configured architecture; ``weights=False``: without the pretrained weights it may name
    (no download: a rank that gets rank 0's weights, a check)."""
    spec = arch_spec(cfg, data)
    if not weights:
        for key, without in (("weights", None), ("pretrained", False)):
            if key in spec:
                spec[key] = without
    return hydra.utils.instantiate(spec)


def _rank_model(cfg: DictConfig, data: Data) -> nn.Module:
    """The architecture on every rank with rank 0's weights (its pretrained ones downloaded there
    only)."""
    model = build_model(cfg, data, weights=distributed.is_main())
    distributed.sync_module(model)
    return model


def cache_path(cfg: DictConfig, data: Data, amp: bool | str = False) -> Path:
    """Where the dense model for this (model, data, training, seed) setup is cached; a model
    trained under autocast (``amp``: true or ``"bfloat16"`` for bf16, ``"float16"`` for fp16)
    is another model than a float32 one, and the two autocast types differ too."""
    dense = OmegaConf.to_container(cfg.dense, resolve=True)
    batch_size = dense.pop("batch_size", None) or cfg.trainer.batch_size  # the one it trains with
    for key, as_before in _KEYED_UNLESS.items():
        if dense.get(key, as_before) == as_before:
            dense.pop(key, None)
    if dense.get("schedule") != "onecycle":
        for key in _ONECYCLE_KEYS:
            dense.pop(key, None)
    keyed = {
        "arch": arch_spec(cfg, data),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "dense": dense,
        "batch_size": batch_size,
        "seed": cfg.seed,
    }
    if amp:  # float32 keys stay as they were, and so do bf16 ones
        keyed["amp"] = "fp16" if amp == "float16" else "bf16"
    for key in ("download", "_target_"):  # where the data comes from, not what it is
        keyed["dataset"].pop(key, None)
    # Keys added later, at the value that builds what was built before they existed: left out,
    # so models cached then keep their key.
    if keyed["arch"].get("shortcut") == "B":
        keyed["arch"].pop("shortcut")
    if keyed["dataset"].get("fit") == "crop":
        keyed["dataset"].pop("fit")
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache) / "dense" / f"{cfg.model.name}-{cfg.dataset.name}-{digest}.pt"


def dense_optimizer(model: nn.Module, cfg: DictConfig) -> torch.optim.SGD:
    """The SGD of the ``dense`` settings ``cfg`` (Nesterov momentum with ``nesterov``)."""
    return sgd(
        model, cfg.lr, cfg.momentum, cfg.weight_decay, nesterov=bool(cfg.get("nesterov", False))
    )


def dense_schedule(
    optimizer: torch.optim.Optimizer, cfg: DictConfig, batches_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler, str]:
    """The ``dense.schedule`` of ``cfg`` and what it steps after: ``"epoch"`` or ``"batch"``.

    ``onecycle`` steps after every batch: lr rises linearly from ``lr / div_factor`` to ``lr``
    over the first ``warmup_share`` of the run's batches, then falls linearly to 0 after the last
    one (the one-cycle schedule of the fast CIFAR-10 recipes, without momentum cycling).
    """
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs), "epoch"
    if cfg.schedule == "step":
        milestones = [round(f * cfg.epochs) for f in cfg.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, cfg.gamma), "epoch"
    total = cfg.epochs * batches_per_epoch
    warmup = min(round(cfg.warmup_share * total), total - 1)
    start = 1.0 / cfg.div_factor

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        return (total - step) / (total - warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "batch"


def train_dense(
    model: nn.Module,
    data: Data,
    trainer: Trainer,
    cfg: DictConfig,
    progress: Path | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> None:
    """Train ``model`` with the ``dense`` settings ``cfg``, in batches of ``cfg.batch_size`` when
    it is set (else the train loader's).

    With ``progress``, the state after each epoch (weights, optimizer, schedule, the train
    loader's and torch's random state) is kept in that file, and a training that finds it goes on
    from there: a killed job (or a GPU call's time limit) loses one epoch at most, and the epochs
    run as they would have uninterrupted. In a data-parallel run rank 0 reads and writes that file
    and every rank goes on from what it read.
    """
    batch_size = cfg.get("batch_size")
    loader = data.train if batch_size is None else with_batch_size(data.train, batch_size)
    optimizer = dense_optimizer(model, cfg)
    scheduler, scheduler_per = dense_schedule(optimizer, cfg, len(loader))
    generator = getattr(loader, "generator", None)
    done = 0
    state = distributed.from_main(lambda: _progress(progress))
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            if generator is not None and state["loader_rng"] is not None:
                generator.set_state(state["loader_rng"])
            done = int(state["epoch"])
            log.info("dense training goes on after epoch %d/%d (%s)", done, cfg.epochs, progress)
        except Exception as exc:  # a foreign file: start over rather than fail
            log.warning("cannot resume dense training from %s (%s); starting over", progress, exc)
            done = 0

    def keep(epoch: int) -> None:
        if progress is None or epoch == cfg.epochs or not distributed.is_main():
            return
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loader_rng": generator.get_state() if generator is not None else None,
        }
        atomic_save(state, progress)

    trainer.fit(
        model,
        loader,
        optimizer,
        cfg.epochs,
        scheduler,
        desc="dense",
        val_loader=data.val,
        lr_key="dense.lr",
        done=done,
        after_epoch=keep,
        label_smoothing=cfg.get("label_smoothing", 0.0),
        scheduler_per=scheduler_per,
        on_epoch=on_epoch,
    )


def _progress(path: Path | None) -> dict[str, Any] | None:
    """The dense training's state kept in ``path`` after an epoch, or None (none, or torn)."""
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn file: start over rather than fail
        log.warning("cannot resume dense training from %s (%s); starting over", path, exc)
        return None


def dense_model(
    cfg: DictConfig,
    data: Data,
    trainer: Trainer,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The unpruned model on the trainer's device, and where it came from; ``on_epoch`` is told
    each epoch of a dense training (a run's W&B mirror)."""
    if cfg.model.checkpoint is not None:
        spec = arch_spec(cfg, data)
        model = load_checkpoint(hydra.utils.instantiate(spec), cfg.model.checkpoint, spec)
        return trainer.prepare(model), {"source": str(cfg.model.checkpoint)}
    path = cache_path(cfg, data, trainer.amp and trainer.amp_dtype)
    if not cfg.dense.cache:
        return _cached_or_trained(cfg, data, trainer, path, on_epoch, cached=False)
    # One run trains a given dense model; one started meanwhile waits for it, then loads it. In a
    # data-parallel run rank 0 holds the lock and decides; every rank trains, or gets rank 0's.
    lock = path.with_name(f"{path.name}.lock")
    with (
        locked(lock, f"the dense model {path}", wait=True)
        if distributed.is_main()
        else contextlib.nullcontext()
    ):
        cached = distributed.from_main(path.is_file)
        return _cached_or_trained(cfg, data, trainer, path, on_epoch, cached)


def _cached_or_trained(
    cfg: DictConfig,
    data: Data,
    trainer: Trainer,
    path: Path,
    on_epoch: Callable[[dict[str, float]], None] | None,
    cached: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    if cached:
        log.info("dense model from the cache: %s", path)
        model = distributed.on_main(lambda: _load_cached(path))
        if not distributed.is_main():
            model = build_model(cfg, data, weights=False)
        distributed.sync_module(model)  # rank 0's weights: the cache may be its node's own
        return trainer.prepare(model), {"source": str(path)}
    log.info(
        "model.checkpoint is null: training the dense %s for %d epochs, %s schedule, batches of "
        "%d (cached at %s)",
        cfg.model.name,
        cfg.dense.epochs,
        cfg.dense.schedule,
        cfg.dense.get("batch_size") or global_batch_size(data.train),
        path,
    )
    model = trainer.prepare(_rank_model(cfg, data))  # one initialisation for every rank
    progress = path.with_name(f"{path.stem}.partial.pt") if cfg.dense.cache else None
    with trainer.timer.phase("dense") as t:
        train_dense(model, data, trainer, cfg.dense, progress, on_epoch)
    acc = trainer.evaluate(model, data.val) if data.val is not None else None
    if cfg.dense.cache:
        distributed.on_main(
            lambda: _cache(model, cfg, data, path, progress, acc=acc, seconds=t["seconds"])
        )
    return model, {
        "source": str(path) if cfg.dense.cache else "trained",
        "dense_seconds": t["seconds"],
        "dense_flops": trainer.timer.work_total("dense")["flops"],
    }


def _load_cached(path: Path) -> nn.Module:
    try:
        return load_model(path)
    except IcepError as exc:
        raise IcepError(
            f"the cached dense model is damaged: {exc}; delete it to train it again, or set "
            "dense.cache=false"
        ) from None


def _cache(
    model: nn.Module, cfg: DictConfig, data: Data, path: Path, progress: Path, **meta: Any
) -> None:
    save_model(model, arch_spec(cfg, data), path, **model_meta(cfg, data), **meta)
    progress.unlink(missing_ok=True)
