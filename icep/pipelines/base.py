"""What every pruning pipeline shares: the model and its pruning engine, the data, timed phases
(prune, fine-tune, evaluate) and the per-step records. A pipeline is a short loop over these."""

from __future__ import annotations

import copy
import logging
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
COST_PHASES = ("prune", "finetune", "eval")


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
        self.acc_original: float | None = None
        self.acc_original_test: float | None = None
        self.finetunes = 0

    @property
    def units(self) -> list[Unit]:
        return self.engine.units

    def start(self) -> float:
        """Measure the unpruned accuracy once (val for decisions, test for the report)."""
        self.acc_original, _ = self.evaluate()
        with self.timer.phase("report"):
            self.acc_original_test = self.trainer.evaluate(self.model, self.data.test, "test")
        log.info(
            "unpruned: val %.2f%%, test %.2f%%, %d units, %.3fM params, %.2fM MACs",
            self.acc_original,
            self.acc_original_test,
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
        """Validation accuracy (percent) and the seconds it took."""
        with self.timer.phase("eval") as t:
            acc = self.trainer.evaluate(self.model, self.data.val, "val")
        return acc, t["seconds"]

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
    ) -> float:
        """``epochs`` epochs with a fresh SGD at a constant ``lr``."""
        with self.timer.phase("finetune") as t:
            optimizer = sgd(self.model, lr, momentum, weight_decay)
            self.trainer.fit(
                self.model, self.data.train, optimizer, epochs, distill=distill, desc=desc
            )
        self.finetunes += 1
        return t["seconds"]

    def record(self, unit: Unit, **fields: Any) -> dict[str, Any]:
        """Append one step's row to metrics.jsonl (and W&B), adding size and cumulative time."""
        macs, params = count_macs_params(self.model, self.example_inputs)
        row = {
            "step": len(self.rows) + 1,
            "unit": unit.name,
            "params": params,
            "macs": macs,
            "remaining": remaining_fraction(self.model, self.original_weights),
            **fields,
            "t_total": self.timer.total(*COST_PHASES),
        }
        self.rows.append(row)
        self.logger.log_step(row)
        log.info(
            "step %d/%d %s: val %.2f%%, %s, remaining %.3f, %.1fs so far",
            row["step"],
            len(self.units),
            unit.name,
            row.get("val_acc", float("nan")),
            "fine-tuned" if row.get("finetuned") else "no fine-tune",
            row["remaining"],
            row["t_total"],
        )
        return row

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Final accuracy (val and test), sizes and time per phase."""
        acc_final, _ = self.evaluate() if not self.rows else (self.rows[-1]["val_acc"], 0.0)
        with self.timer.phase("report"):
            acc_final_test = self.trainer.evaluate(self.model, self.data.test, "test")
        macs, params = count_macs_params(self.model, self.example_inputs)
        t = self.timer.totals
        return {
            "acc_original_val": self.acc_original,
            "acc_final_val": acc_final,
            "acc_original_test": self.acc_original_test,
            "acc_final_test": acc_final_test,
            "params_before": self.params_before,
            "params_after": params,
            "macs_before": self.macs_before,
            "macs_after": macs,
            "remaining": remaining_fraction(self.model, self.original_weights),
            "steps": len(self.rows),
            "finetunes": self.finetunes,
            "time_total_s": self.timer.total(*COST_PHASES),
            "time_prune_s": t.get("prune", 0.0),
            "time_finetune_s": t.get("finetune", 0.0),
            "time_eval_s": t.get("eval", 0.0),
            "time_report_s": t.get("report", 0.0),
            **extra,
        }
