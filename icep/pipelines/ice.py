"""ICE-Pruning (METHOD.md section 3): the baseline loop plus three components, each a named
function here: the fine-tuning trigger (:func:`should_finetune`), layer freezing
(:func:`freeze_scores`, :func:`select_frozen`, :func:`freeze_layers`) and the pruning-aware
learning rate (:func:`pruning_aware_lr`). Switching all three off gives the baseline at lr = base.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from icep.pipelines.base import PruningRun, Shaping
from icep.pipelines.finetune import FineTune, Recovery
from icep.pruning import PruningEngine
from icep.train import Distillation

log = logging.getLogger(__name__)


# --- 3.1 Fine-tuning trigger -------------------------------------------------------------------
def should_finetune(acc_original: float, acc_now: float, thre: float) -> bool:
    """Fine-tune only once accuracy has fallen ``thre`` points or more below the unpruned one."""
    return acc_original - acc_now >= thre


# --- 3.3 Pruning-aware learning rate -----------------------------------------------------------
def pruning_aware_lr(x: float, base: float, p: float, beta: float, delta: float) -> float:
    """``base - delta / (1 + (x / (2(1-p) - x)) ** beta)``: a sigmoid in the remaining fraction x,
    about ``base`` while the network is dense, ``base - delta/2`` at x = 1 - p, about
    ``base - delta`` below. For x >= 2(1-p) the inner denominator is zero or negative and the
    formula has no real value; the sigmoid's limit there is ``base``, which is what it returns.
    """
    edge = 2.0 * (1.0 - p)
    if x >= edge:
        return base
    if x <= 0.0:
        return base - delta
    try:
        power = (x / (edge - x)) ** beta
    except OverflowError:  # x close to the edge: the fraction is ~0
        return base
    return base - delta / (1.0 + power)


# --- 3.2 Freezing ------------------------------------------------------------------------------
def _l1(model: nn.Module, names: list[str]) -> dict[str, float]:
    return {n: model.get_submodule(n).weight.detach().abs().sum().item() for n in names}


def freeze_scores(
    before: dict[str, float], after: dict[str, float], original_norm: dict[str, float]
) -> dict[str, float]:
    """``| sum|W_after| - sum|W_before| | / ||W_original||_2`` per layer: how much one fine-tune
    epoch moved it, relative to its unpruned size."""
    return {n: abs(after[n] - before[n]) / original_norm[n] for n in before}


def select_frozen(scores: dict[str, float], fr: float) -> list[str]:
    """The ``ceil(fr * N)`` layers that changed least (ties keep forward order)."""
    count = math.ceil(fr * len(scores) - 1e-9)
    return sorted(scores, key=scores.__getitem__)[:count]


def paired_norms(engine: PruningEngine, names: list[str], how: str = "auto") -> dict[str, str]:
    """The norm frozen with each named conv: the one after it (``after``: post-activation
    blocks, ResNet's conv-BN-ReLU), or the one before it (``before``: pre-activation blocks,
    DenseNet's BN-ReLU-conv, as the reference freezes them). ``auto`` takes ``before`` when some
    conv has a norm before it and none after (the pre-activation sign), else ``after``."""
    after = {name: engine.norm_after(name) for name in names}
    before = {name: engine.norm_before(name) for name in names}
    if how == "auto":
        pre_activation = any(before[n] is not None and after[n] is None for n in names)
        how = "before" if pre_activation else "after"
    chosen = before if how == "before" else after
    return {name: norm for name, norm in chosen.items() if norm is not None}


def freeze_layers(
    model: nn.Module, engine: PruningEngine, names: list[str], norms: str = "auto"
) -> None:
    """No gradient for each named conv and the affine parameters of its norm
    (:func:`paired_norms`). BatchNorm running statistics still update; the engine keeps the flags
    across prunes."""
    paired = paired_norms(engine, names, norms)
    for name in names:
        model.get_submodule(name).requires_grad_(False)
        if name in paired:
            model.get_submodule(paired[name]).requires_grad_(False)


def analyse_freezing(run: PruningRun, ice: ICE, distill: Distillation | None) -> dict[str, float]:
    """The one-off analysis: on a copy, prune only the first unit, fine-tune one epoch at
    ``freeze_lr`` (``base`` when null) and score every conv the units touch
    (:func:`freeze_scores`)."""
    names = run.engine.touched_convs()
    with run.phase("freeze_analysis"):
        original_norm = {n: run.model.get_submodule(n).weight.detach().norm().item() for n in names}
        trial = run.pruned_copy(0, ice.ratio)
        before = _l1(trial, names)
    lr = ice.base if ice.freeze_lr is None else ice.freeze_lr
    optimizer = run.new_optimizer(ice.finetune.optimizer, lr, model=trial, phase="freeze_analysis")
    run.fit(optimizer, 1, distill, "freeze analysis", model=trial, phase="freeze_analysis")
    with run.phase("freeze_analysis"):
        return freeze_scores(before, _l1(trial, names), original_norm)


# --- The loop ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ICE(Recovery, Shaping):
    """ICE-Pruning: every unit pruned once by ``ratio`` in forward order; after each prune the
    trigger decides whether to fine-tune, at the pruning-aware lr, with the least-changing
    layers frozen. Built from conf/pipeline/ice.yaml; with ``trigger``, ``freeze`` and
    ``adaptive_lr`` all false it is the baseline at lr = ``base``."""

    ratio: float  # share of each unit's channels removed: ceil(ratio * C)
    finetune: FineTune  # each triggered fine-tune (pipeline/finetune=fixed|patience)
    trigger: bool  # 3.1
    thre: float
    freeze: bool  # 3.2
    fr: float
    freeze_lr: float | None  # the analysis epoch's lr; None: base
    freeze_norm: str  # auto | after | before: the norm frozen with a conv
    adaptive_lr: bool  # 3.3
    base: float
    p: float
    beta: float
    delta: float
    decision_split: str
    final_lr_factor: float  # the final fine-tune's lr (Recovery): this times lr(x)
    name: str  # the label of reports, W&B tags and run names
    grid: Any = None  # the tuning stage's search spaces (conf/tune/), not used by the loop
    ranges: Any = None
    paper_tuning: Any = None  # tune=paper's trials and data shares for this model family

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        run.start(self.decision_split)
        distill = run.teacher(self.finetune)
        frozen = self.frozen_layers(run, distill) if self.freeze else []
        freeze_layers(run.model, run.engine, frozen, self.freeze_norm)
        for unit in run.pending(run.units):
            run.prune(unit, self.ratio)
            acc_pruned = run.evaluate() if self.trigger else None
            triggered = not self.trigger or should_finetune(run.acc_original, acc_pruned, self.thre)
            lr, epochs = None, 0
            if triggered:
                lr = self.learning_rate(run)
                desc = f"fine-tune {unit.index + 1}/{len(run.units)}"
                epochs = run.recover(self.policy_for(unit.name), lr, distill, desc)
            run.record(
                unit,
                ratio=self.ratio,
                acc_pruned=acc_pruned,
                triggered=triggered,
                finetuned=triggered,
                lr=lr,
                epochs=epochs,
                frozen_params=run.frozen_params(),
            )
        lr = self.final_lr_factor * self.learning_rate(run)
        final = self.recover_after_loop(run, lr, distill)
        return run.summary(
            frozen_layers=frozen,
            frozen_params=run.frozen_params(),
            finetunes_skipped=len(run.units) - sum(r["finetuned"] for r in run.rows),
            t_freeze_analysis=run.seconds("freeze_analysis"),
            final_finetune=final,
            hyperparameters=self.hyperparameters(),
        )

    def learning_rate(self, run: PruningRun) -> float:
        if not self.adaptive_lr:
            return self.base
        return pruning_aware_lr(run.remaining(), self.base, self.p, self.beta, self.delta)

    def frozen_layers(self, run: PruningRun, distill: Distillation | None) -> list[str]:
        """The layers to freeze, analysed once (a resumed run has them from its checkpoint)."""
        if "frozen" not in run.state:
            scores = analyse_freezing(run, self, distill)
            run.state["frozen"] = select_frozen(scores, self.fr)
            log.info(
                "froze %d of %d layers: %s",
                len(run.state["frozen"]),
                len(scores),
                run.state["frozen"],
            )
        return run.state["frozen"]

    def hyperparameters(self) -> dict[str, Any]:
        """The settings a summary reports, the fine-tune policy's included."""
        tune = self.finetune
        return {
            **{k: getattr(self, k) for k in HYPERPARAMETERS},
            "finetune_policy": tune.name,
            "finetune_epochs": getattr(tune, "epochs", None),
            "distill": tune.distill,
        }


HYPERPARAMETERS = (
    "thre",
    "fr",
    "base",
    "p",
    "beta",
    "delta",
    "trigger",
    "freeze",
    "adaptive_lr",
    "decision_split",
    "final_finetune_epochs",
)


__all__ = [
    "ICE",
    "analyse_freezing",
    "freeze_layers",
    "freeze_scores",
    "pruning_aware_lr",
    "select_frozen",
    "should_finetune",
]
