"""How a pipeline fine-tunes after a prune (``pipeline/finetune=fixed|patience``,
conf/pipeline/finetune/). A policy is built from its config node by ``hydra.utils.instantiate``
and called with the run; it trains the run's model, leaves the run's accuracy measured on the
weights it ends with and returns the epochs it ran. The run counts it as one fine-tune."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from icep.train import Distillation

if TYPE_CHECKING:
    from icep.pipelines.base import PruningRun

log = logging.getLogger(__name__)

# A `_partial_` optimizer node: called with the parameters to train and the step's lr.
OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(kw_only=True)
class Training:
    """How a pipeline trains: the constant lr (ICE passes its own), the optimizer and the
    distillation settings (the teacher is the unpruned model). Every fine-tune policy has them,
    and so do AGP and EPI, which train across steps."""

    lr: float
    optimizer: OptimizerFactory
    distill: bool
    distill_temperature: float
    distill_weight: float


@dataclass(kw_only=True)
class FineTune(Training):
    """A fine-tune policy: trains the run's model after a prune."""

    name: str  # the option: fixed | patience

    def __call__(
        self,
        run: PruningRun,
        lr: float | None = None,
        distill: Distillation | None = None,
        desc: str = "fine-tune",
    ) -> int:
        raise NotImplementedError


@dataclass(kw_only=True)
class FixedEpochs(FineTune):
    """``epochs`` epochs with one fresh optimizer, then one evaluation."""

    epochs: int

    def __call__(self, run, lr=None, distill=None, desc="fine-tune"):
        optimizer = run.new_optimizer(self.optimizer, self.lr if lr is None else lr)
        run.fit(optimizer, self.epochs, distill, desc)
        run.evaluate()
        return self.epochs


@dataclass(kw_only=True)
class Patience(FineTune):
    """One optimizer for epoch after epoch, each evaluated on the decision split; stop once
    ``patience`` epochs in a row did not beat the best accuracy by more than ``min_delta`` points,
    or after ``max_epochs``, and put back the weights of the best epoch."""

    patience: int
    min_delta: float
    max_epochs: int

    def __call__(self, run, lr=None, distill=None, desc="fine-tune"):
        optimizer = run.new_optimizer(self.optimizer, self.lr if lr is None else lr)
        best_acc, best_epoch, best_state, epoch = float("-inf"), 0, None, 0
        while epoch < self.max_epochs and epoch - best_epoch < self.patience:
            epoch += 1
            run.fit(optimizer, 1, distill, desc)
            acc = run.evaluate()
            if acc > best_acc + self.min_delta:
                best_acc, best_epoch, best_state = acc, epoch, run.snapshot()
        if best_epoch != epoch:
            run.put_back(best_state, best_acc)
        log.info("%s: %d epochs, best %.2f%% after epoch %d", desc, epoch, best_acc, best_epoch)
        return epoch


@dataclass(kw_only=True)
class Recovery:
    """What a block-wise loop may add around its fine-tunes, as the reference's DenseNet runs
    (ICE and the baseline): more epochs for some units, a final fine-tune after the loop, and
    steps that train and decide on a share of the data (the run builds it from the two
    ``step_*_fraction`` keys, :func:`icep.app.step_data`)."""

    finetune: FineTune  # the pipeline's fine-tune policy
    unit_epochs: Any = None  # {unit name pattern: fine-tune epochs}, e.g. DenseNet's blocks 3-4
    final_finetune_epochs: int = 0  # epochs after the last step, with one optimizer
    final_eval: str = "all"  # all | step: the share the final epochs are evaluated on
    step_train_fraction: float | None = None
    step_eval_fraction: float | None = None

    def policy_for(self, unit: str) -> FineTune:
        """The fine-tune policy of unit ``unit``: ``finetune`` with the epochs of the first
        ``unit_epochs`` pattern that matches its name (fixed-epoch policies only)."""
        for pattern, epochs in (self.unit_epochs or {}).items():
            if fnmatch.fnmatchcase(unit, pattern) and isinstance(self.finetune, FixedEpochs):
                return dataclasses.replace(self.finetune, epochs=int(epochs))
        return self.finetune

    def recover_after_loop(
        self, run: PruningRun, lr: float, distill: Distillation | None
    ) -> dict[str, Any]:
        """Train on all of the data from now on, then ``final_finetune_epochs`` epochs at ``lr``
        with one optimizer (as the reference), evaluating after each; the summary's record."""
        run.use_full_data(evaluate_on_share=self.final_eval == "step")
        if self.final_finetune_epochs <= 0:
            return {}
        before = run.seconds()
        optimizer = run.new_optimizer(self.finetune.optimizer, lr)
        accs = []
        for epoch in range(self.final_finetune_epochs):
            desc = f"recovery fine-tune {epoch + 1}/{self.final_finetune_epochs}"
            run.fit(optimizer, 1, distill, desc)
            accs.append(run.evaluate())
        run.finetunes += 1
        return {
            "epochs": self.final_finetune_epochs,
            "lr": lr,
            "seconds": run.seconds() - before,
            f"{run.decision_split}_accs": accs,
            "best_acc": max(accs),
        }
