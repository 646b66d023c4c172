"""What every pruning pipeline shares: the model and its pruning engine, the data, timed phases
(prune, fine-tune, evaluate) and the per-step records. A pipeline is a short loop over these."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from icep.data import Data
from icep.logging import RunLogger
from icep.pruning import (
    PruningEngine,
    Unit,
    count_macs_params,
    remaining_fraction,
    spatial_conv_weights,
)
from icep.train import Distillation, Trainer, sgd

log = logging.getLogger(__name__)

# Phases whose time is the pipeline's cost. Test-set evaluation is reporting, not cost.
COST_PHASES = ("freeze_analysis", "prune", "finetune", "eval")


class PruningRun:
    def __init__(
        self,
        model: nn.Module,
        data: Data,
        trainer: Trainer,
        criterion: Any,
        logger: RunLogger,
    ):
        self.model = model
        self.data = data
        self.trainer = trainer
        self.timer = trainer.timer
        self.criterion = criterion
        self.logger = logger
        self.example_inputs = torch.zeros(1, *data.input_shape, device=trainer.device)
        self.engine = PruningEngine(model, self.example_inputs)
        self.original_weights = spatial_conv_weights(model)
        self.macs_before, self.params_before = count_macs_params(model, self.example_inputs)
        self.rows: list[dict[str, Any]] = []
        # Every decision uses this split; the other one is only reported.
        self.decision_split = "val"
        self.acc_original: float | None = None  # on the decision split, measured once
        self.acc_now: float | None = None  # on the decision split, after the latest evaluation
        self.acc_original_report: float | None = None  # on the other split
        self.finetunes = 0
        # Called with (run, row) after each step is recorded, e.g. to report to an Optuna trial;
        # a hook may raise to stop the run (optuna.TrialPruned).
        self.on_step: list[Callable[[PruningRun, dict[str, Any]], None]] = []

    @property
    def units(self) -> list[Unit]:
        return self.engine.units

    @property
    def report_split(self) -> str:
        return "test" if self.decision_split == "val" else "val"

    def _loader(self, split: str):
        return self.data.val if split == "val" else self.data.test

    def start(self, decision_split: str = "val") -> float:
        """Measure the unpruned accuracy once: on ``decision_split`` for every decision, on the
        other split for the report only."""
        self.decision_split = decision_split
        self.acc_original, _ = self.evaluate()
        with self.timer.phase("report"):
            self.acc_original_report = self.trainer.evaluate(
                self.model, self._loader(self.report_split), self.report_split
            )
        log.info(
            "unpruned: %s %.2f%% (decisions), %s %.2f%%, %d units, %.3fM params, %.2fM MACs",
            self.decision_split,
            self.acc_original,
            self.report_split,
            self.acc_original_report,
            len(self.units),
            self.params_before / 1e6,
            self.macs_before / 1e6,
        )
        return self.acc_original

    def teacher(self, cfg: Any) -> Distillation:
        """The unpruned model, frozen, as a distillation teacher (call before pruning)."""
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        return Distillation(teacher, cfg.distill_temperature, cfg.distill_weight)

    def evaluate(self) -> tuple[float, float]:
        """Accuracy (percent) on the decision split and the seconds it took."""
        with self.timer.phase("eval") as t:
            self.acc_now = self.trainer.evaluate(
                self.model, self._loader(self.decision_split), self.decision_split
            )
        return self.acc_now, t["seconds"]

    def remaining(self) -> float:
        """The remaining fraction x of METHOD.md section 1."""
        return remaining_fraction(self.model, self.original_weights)

    def frozen_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if not p.requires_grad)

    def prune(self, unit: Unit, ratio: float) -> float:
        with self.timer.phase("prune") as t:
            self.engine.prune_unit(unit.index, ratio, self.criterion)
            self.trainer.prepare(self.model)  # pruned weights come back in the default layout
        return t["seconds"]

    def finetune(
        self,
        epochs: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        distill: Distillation | None = None,
        desc: str = "fine-tune",
        model: nn.Module | None = None,
        phase: str = "finetune",
    ) -> float:
        """``epochs`` epochs with a fresh SGD at a constant ``lr``, timed as ``phase``.

        ``model`` defaults to the model being pruned; a different one (a copy for an analysis)
        is trained the same way but does not count as a fine-tune of the run.
        """
        target = self.model if model is None else model
        with self.timer.phase(phase) as t:
            optimizer = sgd(target, lr, momentum, weight_decay)
            self.trainer.fit(target, self.data.train, optimizer, epochs, distill=distill, desc=desc)
        if model is None:
            self.finetunes += 1
        return t["seconds"]

    def record(self, unit: Unit, **fields: Any) -> dict[str, Any]:
        """Append one step's row to metrics.jsonl (and W&B), adding size, the accuracy after the
        step on the decision split (``val_acc``, or ``test_acc`` when deciding on test) and the
        cumulative time."""
        macs, params = count_macs_params(self.model, self.example_inputs)
        row = {
            "step": len(self.rows) + 1,
            "unit": unit.name,
            "params": params,
            "macs": macs,
            "remaining": self.remaining(),
            f"{self.decision_split}_acc": self.acc_now,
            **fields,
            "t_total": self.timer.total(*COST_PHASES),
        }
        self.rows.append(row)
        self.logger.log_step(row)
        log.info(
            "step %d/%d %s: %s %.2f%%, %s, remaining %.3f, %.1fs so far",
            row["step"],
            len(self.units),
            unit.name,
            self.decision_split,
            self.acc_now,
            "fine-tuned" if row.get("finetuned") else "no fine-tune",
            row["remaining"],
            row["t_total"],
        )
        for hook in self.on_step:
            hook(self, row)
        return row

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Final accuracy (val and test), sizes and time per phase."""
        if self.acc_now is None or not self.rows:
            self.evaluate()
        with self.timer.phase("report"):
            acc_report = self.trainer.evaluate(
                self.model, self._loader(self.report_split), self.report_split
            )
        acc = {
            f"acc_original_{self.decision_split}": self.acc_original,
            f"acc_final_{self.decision_split}": self.acc_now,
            f"acc_original_{self.report_split}": self.acc_original_report,
            f"acc_final_{self.report_split}": acc_report,
        }
        macs, params = count_macs_params(self.model, self.example_inputs)
        t = self.timer.totals
        return {
            "decision_split": self.decision_split,
            **{k: acc[k] for k in sorted(acc, key=lambda k: (k.endswith("test"), "final" in k))},
            **{
                f"acc_drop_{split}": acc[f"acc_original_{split}"] - acc[f"acc_final_{split}"]
                for split in ("val", "test")
            },
            "params_before": self.params_before,
            "params_after": params,
            "macs_before": self.macs_before,
            "macs_after": macs,
            "remaining": self.remaining(),
            "steps": len(self.rows),
            "finetunes": self.finetunes,
            "time_total_s": self.timer.total(*COST_PHASES),
            "time_prune_s": t.get("prune", 0.0),
            "time_finetune_s": t.get("finetune", 0.0),
            "time_eval_s": t.get("eval", 0.0),
            "time_freeze_analysis_s": t.get("freeze_analysis", 0.0),
            "time_report_s": t.get("report", 0.0),
            **extra,
        }
