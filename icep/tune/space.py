"""Search spaces in hydra-optuna-sweeper's grammar, as Optuna distributions.

``choice(a, b, ...)`` and ``range(start, stop, step)`` are finite sets; ``interval(a, b)`` a float
range, ``int(interval(a, b))`` an integer one, ``tag(log, interval(a, b))`` a log-scaled one. A
plain value is fixed. So configs written for hydra-optuna-sweeper port over unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Transformer
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from icep.errors import ConfigError

_PARSER = OverridesParser.create()


def parse_distribution(name: str, expression: Any, key: str | None = None) -> BaseDistribution:
    """The Optuna distribution of ``name=expression`` (``expression`` in the sweeper grammar);
    errors name ``key`` (default: ``name``), the config key the expression came from."""
    key = key or name
    try:
        override = _PARSER.parse_override(f"{name}={expression}")
    except HydraException as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            key,
            f"cannot read {expression!r} ({first}); use choice(...), "
            "range(a,b,step), interval(a,b), int(interval(a,b)) or "
            "tag(log, interval(a,b))",
        ) from None
    if not override.is_sweep_override():
        return CategoricalDistribution([override.value()])
    if override.is_interval_sweep():
        sweep = override.value()
        assert isinstance(sweep, IntervalSweep)
        log = "log" in sweep.tags
        if sweep.start >= sweep.end:
            raise ConfigError(
                key, f"{expression}: the interval is empty; write interval(low, high)"
            )
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log)
    choices = list(override.sweep_iterator(transformer=Transformer.encode))
    if not choices:
        raise ConfigError(key, f"{expression}: no values to choose from")
    return CategoricalDistribution(choices)


class SearchSpace:
    """Named distributions, in the order given."""

    def __init__(self, params: Mapping[str, Any], key: str | None = None):
        """``key``: the config node holding ``params``, for error messages."""
        self.key = key
        self.distributions = {
            name: parse_distribution(name, expr, f"{key}.{name}" if key else None)
            for name, expr in params.items()
        }

    def __len__(self) -> int:
        return len(self.distributions)

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter's values for a GridSampler; intervals have none to enumerate."""
        grid = {}
        for name, dist in self.distributions.items():
            if not isinstance(dist, CategoricalDistribution):
                raise ConfigError(
                    f"{self.key}.{name}" if self.key else name,
                    "a grid search needs a finite set here: write choice(...) or range(...)",
                )
            grid[name] = list(dist.choices)
        return grid

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size

    def suggest(self, trial) -> dict[str, Any]:
        """Draw one point from an Optuna trial."""
        point = {}
        for name, dist in self.distributions.items():
            if isinstance(dist, FloatDistribution):
                point[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
            elif isinstance(dist, IntDistribution):
                point[name] = trial.suggest_int(name, dist.low, dist.high, log=dist.log)
            else:
                point[name] = trial.suggest_categorical(name, dist.choices)
        return point
