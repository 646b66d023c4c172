"""The sweep itself: build the study, then ask a batch of trials, launch them as Hydra jobs through
the configured launcher, tell Optuna each job's outcome, write the results, until the study holds
``n_trials`` finished trials.

Each job receives its trial as ``optuna.storage``, ``optuna.study_name`` and ``optuna.trial``, so
it can report after each pruning step and stop when the pruner says so
(:func:`icep.tune.study.attach_trial`). A job that stopped that way is recorded PRUNED; any other
exception FAIL, with the reason; neither stops the sweep unless failures pass
``max_failure_rate``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from icep.errors import ConfigError, IcepError
from icep.files import atomic_open
from icep.loggers import write_json
from icep.tune.search import one_line
from icep.tune.select import TrialResult, pareto_front, select_trial
from icep.tune.space import SearchSpace, parse_distribution
from icep.tune.study import (
    INTERRUPTED,
    REASON,
    build_pruner,
    build_sampler,
    check_pruner,
    count_states,
    finished,
    format_params,
    load_or_create_study,
    log_trial,
    open_storage,
    quiet_optuna,
    record_run,
    retry_interrupted,
    storage_url,
    tell,
    trial_rows,
    write_trials_csv,
)

log = logging.getLogger(__name__)

KEY = "hydra.sweeper"
PRUNER_ATTR = "icep_pruner"  # the study user attribute attach_trial builds the jobs' pruner from
DIRECTIONS = ("minimize", "maximize")
_PARSER = OverridesParser.create()


class IcepOptunaSweeperImpl:
    def __init__(
        self,
        sampler: Any,
        seed: Any,
        direction: Any,
        objectives: Any,
        params: Any,
        n_trials: int,
        n_jobs: int,
        pruner: Any,
        storage: Any,
        study_name: Any,
        max_failure_rate: float,
        tolerance: float,
    ) -> None:
        self.sampler = _plain(sampler)
        self.seed = seed
        self.direction = _plain(direction)
        self.objectives = _plain(objectives)
        self.params = _plain(params) or {}
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.pruner = _plain(pruner)
        self.storage = storage
        self.study_name = study_name
        self.max_failure_rate = max_failure_rate
        self.tolerance = tolerance

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    # --- the settings, checked before anything is created -------------------------------------

    def _directions(self) -> list[str]:
        given = self.direction if isinstance(self.direction, list) else [self.direction]
        directions = [str(d).lower() for d in given]
        if not directions or any(d not in DIRECTIONS for d in directions):
            raise ConfigError(
                f"{KEY}.direction",
                f"got {self.direction!r}; use minimize or maximize, or a list of them",
            )
        return directions

    def _objectives(self, n: int) -> list[str]:
        names = self.objectives if isinstance(self.objectives, list) else [self.objectives]
        names = [str(o) for o in names]
        if len(names) != n or len(set(names)) != n:
            raise ConfigError(
                f"{KEY}.objectives",
                f"got {names} for {n} direction(s); give one distinct summary key per direction "
                "(e.g. [acc_drop_val, time_total_s] with direction [minimize, minimize])",
            )
        return names

    def _numbers(self) -> tuple[int, int, float, float]:
        n_trials, n_jobs = self.n_trials, self.n_jobs
        if not isinstance(n_trials, int) or n_trials < 1:
            raise ConfigError(f"{KEY}.n_trials", f"got {n_trials!r}; must be an integer >= 1")
        if not isinstance(n_jobs, int) or n_jobs < 1:
            raise ConfigError(f"{KEY}.n_jobs", f"got {n_jobs!r}; must be an integer >= 1")
        rate = self.max_failure_rate
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ConfigError(f"{KEY}.max_failure_rate", f"got {rate!r}; must be in [0, 1]")
        if not isinstance(self.tolerance, (int, float)) or self.tolerance < 0:
            raise ConfigError(f"{KEY}.tolerance", f"got {self.tolerance!r}; must be >= 0 points")
        return n_trials, n_jobs, float(rate), float(self.tolerance)

    def _search_space(self, arguments: Sequence[str]) -> tuple[SearchSpace, list[str], dict]:
        """The searched parameters, the fixed overrides every job gets, and for each searched
        parameter the left-hand side of its override (``pipeline.fr``, ``+extra``). Entries of
        ``params`` come first; a command-line argument for the same key replaces its entry."""
        entries: dict[str, tuple[str, Any]] = {}  # name -> (lhs, distribution or fixed override)
        if not isinstance(self.params, dict):
            raise ConfigError(f"{KEY}.params", f"got {self.params!r}; must be a mapping key: expr")
        for key, value in _flatten(self.params).items():
            lhs, name = str(key), str(key).lstrip("+~")
            if not isinstance(value, str):
                entries[name] = (lhs, f"{lhs}={format_value(value)}")
                continue
            try:
                override = _PARSER.parse_override(f"{lhs}={value}")
            except HydraException:
                override = None  # parse_distribution says what is wrong
            if override is not None and not override.is_sweep_override():
                entries[name] = (lhs, f"{lhs}={value}")
                continue
            entries[name] = (lhs, parse_distribution(name, value, key=f"{KEY}.params.{name}"))
        for argument in arguments:
            override = _PARSER.parse_override(argument)  # Hydra has parsed these already
            lhs = override.get_key_element()
            name = lhs.lstrip("+~")
            if override.is_sweep_override():
                entries[name] = (lhs, parse_distribution(name, argument.split("=", 1)[1]))
            else:
                entries[name] = (lhs, argument)
        space = SearchSpace({})
        fixed, sides = [], {}
        for name, (lhs, entry) in entries.items():
            if isinstance(entry, BaseDistribution):
                space.distributions[name] = entry
                sides[name] = lhs
            else:
                fixed.append(entry)
        if not space.distributions:
            raise ConfigError(
                f"{KEY}.params",
                "nothing to search; give hydra.sweeper.params (key: interval(a,b), choice(...), "
                "...) or sweep arguments such as pipeline.fr=interval(0.3,0.9)",
            )
        return space, fixed, sides

    # --- the sweep ------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> list[FrozenTrial]:
        quiet_optuna()
        directions = self._directions()
        objectives = self._objectives(len(directions))
        n_trials, n_jobs, max_failure_rate, tolerance = self._numbers()
        space, fixed, sides = self._search_space(arguments)
        pruner = build_pruner(self.pruner, key=f"{KEY}.pruner")
        check_pruner(pruner, len(directions), f"{KEY}.pruner")
        seed = self.seed  # the samplers' nodes read it (seed: ${..seed})
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError(f"{KEY}.seed", f"got {seed!r}; must be an integer or null")
        sampler = build_sampler(self.sampler, space, key=f"{KEY}.sampler")
        if isinstance(sampler, optuna.samplers.GridSampler) and n_trials > space.grid_size():
            log.info(
                "icep_optuna: the grid has %d points; n_trials %d", space.grid_size(), n_trials
            )
            n_trials = space.grid_size()
        study_name = str(self.study_name or "icep")

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = storage_url(self.storage, sweep_dir / "optuna.db")
        study = load_or_create_study(
            open_storage(url, key=f"{KEY}.storage"),
            study_name,
            directions,
            sampler,
            pruner,
            key=KEY,
            metric_names=objectives,  # the summary keys the jobs return
        )
        existing = len(study.get_trials(deepcopy=False))
        sampler_seed = self.sampler.get("seed")
        if existing and isinstance(sampler_seed, int) and not isinstance(sampler_seed, bool):
            # A reseeded sampler would repeat the draws of the sweep that made these trials.
            reseeded = sampler_seed + existing
            study.sampler = build_sampler(self.sampler, space, f"{KEY}.sampler", seed=reseeded)
        if study.user_attrs.get(PRUNER_ATTR, self.pruner) != self.pruner:
            log.warning(
                "icep_optuna: study %r had pruner %s; its jobs now use %s",
                study_name,
                study.user_attrs.get(PRUNER_ATTR),
                self.pruner,
            )
        study.set_user_attr(PRUNER_ATTR, self.pruner)  # the node, which the jobs build

        retried = retry_interrupted(study)  # a stopped sweep's points run first, as before
        sampler_name = type(sampler).__name__
        results = _Results(
            sweep_dir, study, url, objectives, directions, sampler_name, n_trials, tolerance
        )
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        log.info(
            "icep_optuna: study %r in %s: %d of %d trials finished%s; sampler %s, %s %s, pruner %s",
            study_name,
            mask_password(url),
            len(finished(study)),
            n_trials,
            f" ({len(running)} still running elsewhere or interrupted, not counted)"
            if running
            else "",
            sampler_name,
            "/".join(directions),
            ", ".join(objectives),
            type(pruner).__name__,
        )
        if retried:
            log.info("icep_optuna: %d interrupted trials run again first", retried)
        log.info(
            "icep_optuna: searching %s%s",
            ", ".join(f"{n}: {_describe(d)}" for n, d in space.distributions.items()),
            f"; fixed: {' '.join(fixed)}" if fixed else "",
        )

        failed: list[FrozenTrial] = []
        while (todo := n_trials - len(finished(study))) > 0:
            batch = [
                study.ask(fixed_distributions=space.distributions) for _ in range(min(n_jobs, todo))
            ]
            overrides = [
                [
                    *fixed,
                    *(f"{sides[n]}={format_value(v)}" for n, v in trial.params.items()),
                    f"++optuna.storage={quote(url)}",
                    f"++optuna.study_name={quote(study_name)}",
                    f"++optuna.trial={trial.number}",
                ]
                for trial in batch
            ]
            started = time.perf_counter()
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
            except BaseException as exc:
                # The batch's trials would stay RUNNING for ever; a config the jobs cannot be
                # composed from (HydraException) or an interrupt ends the sweep. Interrupted
                # trials (SIGTERM, Ctrl-C) are no failures: a rerun runs their points again.
                stopped = isinstance(exc, KeyboardInterrupt)
                for trial in batch:
                    if stopped:
                        trial.set_user_attr(INTERRUPTED, True)
                    reason = f"interrupted ({exc})" if stopped else f"launch: {one_line(exc)}"
                    frozen = tell(study, trial, TrialState.FAIL, reason=reason)
                    if not stopped:
                        failed.append(frozen)
                    log_trial(frozen, len(finished(study)), n_trials, prefix="icep_optuna")
                results.write()
                if isinstance(exc, (HydraException, IcepError)) or not isinstance(exc, Exception):
                    raise
                log.debug("launching trials %s failed", [t.number for t in batch], exc_info=True)
            else:
                for trial, ret in zip(batch, returns, strict=True):
                    frozen = self._tell_return(study, trial, ret, objectives)
                    if frozen.state == TrialState.FAIL:
                        failed.append(frozen)
                    log_trial(frozen, len(finished(study)), n_trials, prefix="icep_optuna")
                results.write()
            log.debug("batch of %d took %.1fs", len(batch), time.perf_counter() - started)
            if len(failed) > max_failure_rate * n_trials:
                first = failed[0]
                raise IcepError(
                    f"{KEY}: sweep stopped, {len(failed)} of the trials it ran failed, more than "
                    f"max_failure_rate={max_failure_rate} x n_trials={n_trials}; first failure, "
                    f"trial {first.number}: {first.user_attrs.get(REASON, 'no reason recorded')} "
                    f"(all trials: {results.csv})"
                )
        summary = results.write()
        log.info("icep_optuna: %s", summary)
        return study.get_trials(deepcopy=False)

    def _tell_return(
        self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, objectives: list[str]
    ) -> FrozenTrial:
        completed = ret.status == JobStatus.COMPLETED
        # the job's run folder (ret.working_dir is the launch folder when jobs do not chdir)
        folder = (
            OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg else None
        )
        record_run(trial, folder, ret.return_value if completed else None)
        if completed:
            flops = (
                ret.return_value.get("flops_total")
                if isinstance(ret.return_value, Mapping)
                else None
            )
            if isinstance(flops, int):
                trial.set_user_attr("flops", flops)  # the job's counted work (icep.compute)
            try:
                values = objective_values(ret.return_value, objectives)
            except ValueError as exc:
                return tell(study, trial, TrialState.FAIL, reason=str(exc))
            return tell(study, trial, TrialState.COMPLETE, values=values)
        exc = ret._return_value  # not .return_value: that re-raises the job's exception
        if _is_pruned(exc):
            return tell(study, trial, TrialState.PRUNED, reason=str(exc) or "stopped by the pruner")
        reason = one_line(exc) if isinstance(exc, BaseException) else f"job status {ret.status}"
        return tell(study, trial, TrialState.FAIL, reason=reason)


# --- helpers ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{pipeline: {thre: ...}}`` (what ``hydra.sweeper.params.pipeline.thre=...`` makes on the
    command line) as ``{pipeline.thre: ...}``, the form a YAML file writes."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_pruned(exc: Any) -> bool:
    """Also by name: an exception that came back from another process (submitit) may be a copy
    of a class from another import of Optuna."""
    return isinstance(exc, optuna.TrialPruned) or type(exc).__name__ == "TrialPruned"


def objective_values(returned: Any, objectives: Sequence[str]) -> list[float]:
    """The objective values in what a job returned: the summary keys ``objectives`` of a mapping
    (icep's run summary), or a number or list of numbers as is. ValueError says what is wrong."""
    if isinstance(returned, Mapping):
        values = []
        for name in objectives:
            value = _lookup(returned, name)
            if value is None:
                raise ValueError(
                    f"the job's summary has no {name!r} (hydra.sweeper.objectives); keys: "
                    f"{', '.join(map(str, returned))}"
                )
            values.append(value)
    elif isinstance(returned, (int, float)) and not isinstance(returned, bool):
        values = [returned]
    elif isinstance(returned, (list, tuple, ListConfig)):
        values = list(returned)
    else:
        raise ValueError(
            f"the job returned {type(returned).__name__}; a sweep needs a mapping with the "
            "objectives' keys, a number or a list of numbers"
        )
    if len(values) != len(objectives):
        raise ValueError(f"the job returned {len(values)} values for {len(objectives)} objectives")
    out = []
    for name, value in zip(objectives, values, strict=True):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"objective {name} is {value!r}, not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"objective {name} is {number}")
        out.append(number)
    return out


def _lookup(mapping: Mapping, key: str) -> Any:
    if key in mapping:
        return mapping[key]
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _describe(dist: BaseDistribution) -> str:
    if hasattr(dist, "choices"):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    low, high = dist.low, dist.high  # type: ignore[attr-defined]
    return f"[{low}, {high}]" + (" log" if getattr(dist, "log", False) else "")


def quote(text: str) -> str:
    """``text`` as a quoted string of Hydra's override grammar: ``\\'`` is a quote, and a run of
    backslashes is literal except before a quote, where it is doubled."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'") + "'"


def format_value(value: Any) -> str:
    """``value`` written so that Hydra's override parser reads back the same value and type:
    floats in their shortest exact form, ``true``/``false``/``null``, strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"{KEY}.params", f"cannot write {value!r} as an override value")


def mask_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


class _Results:
    """``optimization_results.yaml`` (hydra-optuna-sweeper's file), ``tune_trials.csv`` and
    ``tune_result.json`` in the sweep folder, rewritten after every batch."""

    def __init__(
        self,
        folder: Path,
        study: optuna.Study,
        url: str,
        objectives: list[str],
        directions: list[str],
        sampler: str,  # the sampler's class name
        n_trials: int,
        tolerance: float,
    ):
        self.folder, self.study, self.url = folder, study, url
        self.objectives, self.directions = objectives, directions
        self.sampler, self.n_trials, self.tolerance = sampler, n_trials, tolerance
        self.csv = folder / "tune_trials.csv"
        self.drop_time = drop_and_time(objectives, directions)

    def write(self) -> str:
        """Write the three files; returns a one-line summary."""
        trials = self.study.get_trials(deepcopy=False)
        rows = trial_rows(trials, self.objectives)
        write_trials_csv(self.csv, rows)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = count_states(trials)
        yaml: dict[str, Any] = {"name": "icep_optuna", "study_name": self.study.study_name}
        result: dict[str, Any] = {
            "sweeper": "icep_optuna",
            "sampler": self.sampler,
            "objectives": self.objectives,
            "directions": self.directions,
            "study_name": self.study.study_name,
            "storage": mask_password(self.url),
            "n_trials": self.n_trials,
            **counts,
            "search_seconds": sum(r["duration_s"] or 0.0 for r in rows),
            # Counted work of the completed jobs (a failed or pruned job reports none).
            "search_flops": sum(t.user_attrs.get("flops", 0) for t in trials),
        }
        line = f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed"
        if len(self.directions) == 1:
            best = self.study.best_trial if complete else None
            yaml["best_params"] = dict(best.params) if best else None
            yaml["best_value"] = best.value if best else None
            result["best"] = _point(best) if best else None
            if best:
                line += (
                    f"; best trial {best.number}: {format_params(best.params)} -> {best.value:.4g}"
                )
        else:
            best_trials = self.study.best_trials if complete else []
            yaml["best_trials"] = [_point(t) for t in best_trials]
            result["best_trials"] = yaml["best_trials"]
            line += f"; {len(best_trials)} trial(s) on the Pareto front"
        if self.drop_time is not None:
            i_drop, i_time = self.drop_time
            points = [
                TrialResult(t.number, t.values[i_drop], t.values[i_time], dict(t.params))
                for t in complete
            ]
            chosen = select_trial(points, self.tolerance) if points else None
            result["tolerance"] = self.tolerance
            result["chosen"] = dataclasses.asdict(chosen) if chosen else None
            result["params"] = dict(chosen.params) if chosen else None
            result["pareto_front"] = [dataclasses.asdict(t) for t in pareto_front(points)]
            yaml["selected"] = result["chosen"]
            if chosen:
                line += (
                    f"; selected trial {chosen.number} (fastest within {self.tolerance} points "
                    f"of the best drop): {format_params(chosen.params)} -> drop {chosen.drop:.4g}, "
                    f"{chosen.seconds:.4g}s"
                )
        result["trials"] = rows
        with atomic_open(self.folder / "optimization_results.yaml", "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(yaml)))
        write_json(self.folder / "tune_result.json", result)
        return line + f" ({self.folder})"


def drop_and_time(objectives: Sequence[str], directions: Sequence[str]) -> tuple[int, int] | None:
    """Where the drop and the time are, when the objectives are exactly a drop and a time, both
    minimised (e.g. [acc_drop_val, time_total_s]): those get a Pareto front and a selection."""
    if len(objectives) != 2 or any(d != "minimize" for d in directions):
        return None
    drops = [i for i, o in enumerate(objectives) if "drop" in o]
    times = [i for i, o in enumerate(objectives) if "time" in o or o.endswith("seconds")]
    if len(drops) == 1 and len(times) == 1 and drops != times:
        return drops[0], times[0]
    return None


def _point(trial: FrozenTrial) -> dict[str, Any]:
    return {"number": trial.number, "params": dict(trial.params), "values": list(trial.values)}
