"""hydra/sweeper=icep_optuna: Optuna trials as Hydra jobs that report to their trial, PRUNED vs
FAIL, resuming a study from its storage, and one-line errors for bad sweep settings."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import FAST, ROOT, icep_env, wait_for_steps
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser

# Tiny jobs (about a second each once the dense model is cached): 300 digits, no freezing
# analysis, one thread per job so parallel jobs and other test processes do not thrash.
JOB = [
    *FAST,
    "dataset=digits",
    "dataset.train_subset=300",
    "dataset.test_subset=100",
    "model=resnet20",
    "pipeline.ratio=0.5",
    "pipeline.freeze=false",
]
ENV = {"OMP_NUM_THREADS": "1"}
SWEEPER = ["hydra/sweeper=icep_optuna"]


def sweep(args: list[str], sweep_dir: Path, cache: Path, timeout: float = 300):
    """``python -m icep -m hydra/sweeper=icep_optuna ...`` as conftest's run_icep runs icep."""
    env = icep_env(cache, **ENV)
    command = ["-m", "hydra/sweeper=icep_optuna", f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(
        [sys.executable, "-m", "icep", *command, "hydra.sweeper.seed=0", *JOB, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trials_csv(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "tune_trials.csv") as f:
        return list(csv.DictReader(f))


def job_config(sweep_dir: Path, number: int) -> dict:
    return yaml.safe_load((sweep_dir / str(number) / ".hydra" / "config.yaml").read_text())


def assert_one_error_line(result, *must_say: str) -> str:
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("icep: error: "), lines[0]
    for text in must_say:
        assert text in lines[0], lines[0]
    return lines[0]


def check_completed_sweep(sweep_dir: Path, n_trials: int) -> list[dict]:
    """The results files list ``n_trials`` completed trials with parameters inside their ranges,
    and each job ran with its trial's values and received its trial."""
    rows = trials_csv(sweep_dir)
    assert [int(r["number"]) for r in rows] == list(range(n_trials))
    assert {r["state"] for r in rows} == {"COMPLETE"}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["name"] == "icep_optuna"
    assert set(results["best_params"]) == {"pipeline.thre", "pipeline.beta"}
    assert results["best_value"] == min(float(r["acc_drop_val"]) for r in rows)
    for row in rows:
        number, thre, beta = (
            int(row["number"]),
            float(row["params.pipeline.thre"]),
            row["params.pipeline.beta"],
        )
        assert 0.5 <= thre <= 1.5 and 40 <= int(beta) <= 60 and beta == str(int(beta))
        summary = json.loads((sweep_dir / str(number) / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["acc_drop_val"] == pytest.approx(float(row["acc_drop_val"]))
        cfg = job_config(sweep_dir, number)
        assert cfg["pipeline"]["thre"] == thre  # the exact float, read back as a float
        assert cfg["pipeline"]["beta"] == int(beta) and isinstance(cfg["pipeline"]["beta"], int)
        assert cfg["optuna"]["trial"] == number
        assert cfg["optuna"]["storage"] == f"sqlite:///{sweep_dir.resolve() / 'optuna.db'}"
    result = json.loads((sweep_dir / "tune_result.json").read_text())
    assert (result["complete"], result["pruned"], result["fail"]) == (n_trials, 0, 0)
    # optuna-dashboard's view: the objective by name, and each trial's run and results
    storage = f"sqlite:///{sweep_dir.resolve() / 'optuna.db'}"
    study = optuna.load_study(study_name="default", storage=storage)  # the experiment name
    assert study.metric_names == ["acc_drop_val"]
    for trial in study.trials:
        folder = sweep_dir / str(trial.number)
        summary = json.loads((folder / "summary.json").read_text())
        assert Path(trial.user_attrs["run_folder"]).resolve() == folder.resolve()
        for key in ("acc_final_test", "finetunes", "time_total_s", "macs_ratio", "status"):
            assert trial.user_attrs[key] == summary[key], key
    return rows


SPACE = ["pipeline.thre=interval(0.5,1.5)", "pipeline.beta=int(interval(40,60))"]


def test_sweep_runs_trials_as_jobs(tmp_path, cache_dir):
    result = sweep([*SPACE, "hydra.sweeper.n_trials=3"], tmp_path / "sweep", cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    check_completed_sweep(tmp_path / "sweep", 3)
    assert "0 of 3 trials finished" in result.stdout
    for number in range(3):
        assert f"icep_optuna: trial {number} ({number + 1}/3 finished" in result.stdout


@pytest.mark.slow
def test_sweep_with_the_submitit_launcher(tmp_path, cache_dir):
    """Trials in other processes, two at a time: the results and a failed job's error (an
    icep ConfigError, pickled) come back; the sweep goes on past the failure. (Eight jobs at
    once on this launcher: the load test below.)"""
    result = sweep(
        [
            "pipeline.delta=choice(0.0005,0.002)",  # 0.002 >= pipeline.base: the job fails
            "hydra/sweeper/sampler=grid",
            "hydra/launcher=submitit_local",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.max_failure_rate=1",
        ],
        tmp_path / "sweep",
        cache_dir,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    rows = trials_csv(tmp_path / "sweep")
    assert len(rows) == 2
    for row in rows:
        number = int(row["number"])
        if float(row["params.pipeline.delta"]) == 0.002:
            assert row["state"] == "FAIL"
            assert row["reason"].startswith("ConfigError: pipeline.delta: got 0.002")
        else:
            assert row["state"] == "COMPLETE"
            assert (tmp_path / "sweep" / str(number) / "summary.json").is_file()
            assert job_config(tmp_path / "sweep", number)["optuna"]["trial"] == number
    assert {r["state"] for r in rows} == {"COMPLETE", "FAIL"}  # the grid's two points


def test_failed_trial_does_not_stop_the_sweep(tmp_path, cache_dir):
    result = sweep(
        [
            "pipeline.delta=choice(0.0005,0.002)",  # 0.002 >= pipeline.base (0.001): rejected
            "hydra/sweeper/sampler=grid",
            "hydra.sweeper.n_trials=10",  # the grid has 2 points
            "hydra.sweeper.max_failure_rate=0.5",
        ],
        tmp_path / "sweep",
        cache_dir,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    rows = {float(r["params.pipeline.delta"]): r for r in trials_csv(tmp_path / "sweep")}
    assert set(rows) == {0.0005, 0.002}
    assert rows[0.002]["state"] == "FAIL"
    assert rows[0.002]["reason"].startswith("ConfigError: pipeline.delta: got 0.002; must be below")
    assert rows[0.0005]["state"] == "COMPLETE" and rows[0.0005]["reason"] == ""
    assert "FAIL: ConfigError: pipeline.delta" in result.stdout


def test_too_many_failures_stop_the_sweep_with_one_line(tmp_path, cache_dir):
    # Both values are rejected; 2 failures > max_failure_rate 0.25 x n_trials 4.
    result = sweep(
        ["pipeline.delta=choice(0.002,0.003)", "hydra.sweeper.n_trials=4"],
        tmp_path / "sweep",
        cache_dir,
    )
    assert_one_error_line(
        result, "hydra.sweeper: sweep stopped, 2 of the trials it ran failed", "trial 0"
    )
    rows = trials_csv(tmp_path / "sweep")  # the table of a stopped sweep is kept
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"]


def test_pruned_trial_is_recorded_pruned_with_its_reason(tmp_path, cache_dir):
    # Every drop is above -100 points: the pruner stops each job after its first step.
    result = sweep(
        [
            "pipeline.thre=interval(0.5,1.5)",
            "hydra/sweeper/pruner=threshold",
            "hydra.sweeper.pruner.upper=-100",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.max_failure_rate=0",
        ],
        tmp_path / "sweep",
        cache_dir,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    rows = trials_csv(tmp_path / "sweep")
    assert [r["state"] for r in rows] == ["PRUNED", "PRUNED"]
    for row in rows:
        assert row["reason"].startswith("pruned at step 1: drop")
        assert row["last_step"] == "1" and row["acc_drop_val"] != ""
        summary = json.loads((tmp_path / "sweep" / row["number"] / "summary.json").read_text())
        assert summary["status"] == "pruned"
    study = optuna.load_study(
        study_name="default", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}"
    )
    # the pruner's node, which each job builds
    assert study.user_attrs["icep_pruner"] == {
        "_target_": "optuna.pruners.ThresholdPruner",
        "lower": None,
        "upper": -100,
    }


@pytest.mark.slow  # three sweeps
def test_rerun_resumes_the_study_and_runs_only_missing_trials(tmp_path, cache_dir):
    journal = tmp_path / "shared" / "study.log"
    common = [*SPACE, f"hydra.sweeper.storage=journal:{journal}", "hydra.sweeper.study_name=s1"]
    first = sweep([*common, "hydra.sweeper.n_trials=2"], tmp_path / "a", cache_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    again = sweep([*common, "hydra.sweeper.n_trials=3"], tmp_path / "b", cache_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert "study 's1'" in again.stdout and "2 of 3 trials finished" in again.stdout
    # Only trial 2 ran; its job folder carries its number.
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == ["2"]
    assert [r["number"] for r in trials_csv(tmp_path / "b")] == ["0", "1", "2"]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    assert optuna.get_all_study_names(storage) == ["s1"]
    study = optuna.load_study(study_name="s1", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # A third run with the same n_trials has nothing left to do.
    done = sweep([*common, "hydra.sweeper.n_trials=3"], tmp_path / "c", cache_dir)
    assert done.returncode == 0 and "3 of 3 trials finished" in done.stdout
    assert not any(p.is_dir() for p in (tmp_path / "c").iterdir())


BAD = {
    "unknown sampler": (
        ["hydra/sweeper/sampler=annealing", "pipeline.thre=0.5,1.5"],
        ["hydra/sweeper/sampler=annealing is not an option; choose one of: gp, grid", "tpe"],
    ),
    "sampler name as a value": (
        ["hydra.sweeper.sampler=random", "pipeline.thre=0.5,1.5"],
        [
            "hydra.sweeper.sampler: got 'random', not a sampler node with _target_; choose one "
            "with hydra/sweeper/sampler=NAME: gp, grid, nsga2, qmc, random, tpe"
        ],
    ),
    "argument the sampler does not take": (
        ["+hydra.sweeper.sampler.foo=1", "pipeline.thre=0.5,1.5"],
        ["hydra.sweeper.sampler: cannot build optuna.samplers.TPESampler", "'foo'"],
    ),
    "empty interval in params": (
        ["hydra.sweeper.params={pipeline.thre: 'interval(1.5,0.5)'}"],
        ["hydra.sweeper.params.pipeline.thre", "interval is empty"],
    ),
    "pruner with two objectives": (
        [
            "pipeline.thre=0.5,1.5",
            "hydra.sweeper.direction=[minimize,minimize]",
            "hydra.sweeper.objectives=[acc_drop_val,time_total_s]",
        ],
        ["hydra.sweeper.pruner: Optuna's pruners work on one", "hydra/sweeper/pruner=none"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sweep_settings_end_as_one_line(case, tmp_path, cache_dir):
    args, must_say = BAD[case]
    result = sweep(args, tmp_path / "sweep", cache_dir, timeout=120)
    assert_one_error_line(result, *must_say)
    assert not (tmp_path / "sweep" / "optuna.db").exists()  # nothing was created


def test_the_plugin_is_found_and_cheap_to_import():
    """Hydra imports every plugin at startup; this one must not pull in Optuna, torch or icep."""
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "names = [c.__name__ for c in Plugins.instance().discover(Sweeper)]\n"
        "assert 'IcepOptunaSweeper' in names, names\n"
        "heavy = [m for m in ('optuna', 'torch', 'icep') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_sampled_values_read_back_as_the_same_values():
    from hydra_plugins.icep_optuna_sweeper._impl import format_value, quote

    parser = OverridesParser.create()
    values = [
        0.1,
        1e-05,
        0.30000000000000004,
        -2.5e300,
        3,
        -7,
        True,
        False,
        None,
        "resnet20",
        "0.5",
        "true",
        "null",
        "a b,c",
        "it's",
        "back\\slash\\",
        "sqlite:////tmp/x y/optuna.db",
        "postgresql://u:p@host:5432/db?sslmode=require&x=1",
        "${name}",
    ]
    for value in values:
        parsed = parser.parse_override(f"key={format_value(value)}").value()
        assert parsed == value and type(parsed) is type(value), (value, format_value(value))
    assert quote("it's") == "'it\\'s'"


def test_example_experiment_composes_the_paper_grid():
    from icep.tune import SearchSpace

    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose(
            "config", overrides=["+experiment=ice_optuna_sweep"], return_hydra_config=True
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("IcepOptunaSweeper")
    assert list(sweeper.direction) == ["minimize", "minimize"]
    assert list(sweeper.objectives) == ["acc_drop_val", "time_total_s"]
    assert sweeper.pruner._target_ == "optuna.pruners.NopPruner" and sweeper.n_trials == 20
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    space = SearchSpace(dict(sweeper.params))
    assert space.grid_size() == 216
    assert space.grid()["pipeline.delta"] == [0.0006, 0.0007, 0.0008]


def test_every_sampler_and_pruner_option_builds():
    """The options the plugin registers (hydra/sweeper/sampler=..., hydra/sweeper/pruner=...)
    build, the samplers seeded with hydra.sweeper.seed; the default is TPE and the median pruner."""
    from omegaconf import OmegaConf

    from icep.tune import SearchSpace
    from icep.tune.study import build_pruner, build_sampler

    space = SearchSpace({"pipeline.thre": "choice(0.5, 1.5)"})
    with initialize_config_module("icep.conf", version_base="1.3"):
        hydra = compose("config", overrides=SWEEPER, return_hydra_config=True).hydra
        assert hydra.runtime.choices["hydra/sweeper/sampler"] == "tpe"
        assert hydra.runtime.choices["hydra/sweeper/pruner"] == "median"
        samplers = ConfigStore.instance().list("hydra/sweeper/sampler")
        pruners = ConfigStore.instance().list("hydra/sweeper/pruner")
        assert len(samplers) == 6 and len(pruners) == 6
        for option in samplers:
            name = option.removesuffix(".yaml")
            overrides = [*SWEEPER, f"hydra/sweeper/sampler={name}", "hydra.sweeper.seed=7"]
            node = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper
            assert node.sampler.seed == 7, name
            sampler = build_sampler(OmegaConf.to_container(node.sampler, resolve=True), space)
            assert isinstance(sampler, optuna.samplers.BaseSampler)
        for option in pruners:
            name = option.removesuffix(".yaml")
            overrides = [*SWEEPER, f"hydra/sweeper/pruner={name}"]
            node = compose("config", overrides=overrides, return_hydra_config=True).hydra.sweeper
            pruner = build_pruner(OmegaConf.to_container(node.pruner, resolve=True))
            assert isinstance(pruner, optuna.pruners.NopPruner) == (name == "none")


def test_drop_and_time_objectives_get_the_pareto_front_and_a_selection(tmp_path):
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from hydra_plugins.icep_optuna_sweeper._impl import _Results

    study = optuna.create_study(directions=["minimize", "minimize"])
    space = {"pipeline.thre": FloatDistribution(0.5, 1.5)}
    # (drop, seconds): 0 best drop but slow; 1 fastest within 0.5 points; 2 dominated by 1;
    # 3 fastest but too lossy.
    for thre, values in [
        (0.5, [0.8, 100.0]),
        (0.7, [1.2, 30.0]),
        (0.9, [1.3, 50.0]),
        (1.1, [3, 9]),
    ]:
        study.add_trial(
            create_trial(params={"pipeline.thre": thre}, distributions=space, values=values)
        )
    study.add_trial(create_trial(state=TrialState.FAIL, params={}, distributions={}))
    objectives = ["acc_drop_val", "time_total_s"]
    _Results(tmp_path, study, "sqlite:///x.db", objectives, ["minimize"] * 2, "tpe", 5, 0.5).write()
    result = json.loads((tmp_path / "tune_result.json").read_text())
    assert [p["number"] for p in result["pareto_front"]] == [3, 1, 0]
    assert result["chosen"]["number"] == 1 and result["params"] == {"pipeline.thre": 0.7}
    assert (result["complete"], result["fail"]) == (4, 1)
    saved = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert sorted(t["number"] for t in saved["best_trials"]) == [0, 1, 3]
    assert saved["selected"]["number"] == 1
    assert [r["state"] for r in trials_csv(tmp_path)] == ["COMPLETE"] * 4 + ["FAIL"]


@pytest.mark.slow
def test_eight_jobs_at_once_share_one_study_and_one_dense_model(tmp_path):
    """Load: 8 jobs started together (submitit_local, n_jobs=8) on an empty cache, one study.
    One job trains the dense model while the others wait for it and load it; every trial and
    every run is recorded once."""
    sweep_dir = tmp_path / "sweep"
    args = [
        *SPACE,
        "hydra/launcher=submitit_local",
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.n_jobs=8",
    ]
    result = sweep(args, sweep_dir, tmp_path / "cache", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    check_completed_sweep(sweep_dir, 8)
    logs = [(sweep_dir / str(n) / "icep.log").read_text() for n in range(8)]
    assert sum("training the dense" in log for log in logs) == 1
    assert sum("dense model from the cache" in log for log in logs) == 7
    for number in range(8):
        rows = (sweep_dir / str(number) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows] == list(range(1, 10))


@pytest.mark.slow
def test_a_stopped_sweep_records_the_job_interrupted_and_a_rerun_runs_its_point_again(
    tmp_path, cache_dir
):
    """SIGTERM while trial 1's job runs (the basic launcher: jobs in the sweep's process): the
    sweep stops with the job's one line and exit 143; trial 1 is interrupted, not failed. The
    same command again runs trial 1's point first (as trial 2) and completes the sweep."""
    args = [*SPACE, "hydra.sweeper.n_trials=3"]
    sweep_dir = tmp_path / "stopped"
    env = icep_env(cache_dir, **ENV)
    command = ["-m", "hydra/sweeper=icep_optuna", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "icep", *command, "hydra.sweeper.seed=0", *JOB, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_steps(sweep_dir / "1" / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().count("\n") == 0 and err.startswith("icep: interrupted by SIGTERM after "), (
        err
    )
    assert f"the same command with resume=true hydra.sweep.dir={sweep_dir} continues" in err
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    stopped = study.trials[1]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["interrupted"] is True
    assert json.loads((sweep_dir / "1" / "summary.json").read_text())["status"] == "interrupted"

    again = sweep(args, sweep_dir, cache_dir)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert "1 interrupted trials run again first" in again.stdout
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    retry = study.trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == stopped.params
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    result = json.loads((sweep_dir / "tune_result.json").read_text())
    assert (result["complete"], result["fail"], result["interrupted"]) == (3, 0, 1)
