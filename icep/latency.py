"""Measured inference latency of a model, before and after pruning (fewer MACs do not always run
faster: Torch-Pruning issues #33, #149, #382).

The model runs as the run runs it (its device, eval mode, ``inference_mode``, the trainer's
autocast and memory format) on a batch of zeros of each size in ``latency.batch_sizes``. On the
CPU ``torch.utils.benchmark.Timer.blocked_autorange`` times blocks of calls for at least
``latency.min_run_time`` seconds, on the run's thread count; on a GPU CUDA events time each call
after ``latency.warmup`` calls, synchronised, until ``min_run_time`` has passed. The figure is
the median milliseconds per batch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    trainer: Any,
    batch_sizes: Sequence[int],
    min_run_time: float = 0.5,
    warmup: int = 3,
) -> dict[int, float]:
    """Median milliseconds per forward pass of ``model`` (on ``trainer``'s device, as it runs
    models) for each batch size; a size that does not fit in the device's memory is left out
    (logged)."""
    was_training = model.training
    model.eval()
    found: dict[int, float] = {}
    try:
        for size in batch_sizes:
            x = trainer._inputs(torch.zeros(size, *input_shape))
            try:
                with torch.inference_mode(), trainer._autocast():
                    for _ in range(warmup):
                        model(x)
                    if x.device.type == "cuda":
                        found[size] = _cuda_median_ms(model, x, min_run_time)
                    else:
                        found[size] = _cpu_median_ms(model, x, min_run_time)
            except torch.cuda.OutOfMemoryError:
                log.warning("latency at batch %d: out of GPU memory; left out", size)
            finally:
                del x
    finally:
        model.train(was_training)
    return found


def _cpu_median_ms(model: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    # Importing torch.utils.benchmark imports cpp_extension, which warns that a CPU build has no
    # CUDA runtime: true, and not the user's concern.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        quiet.setLevel(level)

    timer = benchmark.Timer(
        stmt="model(x)",
        globals={"model": model, "x": x},
        num_threads=torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _cuda_median_ms(model: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    times = []
    deadline = time.perf_counter() + min_run_time
    while len(times) < 5 or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def latency_fields(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """The summary's flat latency keys: ``latency_b{N}_before_ms``, ``latency_b{N}_after_ms``
    and ``inference_speedup_b{N}`` (before / after) for each batch size measured both times."""
    fields: dict[str, float] = {}
    for size in sorted(before.keys() & after.keys()):
        fields[f"latency_b{size}_before_ms"] = before[size]
        fields[f"latency_b{size}_after_ms"] = after[size]
        fields[f"inference_speedup_b{size}"] = before[size] / after[size]
    return fields
