"""The sweeper's config, registered as ``hydra/sweeper=icep_optuna``, with its samplers
(``hydra/sweeper/sampler=tpe|random|grid|nsga2|qmc|gp``) and pruners
(``hydra/sweeper/pruner=median|percentile|hyperband|successive_halving|threshold|none``), as
hydra-optuna-sweeper registers its samplers. Imported by Hydra at startup, so it imports neither
Optuna nor icep."""

# No `from __future__ import annotations`: Hydra executes this module before it is in
# sys.modules, and dataclasses cannot then resolve string annotations.

from dataclasses import dataclass, field
from typing import Any, List, Optional  # noqa: UP035 - OmegaConf 2.3 reads List, not list

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class IcepOptunaSweeperConf:
    _target_: str = "hydra_plugins.icep_optuna_sweeper.icep_optuna_sweeper.IcepOptunaSweeper"
    # Hand the sampler and pruner nodes to the sweeper unbuilt: it builds them when it knows the
    # search space and the seed.
    _recursive_: bool = False
    defaults: List[Any] = field(  # noqa: UP006
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}, "_self_"]
    )

    # hydra/sweeper/sampler=NAME (below), or any Optuna sampler: a node with _target_.
    sampler: Any = MISSING
    # The samplers' seed (null: unseeded). A sweep that continues a study seeds its sampler with
    # its seed + the trials already there, so it does not repeat the draws of the sweep that
    # made them.
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
    # hydra/sweeper/pruner=NAME (below), or any Optuna pruner: a node with _target_. Single
    # objective only.
    pruner: Any = MISSING
    # null: SQLite at <hydra.sweep.dir>/optuna.db; a SQLAlchemy URL; or journal:PATH
    storage: Optional[str] = None  # noqa: UP045
    # The same storage and study_name continue a study: the experiment's name, else "icep".
    study_name: Optional[str] = "${oc.select:name,icep}"  # noqa: UP045
    # The sweep stops once more than max_failure_rate * n_trials of the trials it ran failed.
    max_failure_rate: float = 0.25
    tolerance: float = 0.5  # drop/time objectives: points of drop traded for speed (selection)


SEED = "${..seed}"  # hydra.sweeper.seed

# hydra/sweeper/sampler: Optuna's samplers with their defaults, seeded with hydra.sweeper.seed.
SAMPLER_OPTIONS = {
    "tpe": {"_target_": "optuna.samplers.TPESampler", "seed": SEED},
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": SEED},
    # finished by the sweeper with the grid of the search space
    "grid": {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": SEED},
    "nsga2": {"_target_": "optuna.samplers.NSGAIISampler", "seed": SEED},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": SEED},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": SEED},
}

# hydra/sweeper/pruner: each job reports its accuracy drop (points) after every pruning step.
# icep's median and percentile pruners judge a trial's current drop (icep/tune/study.py).
PRUNER_OPTIONS = {
    # no trial is stopped before five have finished
    "median": {
        "_target_": "icep.tune.study.CurrentMedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 0,
    },
    "percentile": {
        "_target_": "icep.tune.study.CurrentPercentilePruner",
        "percentile": 25.0,  # keep the best quarter
        "n_startup_trials": 5,
        "n_warmup_steps": 0,
    },
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner"},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner"},
    # stops a trial once its drop passes `upper` points
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": None, "upper": 10.0},
    "none": {"_target_": "optuna.pruners.NopPruner"},
}

store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="icep_optuna", node=IcepOptunaSweeperConf, provider="icep")
for name, node in SAMPLER_OPTIONS.items():
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="icep")
for name, node in PRUNER_OPTIONS.items():
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="icep")
