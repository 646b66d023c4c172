"""The sweeper's config, registered as ``hydra/sweeper=icep_optuna``. Imported by Hydra at
startup, so it imports neither Optuna nor icep."""

# No `from __future__ import annotations`: Hydra executes this module before it is in
# sys.modules, and dataclasses cannot then resolve string annotations.

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class IcepOptunaSweeperConf:
    _target_: str = "hydra_plugins.icep_optuna_sweeper.icep_optuna_sweeper.IcepOptunaSweeper"
    # Hand nested mappings (sampler or pruner with _target_) to the sweeper as specs, unbuilt.
    _recursive_: bool = False

    # tpe | random | grid | nsga2 | qmc | gp, or a mapping with _target_ (any Optuna sampler)
    sampler: Any = "tpe"
    # The sampler's seed (null: unseeded). A sweep that continues a study seeds with seed + the
    # trials already there, so it does not repeat the draws of the sweep that made them.
    seed: Optional[int] = None  # noqa: UP045 - OmegaConf 2.3 reads Optional, not int | None
    # minimize | maximize, or a list of them (one per objective: a multi-objective study)
    direction: Any = "minimize"
    # The summary keys each job's result is read from (the job returns icep's run summary);
    # a job returning a number or a list of numbers is used as is.
    objectives: Any = field(default_factory=lambda: ["acc_drop_val"])
    # key -> expression: interval(a,b), int(interval(a,b)), tag(log, interval(a,b)),
    # range(a,b,step), choice(...), or a fixed value. Sweep arguments on the command line join it.
    params: Any = None
    n_trials: int = 20  # finished trials (complete, pruned or failed) the study should hold
    n_jobs: int = 1  # trials per batch, launched together (parallel with a parallel launcher)
    # median | percentile | hyperband | successive_halving | threshold | none, or a mapping
    # {name: NAME, ...its arguments} or with _target_. Single objective only. A name, not a
    # mapping, by default: Hydra merges a mapping given on the command line into a mapping here.
    # median = MedianPruner(n_startup_trials=5, n_warmup_steps=0): no trial is stopped before five
    # have finished.
    pruner: Any = "median"
    # null: SQLite at <hydra.sweep.dir>/optuna.db; a SQLAlchemy URL; or journal:PATH
    storage: Optional[str] = None  # noqa: UP045
    # The same storage and study_name continue a study: the experiment's name, else "icep".
    study_name: Optional[str] = "${oc.select:name,icep}"  # noqa: UP045
    # The sweep stops once more than max_failure_rate * n_trials of the trials it ran failed.
    max_failure_rate: float = 0.25
    tolerance: float = 0.5  # drop/time objectives: points of drop traded for speed (selection)


ConfigStore.instance().store(
    group="hydra/sweeper", name="icep_optuna", node=IcepOptunaSweeperConf, provider="icep"
)
