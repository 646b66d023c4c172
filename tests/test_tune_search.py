"""The search loop: failed and pruned trials are recorded and the search goes on, too many failures
stop it with one message, and a study in a storage is continued, not restarted."""

from __future__ import annotations

import logging

import optuna
import pytest
from optuna.trial import TrialState

from icep.errors import ConfigError, IcepError
from icep.tune import SearchSpace
from icep.tune.search import run_search
from icep.tune.study import (
    INTERRUPTED,
    REASON,
    StepReporter,
    build_pruner,
    build_sampler,
    check_pruner,
    load_or_create_study,
    open_storage,
    storage_url,
    trial_rows,
    write_trials_csv,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = SearchSpace({"x": "interval(0, 1)"})
RANDOM = {"_target_": "optuna.samplers.RandomSampler", "seed": 0}
GRID = {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": 0}


def _study(tmp_path, name="s", directions=("minimize",), pruner=None):
    storage = open_storage(storage_url(tmp_path / "study.db", tmp_path / "unused.db"))
    sampler = build_sampler(RANDOM, SPACE)
    return load_or_create_study(storage, name, directions, sampler, pruner)


def test_failed_trials_are_recorded_with_their_reason_and_the_search_goes_on(tmp_path):
    study = _study(tmp_path)
    calls = []

    def objective(trial):
        calls.append(trial.number)
        x = SPACE.suggest(trial)["x"]
        if trial.number == 1:
            raise RuntimeError("CUDA out of memory\nmore lines")
        return [x]

    trials = run_search(study, objective, 4, max_failure_rate=0.5)
    assert calls == [0, 1, 2, 3]
    states = [t.state for t in trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    assert trials[1].user_attrs[REASON] == "RuntimeError: CUDA out of memory"


def test_too_many_failures_stop_the_search_with_one_message(tmp_path):
    study = _study(tmp_path)

    def objective(trial):
        SPACE.suggest(trial)
        raise ValueError("loss is NaN")

    with pytest.raises(IcepError) as err:
        run_search(study, objective, 4, max_failure_rate=0.5)
    message = str(err.value)
    assert "\n" not in message
    assert "3 trials failed" in message and "max_failure_rate=0.5" in message
    assert "trial 0: ValueError: loss is NaN" in message
    assert len(study.trials) == 3  # stopped as soon as 3 > 0.5 * 4


def test_pruned_trials_are_pruned_not_failed(tmp_path):
    study = _study(tmp_path)

    def objective(trial):
        SPACE.suggest(trial)
        if trial.number == 0:
            raise optuna.TrialPruned("pruned at step 3: drop 9.00 points")
        return [1.0]

    trials = run_search(study, objective, 2, max_failure_rate=0.0)
    assert trials[0].state == TrialState.PRUNED
    assert trials[0].user_attrs[REASON] == "pruned at step 3: drop 9.00 points"
    assert trials[1].state == TrialState.COMPLETE


def test_a_search_continues_its_study_from_sqlite(tmp_path):
    seen = []

    def objective(trial):
        seen.append(trial.number)
        return [SPACE.suggest(trial)["x"]]

    run_search(_study(tmp_path), objective, 2, max_failure_rate=0.5)
    # A killed process leaves its last trial RUNNING.
    killed = _study(tmp_path)
    killed.ask()
    resumed = _study(tmp_path)  # a new process opening the same storage
    trials = run_search(resumed, objective, 4, max_failure_rate=0.5)
    # n_trials counts finished trials, not the interrupted one: 2 done, so two more run.
    assert seen == [0, 1, 3, 4]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.COMPLETE,
    ]
    assert trials[2].user_attrs[REASON].startswith("interrupted")
    assert trials[2].user_attrs[INTERRUPTED]


def test_an_interrupt_fails_the_running_trial_and_a_rerun_continues(tmp_path):
    calls = []

    def objective(trial):
        calls.append(trial.number)
        x = SPACE.suggest(trial)["x"]
        if trial.number == 1:
            raise KeyboardInterrupt
        return [x]

    with pytest.raises(KeyboardInterrupt):
        run_search(_study(tmp_path), objective, 3, max_failure_rate=0.5)
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert trials[1].user_attrs[REASON].startswith("interrupted")
    # The interrupted trial is no failure and does not count toward n_trials; its point runs
    # again first (trial 2, the same x), then the search goes on.
    calls.clear()
    trials = run_search(_study(tmp_path), objective, 3, max_failure_rate=0.0)
    assert calls == [2, 3]
    assert trials[2].params == trials[1].params and trials[2].user_attrs["retry_of"] == 1
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3


def test_each_finished_trial_is_logged_and_handed_to_on_trial(tmp_path, caplog):
    seen = []

    def objective(trial):
        x = SPACE.suggest(trial)["x"]
        if trial.number == 0:
            raise ValueError("bad point")
        return [x]

    with caplog.at_level(logging.INFO, logger="icep"):
        run_search(_study(tmp_path), objective, 2, max_failure_rate=1.0, on_trial=seen.append)
    assert [(t.number, t.state) for t in seen] == [(0, TrialState.FAIL), (1, TrialState.COMPLETE)]
    assert "tune: trial 0 (1/2 finished" in caplog.text
    assert "FAIL: ValueError: bad point" in caplog.text
    assert "tune: trial 1 (2/2 finished" in caplog.text


def test_a_grid_search_covers_its_grid_and_stops(tmp_path):
    space = SearchSpace({"a": "choice(1, 2)", "b": "choice(x, y)"})
    storage = open_storage(storage_url(tmp_path / "grid.db", tmp_path))
    study = load_or_create_study(storage, "g", ["minimize"], build_sampler(GRID, space))
    trials = run_search(
        study, lambda t: [space.suggest(t)["a"]], space.grid_size(), max_failure_rate=0.0
    )
    assert sorted((t.params["a"], t.params["b"]) for t in trials) == [
        (1, "x"),
        (1, "y"),
        (2, "x"),
        (2, "y"),
    ]


def test_a_study_with_other_objectives_is_not_continued(tmp_path):
    _study(tmp_path, name="s")
    with pytest.raises(ConfigError, match="optimises"):
        _study(tmp_path, name="s", directions=("minimize", "minimize"))


class _Run:
    acc_original = 90.0

    def __init__(self):
        self.acc_now = 90.0


def test_the_step_reporter_stops_a_trial_worse_than_the_median(tmp_path):
    median = {"_target_": "icep.tune.study.CurrentMedianPruner", "n_startup_trials": 1}
    study = _study(tmp_path, pruner=build_pruner(median))
    good = study.ask()
    reporter, run = StepReporter(good), _Run()
    for step, acc in enumerate([89.0, 88.0, 87.0], start=1):
        run.acc_now = acc
        reporter(run, {"step": step})
    study.tell(good, [3.0])
    bad = study.ask()
    reporter = StepReporter(bad)
    run.acc_now = 89.5  # better than the first trial at step 1: goes on
    reporter(run, {"step": 1})
    run.acc_now = 70.0  # 20 points down at step 2, the median is 2: stopped
    with pytest.raises(optuna.TrialPruned, match="step 2: drop 20.00"):
        reporter(run, {"step": 2})
    assert bad.study.trials[-1].intermediate_values == {1: 0.5, 2: 20.0}


def test_samplers_and_pruners_from_target_nodes_and_their_mistakes():
    hyperband = build_pruner({"_target_": "optuna.pruners.HyperbandPruner"})
    assert isinstance(hyperband, optuna.pruners.HyperbandPruner)
    median = {"_target_": "icep.tune.study.CurrentMedianPruner"}
    with pytest.raises(ConfigError, match="tune.pruner: cannot build icep.tune.study.Current"):
        build_pruner({**median, "n_startup": 2})
    with pytest.raises(ConfigError, match="tune.pruner: got 'median', not a pruner node"):
        build_pruner("median")
    with pytest.raises(ConfigError, match="tune.pruner: optuna.samplers.RandomSampler is not an"):
        build_pruner(RANDOM)
    with pytest.raises(ConfigError, match="tune.pruner: Optuna's pruners work on one objective"):
        check_pruner(build_pruner(median), 2, "tune.pruner")
    check_pruner(build_pruner({"_target_": "optuna.pruners.NopPruner"}), 2, "tune.pruner")

    # A _partial_ sampler taking a search_space is finished with the grid of the space.
    grid = build_sampler(GRID, SearchSpace({"a": "choice(1, 2)", "b": "range(0, 3)"}))
    assert isinstance(grid, optuna.samplers.GridSampler)
    with pytest.raises(ConfigError, match="finite set"):
        build_sampler(GRID, SPACE)
    with pytest.raises(ConfigError, match="hydra.sweeper.sampler: got 'cmaes2', not a sampler"):
        build_sampler("cmaes2", SPACE, "hydra.sweeper.sampler")
    with pytest.raises(ConfigError, match="tune.sampler: cannot build optuna.samplers.Random"):
        build_sampler({**RANDOM, "foo": 1}, SPACE)
    # seed replaces the node's seed: the same seed draws the same point
    draws = [
        build_sampler(RANDOM, SPACE, seed=seed).sample_independent(
            optuna.create_study(), None, "x", SPACE.distributions["x"]
        )
        for seed in (0, 1, 0)
    ]
    assert draws[0] == draws[2] != draws[1]


def test_storage_strings(tmp_path):
    assert storage_url(None, tmp_path / "a.db") == f"sqlite:///{tmp_path / 'a.db'}"
    assert storage_url("postgresql://u@h/db", tmp_path) == "postgresql://u@h/db"
    journal = storage_url(f"journal:{tmp_path}/j.log", tmp_path)
    assert journal == f"journal:{tmp_path}/j.log"
    assert isinstance(open_storage(journal), optuna.storages.JournalStorage)
    with pytest.raises(ConfigError, match="tune.storage: cannot open 'nosuchdb://x'"):
        open_storage("nosuchdb://x")


def test_the_trial_table_lists_every_trial_with_its_state_and_reason(tmp_path):
    study = _study(tmp_path)

    def objective(trial):
        x = SPACE.suggest(trial)["x"]
        if trial.number == 1:
            raise ValueError("bad point")
        return [x]

    trials = run_search(study, objective, 3, max_failure_rate=1.0)
    rows = trial_rows(trials, ["drop"])
    write_trials_csv(tmp_path / "t.csv", rows)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "number,state,drop,duration_s,last_step,reason,params.x"
    assert lines[2].startswith("1,FAIL,,") and lines[2].split(",")[5] == "ValueError: bad point"
    assert float(lines[1].split(",")[2]) == pytest.approx(trials[0].values[0])
