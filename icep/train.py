"""Training and evaluation loops, device handling and phase timing."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from icep import distributed
from icep.compute import WORK_KEYS, CostCache, ModelCost
from icep.errors import ConfigError, IcepError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as
    given. In a data-parallel run (:mod:`icep.distributed`) ``auto`` and ``cuda`` mean this rank's
    GPU (its local rank's, among those it sees)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            "trainer.device", f"got '{name}'; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device", f"'{name}' asked for but no CUDA device is visible; use auto or cpu"
        )
    if device.type == "cuda" and distributed.active():
        if device.index is not None:
            raise ConfigError(
                "trainer.device",
                f"'{name}' names one GPU for every rank of a data-parallel run; use auto or cuda "
                "(each rank takes the GPU of its local rank)",
            )
        device = torch.device("cuda", distributed.world().local_rank % torch.cuda.device_count())
    return device


def _auto(value: bool | str, default: bool) -> bool:
    return default if value == "auto" else bool(value)


class PhaseTimer:
    """Wall-clock time per phase, with device synchronisation so GPU work is counted where it ran,
    and the work counted in each phase (:meth:`count`: images forward and backward, FLOPs; see
    :mod:`icep.compute`). Work counted outside any phase goes to ``other``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}
        self.work: dict[str, dict[str, int]] = {}
        self._active: list[str] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, float]]:
        """Time the block; the yielded dict gets ``seconds`` when it ends."""
        result: dict[str, float] = {}
        self._sync()
        start = time.perf_counter()
        self._active.append(name)
        try:
            yield result
        finally:
            self._active.pop()
            self._sync()
            result["seconds"] = time.perf_counter() - start
            self.totals[name] = self.totals.get(name, 0.0) + result["seconds"]

    def total(self, *names: str) -> float:
        return sum(self.totals.get(n, 0.0) for n in names)

    def count(self, images_fwd: int = 0, images_bwd: int = 0, flops: int = 0) -> None:
        """Add work to the innermost running phase."""
        name = self._active[-1] if self._active else "other"
        work = self.work.setdefault(name, dict.fromkeys(WORK_KEYS, 0))
        work["images_fwd"] += images_fwd
        work["images_bwd"] += images_bwd
        work["flops"] += flops

    def work_total(self, *names: str) -> dict[str, int]:
        """The work of the phases ``names`` (all phases when none is named), summed."""
        picked = names or tuple(self.work)
        return {key: sum(self.work.get(n, {}).get(key, 0) for n in picked) for key in WORK_KEYS}


@dataclass
class Distillation:
    """Knowledge distillation from the unpruned model: CE + weight * KL(teacher/T || student/T)."""

    teacher: nn.Module
    temperature: float = 2.0
    weight: float = 1.0

    def loss(self, inputs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.teacher(inputs)
        t = self.temperature
        # KL summed over classes and averaged over the batch, as the reference computes it.
        return self.weight * F.kl_div(
            F.log_softmax(logits.float() / t, dim=1),
            F.softmax(target.float() / t, dim=1),
            reduction="batchmean",
        )


@dataclass
class Trainer:
    """Runs epochs and evaluations on one device.

    On CUDA it uses bf16 autocast, channels_last and cuDNN's benchmark mode by default (``amp``,
    ``channels_last``, ``cudnn_benchmark`` set to ``auto``); ``amp_dtype="float16"`` autocasts
    to fp16 with a gradient scaler instead, as the reference's DenseNet and WRN runs.
    ``compile`` trains through ``torch.compile``, compiled anew whenever a prune has changed the
    model's shapes. Progress is a bar on a terminal and one line per epoch otherwise.
    """

    device: torch.device
    amp: bool = False
    amp_dtype: str = "bfloat16"  # bfloat16 | float16 (with a gradient scaler)
    channels_last: bool = False
    progress: bool = False
    cudnn_benchmark: bool = False
    deterministic: bool = False  # cuDNN's deterministic kernels (the reference's FP32 runs)
    compile: bool = False
    compile_backend: str = "inductor"
    # Batches between checks for a NaN loss on an accelerator, where each check waits for the
    # device; on the CPU every batch is checked.
    nan_check_every: int = 32
    # DDP's find_unused_parameters: a model some of whose parameters get no gradient in a
    # forward pass (an auxiliary head, a skipped branch) needs it in a data-parallel run.
    find_unused_parameters: bool = False
    timer: PhaseTimer = field(init=False)
    # fp16 autocast's loss scaler, one for the run as the reference keeps one; None otherwise.
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)

    _compiled: tuple[Any, nn.Module] | None = field(init=False, default=None)
    _wrapped: tuple[Any, nn.Module] | None = field(init=False, default=None)  # the DDP wrapper
    _cost: CostCache = field(init=False, default_factory=CostCache)

    def __post_init__(self) -> None:
        self.timer = PhaseTimer(self.device)
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be bfloat16 or float16, not {self.amp_dtype!r}")
        if self.amp and self.amp_dtype == "float16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if self.deterministic:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    @classmethod
    def from_config(cls, cfg) -> Trainer:
        device = resolve_device(str(cfg.device))
        cuda = device.type == "cuda"
        return cls(
            device=device,
            amp=_auto(cfg.amp, cuda),
            amp_dtype=str(cfg.get("amp_dtype", "bfloat16")),
            channels_last=_auto(cfg.channels_last, cuda),
            progress=_auto(cfg.progress, sys.stderr.isatty()) and distributed.is_main(),
            cudnn_benchmark=_auto(cfg.get("cudnn_benchmark", "auto"), cuda)
            and not cfg.get("deterministic", False),
            deterministic=bool(cfg.get("deterministic", False)),
            compile=bool(cfg.get("compile", False)),
            find_unused_parameters=bool(cfg.get("find_unused_parameters", False)),
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _parallel(self, model: nn.Module) -> nn.Module:
        """``model``, or in a data-parallel run its DDP wrapper, made anew when the model is
        another one or its shapes or frozen parameters changed (DDP registers the parameters
        that get gradients when it wraps, and sends rank 0's weights to every rank then)."""
        if not distributed.active():
            return model
        key = tuple((tuple(p.shape), p.requires_grad) for p in model.parameters())
        if self._wrapped is None or self._wrapped[0] != key or self._wrapped[1].module is not model:
            from torch.nn.parallel import DistributedDataParallel

            self._wrapped = None  # the old wrapper's hooks go before the new one is built
            cuda = self.device.type == "cuda"
            self._wrapped = (
                key,
                DistributedDataParallel(
                    model,
                    device_ids=[self.device.index] if cuda else None,
                    find_unused_parameters=self.find_unused_parameters,
                ),
            )
        return self._wrapped[1]

    def _training_forward(self, model: nn.Module) -> nn.Module:
        """``model`` (in a data-parallel run its DDP wrapper), or with ``compile`` its compiled
        form for the model's current shapes."""
        model = self._parallel(model)
        if not self.compile:
            return model
        key = (id(model), tuple(tuple(p.shape) for p in model.parameters()))
        if self._compiled is None or self._compiled[0] != key:
            # A prune changed the shapes (or another model trains): the old code never runs again.
            torch._dynamo.reset()
            self._compiled = (key, torch.compile(model, backend=self.compile_backend))
        return self._compiled[1]

    def cost(self, model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
        """The model's per-image cost at its current shape and freezing (:mod:`icep.compute`)."""
        return self._cost(model, tuple(input_shape))

    def _train_flops(
        self, model: nn.Module, distill: Distillation | None, input_shape: tuple[int, ...]
    ) -> int:
        """FLOPs of one trained image (:mod:`icep.compute`): the model's forward and backward at
        its current shape and freezing, plus the teacher's forward when distilling."""
        flops = self._cost(model, input_shape).train_flops
        if distill is not None:
            flops += self._cost(distill.teacher, input_shape).forward_flops
        return flops

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=getattr(torch, self.amp_dtype))
        return contextlib.nullcontext()

    def _batches(self, loader: DataLoader, desc: str):
        if not self.progress:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)

    def _out_of_memory(self, desc: str, loader: DataLoader, key: str) -> IcepError:
        """The error for a CUDA out-of-memory; hands the failed batch's memory back first."""
        torch.cuda.empty_cache()
        size = global_batch_size(loader)
        return IcepError(
            f"{desc}: out of GPU memory on {self.device} with batches of {size}; "
            f"try {key}={max(1, size // 2)} or free the GPU of other work"
        )

    def evaluate(self, model: nn.Module, loader: DataLoader, desc: str = "eval") -> float:
        """Top-1 accuracy in percent, ``correct / total * 100`` as the reference computes it."""
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)  # no sync per batch
        total = 0
        cost = None
        out_of_memory = False
        try:
            with torch.inference_mode(), self._autocast():
                for x, y in self._batches(loader, desc):
                    if cost is None:
                        cost = self._cost(model, tuple(x.shape[1:]))
                    y = y.to(self.device, non_blocking=True)
                    correct += (model(self._inputs(x)).argmax(1) == y).sum()
                    total += y.numel()
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # raised below, outside the handler, so the batch is freed
        finally:
            model.train(was_training)
        if out_of_memory:
            x = y = None  # the failed batch's tensors
            raise self._out_of_memory(desc, loader, "trainer.eval_batch_size")
        if distributed.active():  # every rank's share: the same accuracy on every rank
            both = distributed.sum_across(torch.stack([correct, correct.new_tensor(total)]))
            correct, total = both[0], int(both[1].item())
        if cost is not None:
            self.timer.count(images_fwd=total, flops=total * cost.forward_flops)
        # In the reference's order (correct / total * 100), so a drop sitting exactly on the
        # trigger's thre is decided as there; 100 * correct / total differs in the last bit.
        return correct.item() / max(total, 1) * 100

    def train_epoch(
        self,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        distill: Distillation | None = None,
        desc: str = "train",
        lr_key: str = "pipeline.finetune.lr (ICE: pipeline.base; AGP, EPI: pipeline.lr)",
        label_smoothing: float = 0.0,
        batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> float:
        """One epoch; returns the mean loss (cross-entropy with ``label_smoothing``, plus the
        distillation term). ``batch_scheduler`` steps after every batch.

        Raises IcepError on a NaN or infinite loss (naming the batch, the optimizer's lr and
        ``lr_key``, the setting to lower) and on CUDA running out of memory.
        """
        model.train()
        forward = self._training_forward(model)
        loss_sum = torch.zeros((), device=self.device)
        # Index of the first batch with a non-finite loss, kept on the device: no sync per batch.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        check_every = 1 if self.device.type == "cpu" else self.nan_check_every
        batches = images = 0
        per_image = None  # FLOPs of one trained image, measured at the first batch
        out_of_memory = completed = False
        try:
            for x, y in self._batches(loader, desc):
                if per_image is None:
                    per_image = self._train_flops(model, distill, tuple(x.shape[1:]))
                x, y = self._inputs(x), y.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = forward(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
                    if distill is not None:
                        loss = loss + distill.loss(x, logits)
                optimizer.zero_grad(set_to_none=True)
                if self.scaler is None:
                    loss.backward()
                    optimizer.step()
                else:  # fp16: scaled gradients; a step whose gradients overflow is skipped
                    self.scaler.scale(loss).backward()
                    self.scaler.step(optimizer)
                    self.scaler.update()
                if batch_scheduler is not None:
                    batch_scheduler.step()
                loss = loss.detach()
                loss_sum += loss
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), batches, first_bad)
                batches += 1
                images += y.shape[0]
                # Every rank stops at the same batch (DDP's next step would wait for the others).
                if batches % check_every == 0 and _any_rank(first_bad >= 0):
                    break
            completed = True
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # raised below, outside the handler, so the batch is freed
        finally:
            if per_image is not None and not completed:  # this rank's work until it stopped
                self.timer.count(images_fwd=images, images_bwd=images, flops=images * per_image)
        if out_of_memory:
            x = y = logits = loss = None  # the failed batch's tensors
            raise self._out_of_memory(desc, loader, "trainer.batch_size")
        if distributed.active():
            # The run's loss (each rank's mean, averaged), its images, the first bad batch of any
            # rank, and the same BatchNorm statistics on every rank.
            sums = distributed.sum_across(
                torch.stack([loss_sum.double(), torch.tensor(images, device=self.device).double()])
            )
            loss_sum, images = sums[0] / distributed.world().size, int(sums[1].item())
            # (A bad batch's index is below ``batches``, the same on every rank.)
            first_bad = distributed.min_across(torch.where(first_bad >= 0, first_bad, batches))
            first_bad = torch.where(first_bad == batches, -1, first_bad)
            distributed.sync_buffers(model)
        if per_image is not None:
            self.timer.count(images_fwd=images, images_bwd=images, flops=images * per_image)
        bad = first_bad.item()
        if bad >= 0:
            lr = optimizer.param_groups[0]["lr"]
            raise IcepError(
                f"{desc}: the loss became {loss_sum.item()} at batch {bad + 1}/{len(loader)} "
                f"(lr {lr:g}); the learning rate is too high for this model: lower {lr_key}"
            )
        return loss_sum.item() / max(batches, 1)

    def fit(
        self,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        distill: Distillation | None = None,
        desc: str = "train",
        val_loader: DataLoader | None = None,
        lr_key: str = "pipeline.finetune.lr (ICE: pipeline.base; AGP, EPI: pipeline.lr)",
        done: int = 0,
        after_epoch: Callable[[int], None] | None = None,
        label_smoothing: float = 0.0,
        scheduler_per: str = "epoch",
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> float:
        """Train epochs ``done + 1`` to ``epochs``, one log line each, calling ``after_epoch``
        with the epoch's number after each; returns the last epoch's mean loss. ``on_epoch``
        (a run's W&B mirror) is called after each epoch with its number (``epoch``), its mean
        ``loss`` and the ``lr`` it began at.

        ``scheduler`` steps once per epoch, or after every batch with ``scheduler_per="batch"``
        (one-cycle schedules with a warm-up of a few hundred steps).

        ``lr_key`` is the setting a NaN loss tells the user to lower."""
        loss = float("nan")
        for epoch in range(done + 1, epochs + 1):
            start = time.perf_counter()
            lr = float(optimizer.param_groups[0]["lr"])
            loss = self.train_epoch(
                model,
                loader,
                optimizer,
                distill,
                f"{desc} epoch {epoch}/{epochs}",
                lr_key,
                label_smoothing,
                scheduler if scheduler_per == "batch" else None,
            )
            if scheduler is not None and scheduler_per == "epoch":
                scheduler.step()
            msg = f"{desc} epoch {epoch}/{epochs}: loss {loss:.4f}"
            if val_loader is not None:
                msg += f", val acc {self.evaluate(model, val_loader):.2f}%"
            log.info("%s (%.1fs)", msg, time.perf_counter() - start)
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "loss": loss, "lr": lr})
            if after_epoch is not None:
                after_epoch(epoch)
        return loss


def _any_rank(flag: torch.Tensor) -> bool:
    """Whether ``flag`` (a bool tensor) is true on this rank or, in a data-parallel run, any."""
    if not distributed.active():
        return bool(flag.item())
    return bool(distributed.max_across(flag.to(torch.int32)).item())


def global_batch_size(loader: Any) -> int:
    """The batch size the config set for ``loader``: the whole batch of a data-parallel run, of
    which each rank gets its share (:mod:`icep.data`)."""
    return getattr(loader, "global_batch_size", None) or loader.batch_size


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should step: frozen ones (``requires_grad=False``) left out."""
    return [p for p in model.parameters() if p.requires_grad]


def sgd(
    params: nn.Module | Iterable[nn.Parameter],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """A fresh SGD over ``params`` (a model: its trainable parameters), with the fused CUDA
    kernel when they all live on a GPU. Called like a ``torch.optim`` class, so a config's
    ``_partial_`` optimizer node can name either."""
    params = trainable(params) if isinstance(params, nn.Module) else list(params)
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        fused=fused or None,
    )
