"""Optuna studies for icep: storages, samplers and pruners built from config nodes, trials that
report after each pruning step, and the trial table both the in-run tuning stage and the Hydra
sweeper write.

Storage strings (``tune.storage``, ``hydra.sweeper.storage``):

- a SQLAlchemy URL: ``sqlite:///path/study.db``, ``postgresql://user:pw@host/db``, ...;
- ``journal:PATH`` (or ``journal:///abs/path``): Optuna's journal file, for a shared filesystem
  where SQLite's locking is not safe (NFS);
- a plain file path: a SQLite file there.
"""

from __future__ import annotations

import csv
import functools
import inspect
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from icep.errors import ConfigError
from icep.files import atomic_open
from icep.tune.space import SearchSpace

log = logging.getLogger(__name__)

REASON = "reason"  # user attribute holding why a trial failed or was pruned
# User attribute of a trial a signal or a kill stopped: not a failure of its parameters
INTERRUPTED = "interrupted"
RUN_FOLDER = "run_folder"  # user attribute: the folder of the trial's run (metrics, summary)
# Summary entries every trial carries as user attributes (optuna-dashboard shows them per trial).
SUMMARY_ATTRS = (
    "status",
    "acc_final_val",
    "acc_final_test",
    "acc_drop_val",
    "acc_drop_test",
    "finetunes",
    "steps",
    "time_total_s",
    "flops_total",
    "params_ratio",
    "macs_ratio",
)


def storage_url(storage: str | Path | None, default: Path) -> str:
    """The storage string to use: ``storage`` as given, or a SQLite file at ``default``. Plain
    paths become absolute ``sqlite:///`` URLs so jobs started elsewhere open the same file."""
    if storage is None or str(storage).strip() == "":
        return f"sqlite:///{Path(default).resolve()}"
    text = str(storage)
    if text.startswith("journal:"):
        path = text[len("journal:") :]
        path = path[2:] if path.startswith("//") else path
        return f"journal:{Path(path).resolve()}"
    if "://" not in text:
        return f"sqlite:///{Path(text).resolve()}"
    return text


def open_storage(url: str, key: str = "tune.storage") -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url`` (see :func:`storage_url`); bad URLs raise a ConfigError."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # SQLAlchemy's errors for unknown dialects, missing drivers, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "DatabaseError" in first or "not a database" in first:  # a damaged SQLite file
            raise ConfigError(
                key,
                f"{url[len('sqlite:///') :] or url} is not a readable study database ({first}); "
                "it is damaged: delete it (or move it away) to start the search again",
            ) from None
        raise ConfigError(
            key,
            f"cannot open {url!r} ({first}); use a SQLAlchemy URL such as sqlite:///study.db or "
            "postgresql://user@host/db, or journal:PATH for a journal file",
        ) from None


def build_sampler(
    spec: Any, space: SearchSpace, key: str = "tune.sampler", seed: int | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler a ``_target_`` node builds: any Optuna sampler and its arguments (the options
    of ``tune/sampler=...`` and ``hydra/sweeper/sampler=...``). A ``_partial_`` node is finished
    with what only the search knows: the grid of ``space`` when the sampler takes a
    ``search_space`` (GridSampler). ``seed`` replaces the node's own seed, when it has one."""
    node = _node(spec, key, "sampler")
    if seed is not None and "seed" in node:
        node["seed"] = seed
    built = _build(node, key)
    if isinstance(built, functools.partial):
        missing = inspect.signature(built.func).parameters.keys() - built.keywords.keys()
        finish = {"search_space": space.grid()} if "search_space" in missing else {}
        try:
            built = built(**finish)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, f"cannot build {node['_target_']}: {exc}") from None
    if not isinstance(built, optuna.samplers.BaseSampler):
        raise ConfigError(key, f"{node['_target_']} is not an Optuna sampler")
    return built


def build_pruner(spec: Any, key: str = "tune.pruner") -> optuna.pruners.BasePruner:
    """The pruner a ``_target_`` node builds: any Optuna pruner and its arguments (the options of
    ``tune/pruner=...`` and ``hydra/sweeper/pruner=...``; ``none`` is Optuna's NopPruner)."""
    node = _node(spec, key, "pruner")
    built = _build(node, key)
    if not isinstance(built, optuna.pruners.BasePruner):
        raise ConfigError(key, f"{node['_target_']} is not an Optuna pruner")
    return built


def _node(spec: Any, key: str, what: str) -> dict[str, Any]:
    """``spec`` as a plain dict with ``_target_``; anything else (a name given as
    ``tune.sampler=tpe`` instead of ``tune/sampler=tpe``) is a ConfigError naming the config
    group's options."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping) and "_target_" in spec:
        return dict(spec)
    group = key.replace(".", "/")
    options = group_options(group)
    raise ConfigError(
        key,
        f"got {spec!r}, not a {what} node with _target_; choose one with {group}=NAME"
        + (f": {', '.join(options)}" if options else ""),
    )


def _build(node: dict[str, Any], key: str) -> Any:
    """:func:`icep.config.build` of ``node``, its errors naming ``key``."""
    from icep.config import build

    holder = OmegaConf.create()
    OmegaConf.update(holder, key, node, force_add=True)
    return build(holder, key)


def group_options(group: str) -> list[str]:
    """The options of a config group (``tune/sampler``), as Hydra lists them; none outside a Hydra
    app or ``hydra.initialize``."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return []
    return GlobalHydra.instance().config_loader().get_group_options(group)


def _current_only(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` with only its latest intermediate value."""
    step = trial.last_step
    return FrozenTrial(
        number=trial.number,
        state=trial.state,
        value=None,
        datetime_start=trial.datetime_start,
        datetime_complete=trial.datetime_complete,
        params=trial.params,
        distributions=trial.distributions,
        user_attrs=trial.user_attrs,
        system_attrs=trial.system_attrs,
        intermediate_values={} if step is None else {step: trial.intermediate_values[step]},
        trial_id=trial._trial_id,
    )


class CurrentMedianPruner(optuna.pruners.MedianPruner):
    """Optuna's MedianPruner judging a trial by its current value, not its best so far.

    Optuna's percentile pruners compare a trial's best intermediate value with the other trials'
    values at the same step, which suits training curves that improve. An accuracy drop grows as
    pruning goes on, so its best value is its first one and a hopeless trial would never be
    stopped; the current drop is what says whether it is falling behind.
    """

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return super().prune(study, _current_only(trial))


class CurrentPercentilePruner(optuna.pruners.PercentilePruner):
    """Optuna's PercentilePruner judging a trial by its current value (see CurrentMedianPruner)."""

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return super().prune(study, _current_only(trial))


def pruner_enabled(pruner: optuna.pruners.BasePruner) -> bool:
    return not isinstance(pruner, optuna.pruners.NopPruner)


def check_pruner(pruner: optuna.pruners.BasePruner, n_objectives: int, key: str) -> None:
    """Optuna's pruners judge one objective; with two, a pruner is a configuration mistake."""
    if pruner_enabled(pruner) and n_objectives > 1:
        raise ConfigError(
            key,
            f"Optuna's pruners work on one objective and this study has {n_objectives}; "
            f"set {key.replace('.', '/')}=none or use a single objective",
        )


def load_or_create_study(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    directions: Sequence[str],
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    key: str = "tune",
    metric_names: Sequence[str] | None = None,
) -> optuna.Study:
    """The study ``study_name`` in ``storage``, created when absent, its objectives named
    ``metric_names`` (optuna-dashboard and Optuna's plots show these, not "Objective 0"). An
    existing study must have the same directions: a different objective cannot continue it."""
    study = optuna.create_study(
        storage=storage,
        study_name=study_name,
        directions=list(directions),
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    have = [d.name.lower() for d in study.directions]
    if have != [str(d).lower() for d in directions]:
        raise ConfigError(
            f"{key}.study_name",
            f"study {study_name!r} in this storage optimises {have}, not {list(directions)}; "
            "pick another study_name or storage",
        )
    if metric_names is not None and study.metric_names != list(metric_names):
        with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
    return study


def record_run(trial: optuna.Trial, folder: Path | str | None, summary: Any = None) -> None:
    """The trial's run folder and the :data:`SUMMARY_ATTRS` of its summary as user attributes."""
    if folder is not None:
        trial.set_user_attr(RUN_FOLDER, str(folder))
    if isinstance(summary, Mapping):
        for key in SUMMARY_ATTRS:
            value = summary.get(key)
            if isinstance(value, (int, float, str, bool)) and not (
                isinstance(value, float) and not math.isfinite(value)
            ):
                trial.set_user_attr(key, value)


def check_decision_samples(samples: int, thre: float | None, where: str) -> str | None:
    """A warning when one sample of the ``samples`` a trigger decides on moves accuracy by more
    than ``thre`` points: every drop is then a multiple of 100/samples and the trigger, and a
    search over thre, cannot tell the points apart."""
    if thre is None or thre <= 0 or samples <= 0 or 100.0 / samples <= thre:
        return None  # (thre <= 0: every step fine-tunes, whatever the samples)
    need = math.ceil(100.0 / thre)
    return (
        f"{where} decides on {samples} samples: one sample is {100.0 / samples:.3g} accuracy "
        f"points, more than thre={thre:g}, so every trial sees the same drops and the choice is "
        f"arbitrary; it needs at least {need} samples"
    )


def finished(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward ``n_trials``: finished, and not stopped by a signal or a
    kill (those run again: :func:`retry_interrupted`)."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED)
    ]


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed search as FAIL, with the reason; returns how many.
    Only for a study that one process owns (the in-run tuning stage)."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in stale:
        trial = optuna.trial.Trial(study, frozen._trial_id)
        trial.set_user_attr(REASON, "interrupted: the search was stopped while it ran")
        trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    return len(stale)


def failures(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that failed on their own: FAIL, but not stopped by a signal or a kill."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return [t for t in failed if not t.user_attrs.get(INTERRUPTED)]


def retry_interrupted(study: optuna.Study) -> int:
    """Queue again the parameters of every interrupted trial not queued yet, so a continued
    search runs the point it was running (as the uninterrupted one did) before drawing new
    ones; returns how many."""
    retried = set(study.user_attrs.get("retried", []))
    again = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get(INTERRUPTED) and t.number not in retried and t.params
    ]
    for t in again:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    if again:
        study.set_user_attr("retried", sorted(retried | {t.number for t in again}))
    return len(again)


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    state: TrialState,
    values: Sequence[float] | None = None,
    reason: str | None = None,
) -> FrozenTrial:
    """Finish ``trial`` as ``state`` (with ``values`` when COMPLETE, ``reason`` otherwise) and
    return its record."""
    if reason is not None:
        trial.set_user_attr(REASON, reason)
    try:
        study.tell(trial, values, state=state, skip_if_finished=True)
    except RuntimeError as exc:
        # GridSampler calls study.stop() once the grid is covered, which Optuna only allows inside
        # study.optimize(); the trial's state is stored before that.
        if "Study.stop" not in str(exc):
            raise
    return study._storage.get_trial(trial._trial_id)


def attach_trial(storage_url: str, study_name: str, number: int) -> optuna.Trial:
    """The running trial ``number`` of a study, rebuilt from its storage inside a sweep job so the
    job can ``report()`` and ask ``should_prune()``. The sweeper stores its pruner's node on the
    study (``icep_pruner``), since storages do not keep pruners."""
    storage = open_storage(storage_url, key="optuna.storage")
    study_id = storage.get_study_id_from_name(study_name)
    spec = storage.get_study_user_attrs(study_id).get("icep_pruner")
    pruner = (
        optuna.pruners.NopPruner() if spec is None else build_pruner(spec, "hydra.sweeper.pruner")
    )
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=pruner)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    return optuna.trial.Trial(study, trial_id)


class StepReporter:
    """A :class:`~icep.pipelines.PruningRun` step hook: report the accuracy drop so far (points,
    on the decision split) after each step, and stop the trial when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.enabled = len(trial.study.directions) == 1  # Optuna cannot report multi-objective

    def __call__(self, run: Any, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        drop = run.acc_original - run.acc_now
        self.trial.report(drop, row["step"])
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {row['step']}: drop {drop:.2f} points")


def for_every_rank(reporter: StepReporter | None) -> Any:
    """``reporter`` as a step hook for every rank of a data-parallel run (:mod:`icep.distributed`):
    rank 0's reporter (None elsewhere, or when it has none) reports to its trial, and when the
    pruner stops the trial every rank stops it. On one process: the reporter itself, or None."""
    from icep import distributed

    if not distributed.active():
        return reporter

    def verdict(run: Any, row: Mapping[str, Any]) -> str | None:
        if reporter is None:
            return None
        try:
            reporter(run, row)
        except optuna.TrialPruned as exc:
            return str(exc)
        return None

    def hook(run: Any, row: Mapping[str, Any]) -> None:
        reason = distributed.from_main(lambda: verdict(run, row))
        if reason is not None:
            raise optuna.TrialPruned(reason)

    return hook


# --- reporting ------------------------------------------------------------------------------


def format_params(params: Mapping[str, Any]) -> str:
    """``name=value, ...`` with floats to four significant digits."""
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def log_trial(trial: FrozenTrial, done: int, n_trials: int, prefix: str) -> None:
    """One progress line per finished trial: its parameters and values, or why it stopped."""
    if trial.state == TrialState.COMPLETE:
        outcome = "values " + ", ".join(f"{v:.4g}" for v in trial.values)
    else:
        outcome = f"{trial.state.name}: {trial.user_attrs.get(REASON, '')}"
    seconds = trial.duration.total_seconds() if trial.duration is not None else 0.0
    log.info(
        "%s: trial %d (%d/%d finished, %.1fs) %s -> %s",
        prefix,
        trial.number,
        done,
        n_trials,
        seconds,
        format_params(trial.params),
        outcome,
    )


# --- the trial table ------------------------------------------------------------------------


def trial_rows(trials: Sequence[FrozenTrial], objectives: Sequence[str]) -> list[dict[str, Any]]:
    """One row per trial: number, state, one column per objective, duration, the last step it
    reported, why it failed or was pruned, and its parameters."""
    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        values = t.values if t.values is not None else [None] * len(objectives)
        if t.state == TrialState.PRUNED and t.values is None and t.intermediate_values:
            values = [t.intermediate_values[max(t.intermediate_values)]] + [None] * (
                len(objectives) - 1
            )
        duration = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                **dict(zip(objectives, values, strict=False)),
                "duration_s": duration,
                "last_step": max(t.intermediate_values) if t.intermediate_values else None,
                "reason": t.user_attrs.get(REASON, ""),
                "params": dict(t.params),
            }
        )
    return rows


def write_trials_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``rows`` as CSV, parameters flattened to ``params.NAME`` columns; written atomically."""
    names: list[str] = []
    for row in rows:
        names += [n for n in row["params"] if n not in names]
    columns = [c for c in (rows[0] if rows else {"number": 0}) if c != "params"]
    columns += [f"params.{n}" for n in names]
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            flat = {k: _cell(v) for k, v in row.items() if k != "params"}
            flat.update({f"params.{k}": _cell(v) for k, v in row["params"].items()})
            writer.writerow(flat)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return "" if value is None else value


def count_states(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = {s.name.lower(): 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    counts[INTERRUPTED] = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED):
            counts[INTERRUPTED] += 1  # stopped by a signal or a kill, not a failure
        elif t.state.is_finished():
            counts[t.state.name.lower()] += 1
    return counts


def quiet_optuna() -> None:
    """icep logs each trial itself; Optuna's own per-trial INFO lines would repeat them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
