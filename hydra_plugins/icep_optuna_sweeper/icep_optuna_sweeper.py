"""The Sweeper plugin class. Hydra imports every plugin module at startup, so this one stays
cheap: Optuna and icep load in :mod:`._impl`, when a sweep starts."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import IcepOptunaSweeperConf  # noqa: F401 - registers hydra/sweeper=icep_optuna


class IcepOptunaSweeper(Sweeper):
    """Ask Optuna for trials, launch them as Hydra jobs, tell Optuna what they returned."""

    def __init__(self, **settings: Any) -> None:
        from ._impl import IcepOptunaSweeperImpl

        self.sweeper = IcepOptunaSweeperImpl(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.sweeper.sweep(arguments)
