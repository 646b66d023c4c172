"""The one check of the composed config (:func:`validate`), run before any data or model is
touched, and the labels a config gives a run.

Hydra already rejects unknown group options and keys; these are the value checks, one rule per
key in :data:`RULES`. Each failure is a :class:`ConfigError` naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icep.errors import ConfigError, IcepError

BUDGET_KINDS = ("macs", "params", "latency")


@dataclasses.dataclass(frozen=True)
class Budget:
    """At most ``share`` of the unpruned model's ``kind`` (macs | params | latency, the last
    measured at ``batch``) may remain (``pipeline.target={macs: 0.5}``; solved in
    icep.pruning.budget)."""

    kind: str
    share: float
    batch: int = 1

    def __str__(self) -> str:
        at = f" at batch {self.batch}" if self.kind == "latency" else ""
        return f"{self.kind} {self.share:g}{at}"


def user_cache() -> Path:
    """The cache a run uses unless told otherwise (conf/config.yaml, ``paths.cache``):
    ``$ICEP_CACHE``, else ``$XDG_CACHE_HOME/icep``, else ``~/.cache/icep``; empty means unset."""
    if os.environ.get("ICEP_CACHE"):
        return Path(os.environ["ICEP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "icep"


def parse_budget(target: Any) -> Budget | None:
    """The budget a ``pipeline.target`` names ({macs: 0.5}, {latency: 0.5, batch: 32}), or None
    for a plain share."""
    if not (OmegaConf.is_dict(target) or isinstance(target, dict)):
        return None
    kinds = [k for k in target if k in BUDGET_KINDS]
    others = [k for k in target if k not in (*BUDGET_KINDS, "batch")]
    if len(kinds) != 1 or others or ("batch" in target and kinds != ["latency"]):
        raise ConfigError(
            "pipeline.target",
            f"got {dict(target)}; a budget names one of {', '.join(BUDGET_KINDS)} with the share "
            "of the unpruned model's count (or latency) that may remain, e.g. "
            "pipeline.target={macs: 0.5} or {latency: 0.5, batch: 32}",
        )
    kind = kinds[0]
    share = target[kind]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ConfigError(
            f"pipeline.target.{kind}", f"got {share!r}; must be a number strictly between 0 and 1"
        )
    batch = target.get("batch", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("pipeline.target.batch", f"got {batch!r}; must be an integer >= 1")
    return Budget(str(kind), float(share), batch)


def uses_ratio(pipeline: Any) -> bool:
    """Whether a pipeline config prunes by a per-unit ``ratio`` (ICE, the block-wise baseline)
    rather than to a schedule's ``target``. Takes a DictConfig or a plain dict."""
    return (
        pipeline.get("ratio") is not None and pipeline.get("schedule", "blockwise") == "blockwise"
    )


def pruned_share(pipeline: Any) -> float | str | None:
    """How much a pipeline config prunes: its ``ratio`` or its ``target`` (None: the dense
    model). Names runs, tags them and groups them in the comparison report."""
    budget = parse_budget(pipeline.get("target"))
    if budget is not None:  # the ratio or share is found at the start of the run
        return f"{budget.kind}{budget.share:g}"
    return pipeline.get("ratio") if uses_ratio(pipeline) else pipeline.get("target")


def pipeline_label(pipeline: Any) -> str:
    """The pipeline's name, with its schedule when that is not the block-wise default
    (``iterative_geometric``), so that W&B job types and the report's rows tell the baseline
    and a schedule run of ``pipeline=iterative`` apart."""
    schedule = pipeline.get("schedule")
    if schedule is None or schedule == "blockwise":
        return pipeline.get("name")
    return f"{pipeline.get('name')}_{schedule}"


def _share_word(share: float | str) -> str:
    """A tag's key for :func:`pruned_share`: ``ratio``, or ``budget`` (macs0.5)."""
    return "budget" if isinstance(share, str) else "ratio"


def run_tags(cfg: DictConfig, criterion: str) -> list[str]:
    """W&B tags that tell runs of one experiment apart in filters and grouped views
    (``criterion``: the criterion's name)."""
    share = pruned_share(cfg.pipeline)
    return [
        pipeline_label(cfg.pipeline),
        cfg.model.name,
        cfg.dataset.name,
        criterion,
        *([f"{_share_word(share)}={share}"] if share is not None else []),
        f"seed={cfg.seed}",
    ]


def run_name(cfg: DictConfig, criterion: str) -> str:
    """The W&B run name: pipeline, criterion, ratio (or budget) and seed, e.g. ``ice-l1-r0.6-s0``,
    ``ice-l1-macs0.5-s0``."""
    share = pruned_share(cfg.pipeline)
    return "-".join(
        [
            pipeline_label(cfg.pipeline),
            criterion,
            *([share if isinstance(share, str) else f"r{share}"] if share is not None else []),
        ]
        + [f"s{cfg.seed}"]
    )


def build(cfg: DictConfig, key: str) -> Any:
    """``hydra.utils.instantiate`` of the node at ``key`` (its ``_target_``); a node that cannot
    be built (an argument its class does not take, a bad value) is a ConfigError naming the key."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    what = OmegaConf.select(cfg, f"{key}._target_")
    try:
        built = instantiate(OmegaConf.select(cfg, key))
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, IcepError):
            raise cause from None
        reason = str(cause or exc).strip().splitlines()[0]
        raise ConfigError(key, f"cannot build {what}: {reason}") from None
    _check_partials(built, cfg, key)
    return built


def _check_partials(built: Any, cfg: DictConfig, key: str) -> None:
    """A ``_partial_`` node is finished later (an optimizer, with the parameters of each
    fine-tune): check now that its keys are arguments it takes, in it and in the nodes of a
    built dataclass (a pipeline's fine-tune policy and its optimizer)."""
    if isinstance(built, functools.partial):
        try:
            inspect.signature(built.func).bind_partial(*built.args, **built.keywords)
        except TypeError as exc:
            what = OmegaConf.select(cfg, f"{key}._target_")
            raise ConfigError(key, f"cannot build {what}: {exc}") from None
    elif dataclasses.is_dataclass(built):
        for f in dataclasses.fields(built):
            node = OmegaConf.select(cfg, f"{key}.{f.name}")
            if isinstance(node, DictConfig) and "_target_" in node:
                _check_partials(getattr(built, f.name), cfg, f"{key}.{f.name}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Rule = tuple[Callable[[Any], bool], str]


def _int_at_least(low: int) -> Rule:
    return (lambda v: _int(v) and v >= low), f"an integer >= {low}"


def _number_at_least(low: float, unit: str = "") -> Rule:
    return (lambda v: _number(v) and v >= low), f"a number >= {low:g}{unit}"


def _positive() -> Rule:
    return (lambda v: _number(v) and v > 0), "a number > 0"


def _open_share() -> Rule:
    return (lambda v: _number(v) and 0 < v < 1), "a number strictly between 0 and 1"


def _null_or_share() -> Rule:
    return (lambda v: v is None or (_number(v) and 0 < v <= 1)), "null or a number in (0, 1]"


def _share_below_one() -> Rule:
    return (lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)"


def _one_of(*values: Any) -> Rule:
    return (lambda v: v in values), ", ".join(map(str, values[:-1])) + f" or {values[-1]}"


def _boolean() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


def _auto_or_boolean() -> Rule:
    return (lambda v: v == "auto" or isinstance(v, bool)), "auto, true or false"


# The schema: key -> (test, what is allowed). Keys absent from the config are skipped, so one
# table serves every pipeline, fine-tune policy, criterion and dataset. The rules between keys
# follow in validate().
RULES: dict[str, Rule] = {
    "seed": ((lambda v: _int(v) and 0 <= v < 2**32), "an integer from 0 to 2**32 - 1"),
    "dry_run": _boolean(),
    # models (conf/model/)
    "model.ignored_layers": (
        (lambda v: OmegaConf.is_list(v) and all(isinstance(x, str) and x for x in v)),
        "a list of layer names or shell patterns, e.g. [blocks.*.attn]",
    ),
    "model.preflight_seconds": _positive(),
    "model.shortcut": _one_of("A", "B"),
    # pipelines (conf/pipeline/)
    "pipeline.ratio": _open_share(),
    "pipeline.target": (
        (lambda v: v is None or OmegaConf.is_dict(v) or (_number(v) and 0 < v < 1)),
        "a number strictly between 0 and 1, or a budget such as {macs: 0.5} or {params: 0.3}",
    ),
    "pipeline.round_to": _int_at_least(1),
    "pipeline.steps": _int_at_least(1),
    "pipeline.one_shot": _open_share(),
    "pipeline.initial": _share_below_one(),
    "pipeline.schedule": _one_of("blockwise", "constant", "geometric"),
    "pipeline.scope": _one_of("uniform", "global"),
    "pipeline.structure": _one_of("structured", "unstructured"),
    "pipeline.min_channels_share": _share_below_one(),
    "pipeline.epochs": _int_at_least(1),
    "pipeline.start_epoch": _int_at_least(1),
    "pipeline.frequency": _int_at_least(1),
    "pipeline.alpha": _open_share(),
    "pipeline.tau": (_number, "a number"),
    "pipeline.window": _int_at_least(1),
    "pipeline.final_finetune_epochs": _int_at_least(0),
    "pipeline.thre": _number_at_least(0, " (accuracy points)"),
    "pipeline.fr": ((lambda v: _number(v) and 0 <= v <= 1), "a number in [0, 1]"),
    "pipeline.base": _positive(),
    "pipeline.freeze_lr": ((lambda v: v is None or (_number(v) and v > 0)), "null or a number > 0"),
    "pipeline.freeze_norm": _one_of("auto", "after", "before"),
    "pipeline.step_train_fraction": _null_or_share(),
    "pipeline.step_eval_fraction": _null_or_share(),
    "pipeline.final_eval": _one_of("all", "step"),
    "pipeline.final_lr_factor": _positive(),
    "pipeline.unit_epochs": (
        (
            lambda v: (
                v is None or (OmegaConf.is_dict(v) and all(_int(e) and e >= 1 for e in v.values()))
            )
        ),
        "null or a mapping of unit name patterns to epochs >= 1, e.g. {features.denseblock3.*: 2}",
    ),
    "pipeline.p": _open_share(),
    "pipeline.beta": _positive(),
    "pipeline.delta": _number_at_least(0),
    "pipeline.decision_split": _one_of("val", "test"),
    "pipeline.trigger": _boolean(),
    "pipeline.freeze": _boolean(),
    "pipeline.adaptive_lr": _boolean(),
    # the training keys of AGP and EPI, and of every fine-tune policy (conf/pipeline/finetune/)
    **{
        f"{node}.{key}": rule
        for node in ("pipeline", "pipeline.finetune")
        for key, rule in {
            "lr": _positive(),
            "optimizer.momentum": _share_below_one(),
            "optimizer.weight_decay": _number_at_least(0),
            "distill": _boolean(),
            "distill_temperature": _positive(),
            "distill_weight": _number_at_least(0),
        }.items()
    },
    "pipeline.finetune.epochs": _int_at_least(1),
    "pipeline.finetune.patience": _int_at_least(1),
    "pipeline.finetune.max_epochs": _int_at_least(1),
    "pipeline.finetune.min_delta": _number_at_least(0, " (accuracy points)"),
    # criteria (conf/criterion/)
    "criterion.batches": _int_at_least(1),
    "criterion.bins": _int_at_least(2),
    "criterion.seed": (_int, "an integer"),
    # dense training
    "dense.epochs": _int_at_least(1),
    "dense.lr": _positive(),
    "dense.momentum": _share_below_one(),
    "dense.nesterov": _boolean(),
    "dense.weight_decay": _number_at_least(0),
    "dense.label_smoothing": _share_below_one(),
    "dense.batch_size": ((lambda v: v is None or (_int(v) and v >= 1)), "null or an integer >= 1"),
    "dense.schedule": _one_of("cosine", "step", "onecycle"),
    "dense.warmup_share": _share_below_one(),
    "dense.div_factor": _number_at_least(1),
    # trainer
    "trainer.batch_size": _int_at_least(1),
    "trainer.eval_batch_size": _int_at_least(1),
    "trainer.num_workers": _int_at_least(0),
    "trainer.batching": _one_of("auto", "device", "workers"),
    "trainer.device_data_gb": _number_at_least(0, " (GiB)"),
    "trainer.prefetch_factor": _int_at_least(1),
    "trainer.amp": _auto_or_boolean(),
    "trainer.amp_dtype": _one_of("bfloat16", "float16"),
    "ties": _one_of("stable", "sort"),
    "tune.extra_epochs": _boolean(),
    "trainer.channels_last": _auto_or_boolean(),
    "trainer.cudnn_benchmark": _auto_or_boolean(),
    "trainer.compile": _boolean(),
    "trainer.deterministic": _boolean(),
    "trainer.find_unused_parameters": _boolean(),
    # datasets (conf/dataset/)
    "dataset.val_fraction": _share_below_one(),
    "dataset.train_subset": (
        (lambda v: v is None or (_int(v) and v >= 2)),
        "null or an integer >= 2 (train and val take one sample each at least)",
    ),
    "dataset.test_subset": (
        (lambda v: v is None or (_int(v) and v >= 1)),
        "null or an integer >= 1",
    ),
    "dataset.download": _boolean(),
    "dataset.bad_images": _one_of("error", "skip"),
    "dataset.augment": _one_of("cifar", "imagenet", "none"),
    "dataset.fit": _one_of("crop", "stretch"),
    "dataset.crop_padding": _int_at_least(0),
    "dataset.image_size": _int_at_least(1),
    "dataset.center_crop": ((lambda v: _number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "dataset.mean": (
        (lambda v: OmegaConf.is_list(v) and len(v) > 0 and all(map(_number, v))),
        "a list of numbers, one per channel",
    ),
    "dataset.std": (
        (lambda v: OmegaConf.is_list(v) and len(v) > 0 and all(_number(x) and x > 0 for x in v)),
        "a list of numbers > 0, one per channel",
    ),
    "dataset.test_fraction": _open_share(),
    "dense.milestones": (
        (lambda v: OmegaConf.is_list(v) and all(_number(f) and 0 < f < 1 for f in v)),
        "a list of fractions of the epochs in (0, 1), e.g. [0.5, 0.75]",
    ),
    "dataset.test_split_seed": (_int, "an integer"),
    "dataset.num_samples": _int_at_least(2),
    "dataset.num_test": _int_at_least(1),
    "dataset.num_classes": _int_at_least(2),
    "dataset.channels": _int_at_least(1),
    "dataset.pattern_size": _int_at_least(1),
    "dataset.noise": _number_at_least(0),
    # latency measurement
    "latency.batch_sizes": (
        # a list, or the one $ICEP_LATENCY_BATCH_SIZES decodes to
        (
            lambda v: (
                (OmegaConf.is_list(v) or isinstance(v, list)) and all(_int(b) and b >= 1 for b in v)
            )
        ),
        "a list of batch sizes >= 1, e.g. [1, 32, 256] ([] measures nothing)",
    ),
    "latency.min_run_time": _positive(),
    "latency.warmup": _int_at_least(0),
    # loggers (conf/logger/)
    "logger.mode": _one_of("online", "offline", "disabled"),
    # the tuning stage (conf/tune/)
    "tune.n_trials": _int_at_least(1),
    "tune.train_fraction": ((lambda v: _number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "tune.eval_fraction": ((lambda v: _number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "tune.tolerance": _number_at_least(0, " (accuracy points)"),
    "tune.select": _one_of("tolerance", "reference"),
}


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that is out of range: the table of rules,
    then the rules between keys, the model's name and the tuning stage. Runs before any data or
    model is touched."""
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue
        if not test(value):
            raise ConfigError(key, f"got {value!r}; must be {allowed}")
    pipeline = cfg.get("pipeline")
    if pipeline is not None:
        _check_pipeline(pipeline)
        no_val = OmegaConf.select(cfg, "dataset.val_fraction") == 0
        if no_val and pipeline.get("decision_split") == "val":
            raise ConfigError(
                "pipeline.decision_split",
                "got val, but dataset.val_fraction=0 holds no val split out; set "
                "pipeline.decision_split=test (the reference's) or dataset.val_fraction > 0",
            )
    if OmegaConf.select(cfg, "dense.nesterov") and OmegaConf.select(cfg, "dense.momentum") == 0:
        raise ConfigError("dense.nesterov", "got true; needs dense.momentum > 0 (it is 0)")
    checkpoint = OmegaConf.select(cfg, "model.checkpoint")
    if checkpoint is not None and not Path(checkpoint).is_file():
        from icep.models import missing_file

        what = missing_file(Path(checkpoint), "a trained model")
        raise ConfigError("model.checkpoint", f"{what} or null to train one")
    arch = OmegaConf.select(cfg, "model.arch")
    if arch is not None and "name" in arch:
        from icep.models import check_name

        check_name(arch._target_, arch.name)
    if cfg.get("tune") is not None:
        from icep.tune.stage import check_tune

        check_tune(cfg)


def _check_pipeline(p: DictConfig) -> None:
    """The rules between a pipeline's keys."""
    base, delta = p.get("base"), p.get("delta")
    if base is not None and delta is not None and delta >= base:
        raise ConfigError(
            "pipeline.delta",
            f"got {delta}; must be below pipeline.base ({base}) so lr(x) stays positive",
        )
    if p.get("schedule", "blockwise") != "blockwise":
        for key in ("unit_epochs", "final_finetune_epochs"):
            if p.get(key):
                raise ConfigError(
                    f"pipeline.{key}",
                    f"is for schedule=blockwise (units pruned one at a time); schedule="
                    f"{p.schedule} prunes every unit at each step: leave {key} out",
                )
    budget = parse_budget(p.get("target"))
    if budget is not None:
        _check_budget(p)
    numeric_target = p.get("target") is not None and budget is None
    if p.get("one_shot") is not None and numeric_target and p.one_shot >= p.target:
        raise ConfigError(
            "pipeline.one_shot", f"got {p.one_shot}; must be below pipeline.target ({p.target})"
        )
    if p.get("initial") is not None and numeric_target and p.initial >= p.target:
        raise ConfigError(
            "pipeline.initial", f"got {p.initial}; must be below pipeline.target ({p.target})"
        )
    if p.get("start_epoch") is not None:
        last = p.start_epoch + (p.steps - 1) * p.frequency
        if last > p.epochs:
            raise ConfigError(
                "pipeline.epochs",
                f"got {p.epochs}; the last AGP step comes at epoch {last} "
                "(start_epoch + (steps - 1) * frequency): raise epochs or lower the others",
            )
    if p.get("structure") == "unstructured" and uses_ratio(p):
        raise ConfigError(
            "pipeline.structure",
            "unstructured pruning needs a schedule; set pipeline.schedule=constant or geometric",
        )
    # The global scope's floor caps how much it can prune.
    target = p.get("alpha", p.get("target") if numeric_target else None)
    global_scope = p.get("scope", "global") == "global" and p.get("structure") != "unstructured"
    if target is not None and "min_channels_share" in p and global_scope and not uses_ratio(p):
        floor = p.min_channels_share
        if target > 1 - floor:
            raise ConfigError(
                "pipeline.min_channels_share",
                f"got {floor}; every layer keeps that share, so the target {target} cannot be "
                f"reached: lower it below {1 - target:.4g}",
            )


def _check_budget(p: DictConfig) -> None:
    """A budget (``pipeline.target={macs: S}``) is solved on the widths a prune gives, which only
    block-wise pipelines and uniform, structured schedules know before pruning."""
    if uses_ratio(p):
        return
    if p.get("structure") == "unstructured":
        raise ConfigError(
            "pipeline.target",
            "a MACs, params or latency budget needs structured pruning (masks remove none); set "
            "pipeline.structure=structured, or a plain share",
        )
    if p.get("scope") != "uniform":
        raise ConfigError(
            "pipeline.target",
            f"a MACs, params or latency budget needs pipeline.scope=uniform (got {p.get('scope')}: the "
            "global scope's widths depend on the scores at each step); or give a plain share",
        )
