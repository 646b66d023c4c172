"""Checks on the composed config, run before any work starts.

Hydra already rejects unknown group options and keys; these are the value checks. Each failure is
a :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icep.errors import ConfigError


def uses_ratio(pipeline: Any) -> bool:
    """Whether a pipeline config prunes by a per-unit ``ratio`` (ICE, the block-wise baseline)
    rather than to a schedule's ``target``. Takes a DictConfig or a plain dict."""
    return (
        pipeline.get("ratio") is not None and pipeline.get("schedule", "blockwise") == "blockwise"
    )


def pruned_share(pipeline: Any) -> float | None:
    """How much a pipeline config prunes: its ``ratio`` or its ``target`` (None: the dense
    model). Names runs, tags them and groups them in the comparison report."""
    return pipeline.get("ratio") if uses_ratio(pipeline) else pipeline.get("target")


def pipeline_label(pipeline: Any) -> str:
    """The pipeline's name, with its schedule when that is not the block-wise default
    (``iterative_geometric``), so that W&B job types and the report's rows tell the baseline
    and a schedule run of ``pipeline=iterative`` apart."""
    schedule = pipeline.get("schedule")
    if schedule is None or schedule == "blockwise":
        return pipeline.get("name")
    return f"{pipeline.get('name')}_{schedule}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# key -> (test, what is allowed). Keys absent from the config are skipped, so one table serves
# every pipeline and dataset.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (_int, "an integer"),
    "pipeline.ratio": (lambda v: _number(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "pipeline.finetune_epochs": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "pipeline.final_finetune_epochs": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "pipeline.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "pipeline.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "pipeline.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "pipeline.distill_temperature": (lambda v: _number(v) and v > 0, "a number > 0"),
    "pipeline.thre": (lambda v: _number(v) and v >= 0, "a number >= 0 (accuracy points)"),
    "pipeline.fr": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "pipeline.base": (lambda v: _number(v) and v > 0, "a number > 0"),
    "pipeline.p": (lambda v: _number(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "pipeline.beta": (lambda v: _number(v) and v > 0, "a number > 0"),
    "pipeline.delta": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "pipeline.decision_split": (lambda v: v in ("val", "test"), "val or test"),
    "pipeline.trigger": (lambda v: isinstance(v, bool), "true or false"),
    "pipeline.freeze": (lambda v: isinstance(v, bool), "true or false"),
    "pipeline.adaptive_lr": (lambda v: isinstance(v, bool), "true or false"),
    "pipeline.distill": (lambda v: isinstance(v, bool), "true or false"),
    "dense.epochs": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "dense.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "dense.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "dense.nesterov": (lambda v: isinstance(v, bool), "true or false"),
    "dense.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "dense.label_smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "dense.batch_size": (lambda v: v is None or (_int(v) and v >= 1), "null or an integer >= 1"),
    "dense.schedule": (
        lambda v: v in ("cosine", "step", "onecycle"),
        "cosine, step or onecycle",
    ),
    "dense.warmup_share": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "dense.div_factor": (lambda v: _number(v) and v >= 1, "a number >= 1"),
    "trainer.batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "trainer.eval_batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "trainer.num_workers": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "trainer.loader": (lambda v: v in ("auto", "device", "workers"), "auto, device or workers"),
    "trainer.device_data_gb": (lambda v: _number(v) and v >= 0, "a number >= 0 (GiB)"),
    "trainer.prefetch_factor": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "trainer.amp": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "trainer.channels_last": (lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"),
    "trainer.cudnn_benchmark": (
        lambda v: v == "auto" or isinstance(v, bool),
        "auto, true or false",
    ),
    "trainer.compile": (lambda v: isinstance(v, bool), "true or false"),
    "dataset.val_fraction": (
        lambda v: _number(v) and 0 < v < 1,
        "a number strictly between 0 and 1",
    ),
    "dataset.bad_images": (lambda v: v in ("error", "skip"), "error or skip"),
    "logger.mode": (
        lambda v: v in ("online", "offline", "disabled"),
        "online, offline or disabled",
    ),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that is out of range."""
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        if not test(value):
            raise ConfigError(key, f"got {value!r}; must be {allowed}")
    base, delta = OmegaConf.select(cfg, "pipeline.base"), OmegaConf.select(cfg, "pipeline.delta")
    if base is not None and delta is not None and delta >= base:
        raise ConfigError(
            "pipeline.delta",
            f"got {delta}; must be below pipeline.base ({base}) so lr(x) stays positive",
        )
    if OmegaConf.select(cfg, "dense.nesterov") and OmegaConf.select(cfg, "dense.momentum") == 0:
        raise ConfigError("dense.nesterov", "got true; needs dense.momentum > 0 (it is 0)")
    checkpoint = OmegaConf.select(cfg, "model.checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ConfigError(
            "model.checkpoint",
            f"{checkpoint} does not exist; give the path of a trained model or null to train one",
        )
