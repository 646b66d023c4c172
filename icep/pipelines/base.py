"""What every pruning pipeline shares: the model and its pruning engine, the data, timed phases
(prune, fine-tune, evaluate) and the per-step records. A pipeline is a short loop over these."""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icep import distributed
from icep.compute import WORK_KEYS
from icep.data import Data
from icep.interrupts import uninterruptible
from icep.loggers import RunLogger
from icep.pipelines.finetune import FineTune
from icep.pruning import (
    PruningEngine,
    Unit,
    count_macs_params,
    ignored_modules,
    prepare_criterion,
    select_global,
)
from icep.serialization import atomic_open, cpu_state_dict, layer_shapes
from icep.train import Distillation, Trainer, trainable

log = logging.getLogger(__name__)

# Phases whose time is the pipeline's cost. Test-set evaluation is reporting, not cost; so is
# writing checkpoints ("checkpoint").
COST_PHASES = ("freeze_analysis", "prune", "finetune", "eval")
# Phases whose seconds each step row gives (t_<phase>).
STEP_PHASES = ("prune", "finetune", "eval")
# Phases whose work the summary names one by one (flops_<phase>).
WORK_PHASES = (*COST_PHASES, "report")
CHECKPOINT_FORMAT = "icep.checkpoint/1"


@dataclass(kw_only=True)
class Shaping:
    """The keys every pipeline takes about the pruned model's shape."""

    round_to: int = 1  # every pruned width a multiple of this (GPUs like 8); 1: any width
    # A budget instead of a ratio: {macs: S} or {params: S}, the share of the unpruned model's
    # count that may remain (icep.pruning.budget); a schedule's plain share, or None.
    target: Any = None


class PruningRun:
    def __init__(
        self,
        model: nn.Module,
        data: Data,
        trainer: Trainer,
        criterion: Any,
        logger: RunLogger,
        checkpoint: str | Path | None = None,
        config: dict[str, Any] | None = None,
        ignored_layers: Sequence[str] = (),
        step_data: Data | None = None,
        ties: str = "stable",
        round_to: int = 1,
    ):
        """``checkpoint``: where to write the run's state after every step (None: nowhere), with
        ``config``, the run's resolved config, so a resume with another config is refused.
        ``ignored_layers``: layers no unit may cut (``model.ignored_layers``: qualified names or
        shell patterns). ``step_data``: a share of ``data`` (:func:`icep.data.subsample`) the
        steps fine-tune, score and decide on, as the reference's DenseNet run does, until
        :meth:`use_full_data`; the report split and the summary's accuracies use all of ``data``.
        ``ties``: how equal scores are ordered at a cut (``stable`` | ``sort``: PruningEngine).
        ``round_to``: every width a prune gives is a multiple of it (``pipeline.round_to``:
        :meth:`PruningEngine.rounded`). ``plan``, set before the pipeline runs (a budget's
        solution, :mod:`icep.pruning.budget`): the narrowest each unit layer may become.
        """
        self.model = model
        self.checkpoint_path = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_config = config
        self.full_data = data
        self.step_data = step_data
        # What the steps train, score and decide on: all the data, or step_data's share of it.
        self.data = step_data if step_data is not None else data
        self.trainer = trainer
        self.timer = trainer.timer
        self.criterion = criterion
        self.logger = logger
        self.example_inputs = torch.zeros(1, *data.input_shape, device=trainer.device)
        self.ignored_layers = list(ignored_layers)
        self.ties = ties
        self.round_to = round_to
        self.plan: dict[str, int] = {}
        self.engine = self.new_engine(model)
        self.macs_before, self.params_before = count_macs_params(model, self.example_inputs)
        self.rows: list[dict[str, Any]] = []
        # Every decision uses this split; the other one is only reported.
        self.decision_split = "val"
        self.acc_original: float | None = None  # on the decision split, measured once
        self.acc_now: float | None = None  # on the decision split, after the latest evaluation
        self.acc_original_report: float | None = None  # on the other split
        # With step data: the unpruned accuracy on the whole decision split, for the summary.
        self.acc_original_full: float | None = None
        self._acc_now_full = step_data is None  # whether acc_now is on the whole split
        self.finetunes = 0
        self.epochs_trained = 0  # the run's model's training epochs, all fine-tunes together
        # Called with (run, row) after each step is recorded, e.g. to report to an Optuna trial;
        # a hook may raise to stop the run (optuna.TrialPruned).
        self.on_step: list[Callable[[PruningRun, dict[str, Any]], None]] = []
        # What a pipeline computes once and must not redo after a resume (ICE's frozen layers).
        self.state: dict[str, Any] = {}
        self.resumed_from: int | None = None  # the step a resumed run continues after
        self.planned_steps: int | None = None  # a schedule's step count; None: one per unit
        self._dense: nn.Module | None = None  # the unpruned model, kept when resuming
        self._work_recorded = dict.fromkeys(WORK_KEYS, 0)  # the work up to the last row
        self._seconds_recorded: dict[str, float] = {}  # STEP_PHASES' seconds up to the last row
        # Wall-clock seconds of the run (everything, as the reference's timer), attempts before a
        # resume included.
        self._wall_started = time.perf_counter()
        self._wall_before = 0.0

    def new_engine(self, model: nn.Module) -> PruningEngine:
        """A pruning engine on ``model`` (the run's, or a copy), with the run's ignored layers."""
        name = type(model).__name__
        ignored = ignored_modules(model, self.ignored_layers, name)
        return PruningEngine(
            model, self.example_inputs, ignored, ties=self.ties, round_to=self.round_to
        )

    @property
    def units(self) -> list[Unit]:
        return self.engine.units

    @property
    def report_split(self) -> str:
        return "test" if self.decision_split == "val" else "val"

    @property
    def on_step_data(self) -> bool:
        """Whether the steps use a share of the data (``pipeline.step_train_fraction``...)."""
        return self.data is not self.full_data

    def _loader(self, split: str, data: Data | None = None):
        data = self.data if data is None else data
        return data.val if split == "val" else data.test

    def _report_accuracy(self, split: str | None = None) -> float | None:
        """The accuracy on all of ``split`` (by default the report split), timed as ``report``;
        None when it is val and there is none."""
        split = self.report_split if split is None else split
        loader = self._loader(split, self.full_data)
        if loader is None:
            return None
        with self.timer.phase("report"):
            return self.trainer.evaluate(self.model, loader, split)

    def use_full_data(self, evaluate_on_share: bool = False) -> None:
        """From now on train on all of the data (ICE's final fine-tune after a loop on step
        data, as the reference's DenseNet run), and decide on all of it too, or with
        ``evaluate_on_share`` still on the steps' share (the reference's final epochs)."""
        if not self.on_step_data:
            return
        if evaluate_on_share:
            self.data = dataclasses.replace(self.step_data, train=self.full_data.train)
        else:
            self.data = self.full_data
        self._acc_now_full = False

    def pending(self, steps: Sequence[Any]) -> Sequence[Any]:
        """The ``steps`` not done yet: all of them, or those after a resumed run's checkpoint."""
        return steps[len(self.rows) :]

    def start(self, decision_split: str = "val") -> float:
        """Measure the unpruned accuracy once: on ``decision_split`` for every decision, on the
        other split for the report only. Without a val split (``dataset.val_fraction=0``) both
        are test. A resumed run has it from its checkpoint."""
        if self.resumed_from is not None:
            log.info(
                "resumed after step %d of %d: %s %.2f%% before pruning, %.2f%% now",
                self.resumed_from,
                self.planned_steps or len(self.units),
                self.decision_split,
                self.acc_original,
                self.acc_now,
            )
            return self.acc_original
        self.decision_split = "test" if self.data.val is None else decision_split
        self.acc_original = self.evaluate()
        if self.on_step_data:
            self.acc_original_full = self._report_accuracy(self.decision_split)
        self.acc_original_report = self._report_accuracy()
        report = self.acc_original_report
        log.info(
            "unpruned: %s %.2f%% (decisions), %s %s, %d units, %.3fM params, %.2fM MACs",
            self.decision_split,
            self.acc_original,
            self.report_split,
            "none held out" if report is None else f"{report:.2f}%",
            len(self.units),
            self.params_before / 1e6,
            self.macs_before / 1e6,
        )
        return self.acc_original

    def teacher(self, settings: Any) -> Distillation | None:
        """The unpruned model, frozen, as a distillation teacher (call before pruning), when
        ``settings`` (a fine-tune policy, or the training keys of AGP and EPI) ask for one:
        ``distill``, ``distill_temperature``, ``distill_weight``."""
        if not settings.distill:
            return None
        source = self._dense if self._dense is not None else self.model
        teacher = copy.deepcopy(source).eval().requires_grad_(False)
        return Distillation(teacher, settings.distill_temperature, settings.distill_weight)

    def evaluate(self) -> float:
        """Accuracy (percent) on the decision split, timed and counted as ``eval``."""
        with self.timer.phase("eval"):
            self.acc_now = self.trainer.evaluate(
                self.model, self._loader(self.decision_split), self.decision_split
            )
        self._acc_now_full = not self.on_step_data
        return self.acc_now

    def remaining(self) -> float:
        """The remaining fraction x of METHOD.md section 1."""
        return self.engine.remaining()

    def frozen_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if not p.requires_grad)

    def prepare_criterion(self, convs: Sequence[str], engine: PruningEngine | None = None) -> None:
        """Let the criterion look at the model before it scores ``convs`` (of ``engine``'s model,
        by default the run's), counting the training images it passes through the model."""
        engine = engine if engine is not None else self.engine
        loader = _CountingLoader(self.data.train)
        prepare_criterion(self.criterion, engine, convs, loader, self.trainer.device)
        if loader.images:  # a criterion that looked at data (the model is not pruned yet)
            # Every rank of a data-parallel run looked at its part of the same batches.
            loader.images = int(distributed.sum_across(torch.tensor(loader.images)).item())
            cost = self.trainer.cost(engine.model, self.data.input_shape)
            # Gradient criteria (Taylor) also run back through the model: the input-gradient
            # half of a backward pass (the weight gradients of the few scored convs are left out).
            backward = getattr(self.criterion, "needs_gradients", False)
            self.timer.count(
                images_fwd=loader.images,
                images_bwd=loader.images if backward else 0,
                flops=loader.images * cost.forward_flops * (2 if backward else 1),
            )

    def phase(self, name: str):
        """Time and count a block as phase ``name``, for the steps a pipeline composes itself
        (ICE's freezing analysis, EPI's ranking after every epoch)."""
        return self.timer.phase(name)

    def seconds(self, *phases: str) -> float:
        """Seconds spent so far in ``phases`` (by default the cost phases)."""
        return self.timer.total(*(phases or COST_PHASES))

    def wall_seconds(self) -> float:
        """Wall-clock seconds since the run began: every phase, reporting evaluations, MAC
        counting and checkpoints included (the earlier attempts' too, for a resumed run)."""
        return self._wall_before + time.perf_counter() - self._wall_started

    def pruned_copy(self, unit: int, ratio: float) -> nn.Module:
        """A copy of the model with unit ``unit`` pruned by ``ratio`` (the run's model is left
        as it is): what an analysis trains."""
        model = copy.deepcopy(self.model)
        engine = self.new_engine(model)
        self.prepare_criterion(engine.units[unit].convs, engine)
        engine.prune_unit(unit, ratio, self.criterion)
        return self.trainer.prepare(model)

    def global_removal(self, share: float, min_channels_share: float) -> dict[str, list[int]]:
        """The unit channels a global prune to ``share`` of the original ones would remove now:
        one ranking of all of them, each layer's scores divided by its largest, each conv keeping
        at least ``ceil(min_channels_share * C)``."""
        original = self.engine.original_widths
        self.prepare_criterion(list(original))
        scores = {name: self.engine.scores(name, self.criterion) for name in original}
        return select_global(
            scores, original, share, min_channels_share, self.engine.channel_groups
        )

    def prune_channels(self, removal: dict[str, list[int]]) -> None:
        """Remove the given channels of each unit conv; with ``round_to``, as many of its
        lowest-scored channels as make its width a multiple, the nearest to that many."""
        now = self.engine.unit_widths()
        widths = {n: self.engine.rounded(n, now[n] - len(idxs)) for n, idxs in removal.items()}
        if any(widths[n] != now[n] - len(idxs) for n, idxs in removal.items()):
            self.prune_to_widths(widths)
            return
        self.engine.prune_channels(removal)
        self.trainer.prepare(self.model)  # pruned weights come back in the default layout

    def prune_to_widths(self, widths: dict[str, int]) -> None:
        """Cut each unit conv to its width (rounded to ``round_to``, never below the
        ``plan``), the criterion's lowest channels first."""
        widths = {n: max(self.engine.rounded(n, w), self.plan.get(n, 0)) for n, w in widths.items()}
        self.prepare_criterion(list(widths))
        self.engine.prune_to_widths(widths, self.criterion)
        self.trainer.prepare(self.model)

    def prune(self, unit: Unit, ratio: float) -> None:
        """Remove ``ceil(ratio * C)`` channels of ``unit``, timed and counted as ``prune``."""
        with self.timer.phase("prune"):
            # What a criterion looks at first (gradients, activations) is pruning cost too.
            self.prepare_criterion(unit.convs)
            widths = self.engine.unit_widths_after(unit.index, ratio)
            widths = {n: max(w, self.plan.get(n, 0)) for n, w in widths.items()}
            self.engine.prune_to_widths(widths, self.criterion)
            self.trainer.prepare(self.model)  # pruned weights come back in the default layout

    # --- training: a fine-tune policy (icep.pipelines.finetune) or a pipeline's own epochs ---

    def recover(
        self,
        policy: FineTune,
        lr: float | None = None,
        distill: Distillation | None = None,
        desc: str = "fine-tune",
    ) -> int:
        """Fine-tune after a prune as ``policy`` says (at ``lr``, by default the policy's own),
        leaving ``acc_now`` measured on the weights it ends with. Returns the epochs it ran."""
        epochs = policy(self, lr, distill, desc)
        self.finetunes += 1
        return epochs

    def new_optimizer(
        self,
        make: Callable[..., torch.optim.Optimizer],
        lr: float,
        model: nn.Module | None = None,
        phase: str = "finetune",
    ) -> torch.optim.Optimizer:
        """``make`` (a ``_partial_`` optimizer node) over the trainable parameters of ``model``
        (by default the model being pruned) at ``lr``."""
        with self.timer.phase(phase):
            return make(trainable(self.model if model is None else model), lr=lr)

    def fit(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        distill: Distillation | None = None,
        desc: str = "fine-tune",
        model: nn.Module | None = None,
        phase: str = "finetune",
    ) -> None:
        """Train ``epochs`` epochs with ``optimizer``, timed as ``phase``. ``model`` defaults to
        the model being pruned; a copy for an analysis is trained the same way. A NaN loss raises
        an IcepError naming ``desc`` (the step) and the lr. The epochs of the model being pruned
        go to the logger (:meth:`RunLogger.log_epoch`) after the phase, so that logging is no
        part of its time; an analysis copy's do not."""
        target = self.model if model is None else model
        trained: list[dict[str, float]] = []
        with self.timer.phase(phase):
            self.trainer.fit(
                target,
                self.data.train,
                optimizer,
                epochs,
                distill=distill,
                desc=desc,
                on_epoch=trained.append if target is self.model else None,
            )
        for result in trained:
            self.epochs_trained += 1
            self.logger.log_epoch({**result, "epoch": self.epochs_trained})

    def train_epoch(
        self, optimizer: torch.optim.Optimizer, distill: Distillation | None, desc: str
    ) -> None:
        """One epoch with ``optimizer`` (kept across epochs: the pipelines that prune during
        training), counted as a fine-tune."""
        self.fit(optimizer, 1, distill, desc)
        self.finetunes += 1

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the model's weights, to :meth:`put_back` later."""
        with self.timer.phase("finetune"):
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def put_back(self, weights: dict[str, torch.Tensor], acc: float) -> None:
        """Load weights from :meth:`snapshot`; ``acc`` is what their evaluation gave."""
        with self.timer.phase("finetune"):
            self.model.load_state_dict(weights)
        self.acc_now = acc

    def resume_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """In a run resumed from a checkpoint, load the state saved there with
        :meth:`keep_optimizer` (momentum included) into ``optimizer``, so the resumed run trains
        on as the uninterrupted one would."""
        saved = self.state.pop("optimizer", None)
        if saved is not None:
            optimizer.load_state_dict(saved)
        return optimizer

    def keep_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Put ``optimizer``'s state in the next checkpoint."""
        self.state["optimizer"] = optimizer.state_dict()

    def record(self, unit: Unit | str, **fields: Any) -> dict[str, Any]:
        """Append one step's row to metrics.jsonl (and W&B), adding size, the accuracy after the
        step on the decision split (``val_acc``, or ``test_acc`` when deciding on test), what the
        step cost and the cumulative cost. ``unit`` is the unit the step pruned, or a label for a
        step that pruned more than one.

        The cost is the run's own bookkeeping, not the pipeline's: the seconds of each phase
        (``t_prune``, ``t_finetune``, ``t_eval``) and the work of the cost phases (``images_fwd``,
        ``images_bwd``, ``flops``) since the previous row (the first row: since the run began)."""
        label = unit if isinstance(unit, str) else unit.name
        macs, params = count_macs_params(self.model, self.example_inputs)
        work = self.timer.work_total(*COST_PHASES)
        before = self._work_recorded
        self._work_recorded = work
        seconds = {phase: self.timer.total(phase) for phase in STEP_PHASES}
        seconds_before = self._seconds_recorded
        self._seconds_recorded = seconds
        row = {
            "step": len(self.rows) + 1,
            "unit": label,
            "params": params,
            "macs": macs,
            "remaining": self.remaining(),
            f"{self.decision_split}_acc": self.acc_now,
            **fields,
            **{f"t_{p}": seconds[p] - seconds_before.get(p, 0.0) for p in STEP_PHASES},
            # The cost phases' work since the previous row (icep.compute), and the running total.
            **{key: work[key] - before[key] for key in WORK_KEYS},
            "t_total": self.timer.total(*COST_PHASES),
            "flops_total": work["flops"],
        }
        # Every rank of a data-parallel run must have pruned the same channels (icep.distributed).
        distributed.check_same("the pruned structure", layer_shapes(self.model))
        rng = None  # every rank's random states, for a resume (a checkpoint's only)
        if self.checkpoint_path is not None:
            rng = distributed.gather_to_main(_rng_state(self.data))
        with uninterruptible():  # a signal stops the run with the row and its checkpoint written
            self.rows.append(row)
            self.logger.log_step(row)
            self.save_checkpoint(rng)
        log.info(
            "step %d/%d %s: %s %.2f%%, %s, remaining %.3f, %.1fs so far",
            row["step"],
            self.planned_steps or len(self.units),
            label,
            self.decision_split,
            self.acc_now,
            "fine-tuned" if row.get("finetuned") else "no fine-tune",
            row["remaining"],
            row["t_total"],
        )
        for hook in self.on_step:
            hook(self, row)
        return row

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, rng: list[dict[str, Any]] | None = None) -> None:
        """Write everything a resume needs, atomically: the pruned structure and weights, the
        accuracies, the rows so far, the pipeline's one-off state, the timers and RNG states
        (``rng``: each rank's, by rank; by default this process's). Rank 0 writes it."""
        if self.checkpoint_path is None or not distributed.is_main():
            return
        rng = rng or [_rng_state(self.data)]
        scaler = self.trainer.scaler
        with self.timer.phase("checkpoint"), atomic_open(self.checkpoint_path) as f:
            torch.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": self.checkpoint_config,
                    "layers": layer_shapes(self.model),
                    "state_dict": cpu_state_dict(self.model),
                    "steps": len(self.rows),
                    "rows": self.rows,
                    "decision_split": self.decision_split,
                    "acc_original": self.acc_original,
                    "acc_now": self.acc_now,
                    "acc_original_report": self.acc_original_report,
                    "acc_original_full": self.acc_original_full,
                    "finetunes": self.finetunes,
                    "epochs_trained": self.epochs_trained,
                    "state": self.state,
                    "timer": dict(self.timer.totals),
                    "work": {phase: dict(work) for phase, work in self.timer.work.items()},
                    "rng": rng[0],
                    "rng_ranks": rng[1:],  # the other ranks' of a data-parallel run
                    "scaler": None if scaler is None else scaler.state_dict(),
                    "wall_s": self.wall_seconds(),
                },
                f,
            )

    def restore(self, blob: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`: rebuild the pruned
        structure on the unpruned model, load its weights and every counter, then the RNG states
        (last, so the next step draws what it would have drawn without the interruption)."""
        self._dense = copy.deepcopy(self.model).eval().requires_grad_(False)
        widths = {
            name: attrs.get("out_channels", attrs.get("out_features"))
            for name, attrs in blob["layers"].items()
            if name in self.engine.original_widths
        }
        self.engine.prune_to_widths(widths)
        self.model.load_state_dict(blob["state_dict"])
        self.trainer.prepare(self.model)
        self.rows = list(blob["rows"])
        self.decision_split = blob["decision_split"]
        self.acc_original = blob["acc_original"]
        self.acc_now = blob["acc_now"]
        self.acc_original_report = blob["acc_original_report"]
        self.acc_original_full = blob.get("acc_original_full")
        self.finetunes = blob["finetunes"]
        self.epochs_trained = blob.get("epochs_trained", 0)
        self.state = dict(blob["state"])
        self.timer.totals.update(blob["timer"])
        for phase, work in blob.get("work", {}).items():
            self.timer.work[phase] = dict(work)
        self._work_recorded = self.timer.work_total(*COST_PHASES)
        self._seconds_recorded = {phase: self.timer.total(phase) for phase in STEP_PHASES}
        self.resumed_from = blob["steps"]
        self._wall_before = blob.get("wall_s", 0.0)
        self._wall_started = time.perf_counter()
        if blob.get("scaler") and self.trainer.scaler is not None:
            self.trainer.scaler.load_state_dict(blob["scaler"])
        self.logger.rewrite_steps(self.rows)  # drops a row written after the checkpoint
        # A rank of a data-parallel run takes its own states (rank 0's when the run had fewer).
        others = blob.get("rng_ranks") or []
        rank = distributed.world().rank
        _set_rng_state(others[rank - 1] if 0 < rank <= len(others) else blob["rng"], self.data)

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Final accuracy (val and test), sizes and time per phase."""
        if self.acc_now is None or not self.rows:
            self.evaluate()
        shares = {}
        acc_original, acc_final = self.acc_original, self.acc_now
        if self.acc_original_full is not None:  # the steps decided on a share of the data
            shares = {"step_data": self._step_data_summary()}
            acc_original = self.acc_original_full
            if not self._acc_now_full:
                acc_final = self._report_accuracy(self.decision_split)
        acc_report = self._report_accuracy()
        acc = {
            f"acc_original_{self.decision_split}": acc_original,
            f"acc_final_{self.decision_split}": acc_final,
            f"acc_original_{self.report_split}": self.acc_original_report,
            f"acc_final_{self.report_split}": acc_report,
        }
        macs, params = count_macs_params(self.model, self.example_inputs)
        t = self.timer.totals
        cost_work = self.timer.work_total(*COST_PHASES)
        return {
            "decision_split": self.decision_split,
            **{k: acc[k] for k in sorted(acc, key=lambda k: (k.endswith("test"), "final" in k))},
            **{
                f"acc_drop_{split}": None
                if acc[f"acc_original_{split}"] is None
                else acc[f"acc_original_{split}"] - acc[f"acc_final_{split}"]
                for split in ("val", "test")
            },
            "params_before": self.params_before,
            "params_after": params,
            "macs_before": self.macs_before,
            "macs_after": macs,
            "params_ratio": params / self.params_before,  # the share left
            "macs_ratio": macs / self.macs_before,
            "remaining": self.remaining(),
            "channels_pruned_share": self.engine.pruned_share(),
            "steps": len(self.rows),
            "finetunes": self.finetunes,
            "time_total_s": self.timer.total(*COST_PHASES),
            "time_prune_s": t.get("prune", 0.0),
            "time_finetune_s": t.get("finetune", 0.0),
            "time_eval_s": t.get("eval", 0.0),
            "time_freeze_analysis_s": t.get("freeze_analysis", 0.0),
            "time_report_s": t.get("report", 0.0),
            "time_checkpoint_s": t.get("checkpoint", 0.0),
            "time_wall_s": self.wall_seconds(),
            "flops_total": cost_work["flops"],
            "images_fwd_total": cost_work["images_fwd"],
            "images_bwd_total": cost_work["images_bwd"],
            **{f"flops_{phase}": self.timer.work_total(phase)["flops"] for phase in WORK_PHASES},
            # Every phase's work, the dense training and test reporting included.
            "compute": {phase: dict(work) for phase, work in sorted(self.timer.work.items())},
            **shares,
            **extra,
        }

    def _step_data_summary(self) -> dict[str, Any]:
        """What the steps' share of the data was and what they measured on it."""
        split = self.decision_split
        return {
            "train_images": len(self.step_data.train.dataset),
            f"{split}_images": len(self._loader(split, self.step_data).dataset),
            f"acc_original_{split}": self.acc_original,
            f"acc_last_step_{split}": self.rows[-1][f"{split}_acc"] if self.rows else None,
        }


class _CountingLoader:
    """Iterates over a loader, counting the images it hands out."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.images = 0

    def __iter__(self):
        for x, y in self.loader:
            self.images += len(y)
            yield x, y


def _rng_state(data: Data) -> dict[str, Any]:
    """Every random state a step draws from, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    generator = getattr(data.train, "generator", None)
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "train_loader": generator.get_state() if generator is not None else None,
    }


def _set_rng_state(state: dict[str, Any], data: Data) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(data.train, "generator", None)
    if generator is not None and state["train_loader"] is not None:
        generator.set_state(state["train_loader"])
