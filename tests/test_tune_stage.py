"""The auto-tuning stage of one run (tune=grid|tpe|nsga2): trials on a share of the data, the trial
table and result, the selected parameters driving the final run, the pruner, resume, bad input."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
from conftest import FAST, ROOT, read_jsonl, run_icep
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from test_tune_space import PAPER_GRID as PAPER_GRID_EXPRESSIONS

from icep.config import validate
from icep.errors import ConfigError
from icep.tune import SearchSpace
from icep.tune.stage import check_tune

# 600 digits train+val samples; each trial uses a quarter of train and half of val.
SMALL = [*FAST, "dataset.train_subset=600", "tune.train_fraction=0.25", "tune.eval_fraction=0.5"]
PAPER_GRID = SearchSpace(PAPER_GRID_EXPRESSIONS).grid()
RANGES = {
    "thre": (0.5, 1.5),
    "fr": (0.3, 0.9),
    "base": (0.001, 0.005),
    "p": (0.1, 0.2),
    "beta": (40, 60),
    "delta": (0.0006, 0.0008),
}


SAMPLER_CLASSES = {"grid": "GridSampler", "tpe": "TPESampler", "nsga2": "NSGAIISampler"}


def _options(group):
    return sorted(p.stem for p in (ROOT / "conf" / "tune" / group).glob("*.yaml"))


def _csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["grid", "tpe", "nsga2"])
def test_a_three_trial_search_picks_the_parameters_of_the_final_run(sampler, tmp_path, cache_dir):
    out = tmp_path / sampler
    wandb = ["logger=wandb", "logger.mode=offline", "name=tunewb"] if sampler == "tpe" else []
    # grid: with a recovery fine-tune and 2 epochs for a unit, which the trials leave out as the
    # reference's do (tune.extra_epochs=false); no trigger: every step fine-tunes
    recovery = [
        "pipeline.final_finetune_epochs=1",
        "pipeline.unit_epochs={layer3.2: 2}",
        "pipeline.trigger=false",
    ]
    recovery = recovery if sampler == "grid" else []
    args = [f"tune={sampler}", "tune.n_trials=3", *SMALL, *wandb, *recovery]
    result = run_icep(args, out, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    trials = _csv(out / "tune_trials.csv")
    assert [int(t["number"]) for t in trials] == [0, 1, 2]
    assert all(t["state"] in ("COMPLETE", "PRUNED") for t in trials)
    tune = json.loads((out / "tune_result.json").read_text())
    assert tune["sampler"] == SAMPLER_CLASSES[sampler]
    assert tune["complete"] + tune["pruned"] == 3
    assert tune["train_samples"] == 135  # a quarter of the 540 train samples
    for t in trials:
        params = {k[len("params.") :]: float(v) for k, v in t.items() if k.startswith("params.")}
        assert set(params) == set(RANGES)
        for name, value in params.items():
            if sampler == "grid":
                assert value in PAPER_GRID[name]
            else:
                low, high = RANGES[name]
                assert low <= value <= high
        assert (out / "trials" / f"{int(t['number']):04d}" / "summary.json").is_file()

    # optuna-dashboard's view of the study: named objectives, each trial's folder and results
    study_name = "tunewb-tune" if wandb else "default-tune"
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{out / 'tune.db'}")
    names = {"drop": "acc_drop_val", "time": "time_total_s"}
    assert study.metric_names == [names[o] for o in tune["objectives"]]
    for trial in study.trials:
        folder = out / "trials" / f"{trial.number:04d}"
        assert trial.user_attrs["run_folder"] == str(folder)
        summary = json.loads((folder / "summary.json").read_text())
        if summary["status"] == "completed":
            for key in ("acc_final_test", "finetunes", "time_total_s", "macs_ratio"):
                assert trial.user_attrs[key] == summary[key], key

    chosen = tune["chosen"]
    assert chosen["number"] in [p["number"] for p in tune["pareto_front"]]
    best = min(p["drop"] for p in tune["pareto_front"])
    assert chosen["drop"] <= best + tune["tolerance"]
    if sampler == "nsga2":
        assert tune["objectives"] == ["drop", "time"]
        assert {"drop", "time"} <= set(trials[0])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    for name, value in chosen["params"].items():
        assert summary["hyperparameters"][name] == pytest.approx(value)
    assert summary["time_final_s"] == summary["time_total_s"]
    assert summary["time_total_with_search_s"] == pytest.approx(
        summary["time_search_s"] + summary["time_final_s"]
    )
    assert summary["time_search_s"] >= sum(float(t["duration_s"]) for t in trials) - 1e-6
    assert summary["time_wall_with_search_s"] == pytest.approx(
        summary["time_search_s"] + summary["time_wall_s"]
    )
    assert "time with search" in result.stdout
    # The search's counted work is every trial's, whatever its end; the tuned run pays for it.
    trial_flops = [
        json.loads((out / "trials" / f"{int(t['number']):04d}" / "summary.json").read_text())
        for t in trials
    ]
    completed = [s["flops_total"] for s in trial_flops if s["status"] == "completed"]
    assert tune["search_flops"] >= sum(completed) > 0
    if recovery:
        assert all(not s.get("final_finetune") for s in trial_flops)
        assert summary["final_finetune"]["epochs"] == 1
        trial_rows = read_jsonl(out / "trials" / "0000" / "metrics.jsonl")
        final_rows = read_jsonl(out / "metrics.jsonl")
        assert [r["epochs"] for r in final_rows if r["unit"] == "layer3.2"] == [2]
        assert [r["epochs"] for r in trial_rows] == [1] * 9
    assert summary["flops_search"] == tune["search_flops"]
    assert summary["flops_total_with_search"] == summary["flops_search"] + summary["flops_total"]
    assert "compute with search" in result.stdout

    if wandb:  # one W&B run per trial (job_type trial) and the final run, in one group
        from wandb_offline import run_info

        runs = [run_info(f) for f in out.glob("**/offline-run-*/run-*.wandb")]
        assert sorted(r.job_type for r in runs) == ["final", "trial", "trial", "trial"]
        assert {r.run_group for r in runs} == {"tunewb/resnet20-digits-l1-r0.6"}


@pytest.mark.slow
def test_the_pruner_stops_a_hopeless_trial_and_a_rerun_continues_the_study(tmp_path, cache_dir):
    storage = tmp_path / "study.db"
    args = [
        "tune=tpe",
        *SMALL,
        "tune.space={thre:'choice(0.0, 100.0)'}",
        # Scripted evaluations: thre=0 fine-tunes after every step and its drop stays 0;
        # thre=100 never does, its drop is 2 points per step, and the pruner stops it at step 1.
        "tune.enqueue=[{thre:0.0},{thre:100.0}]",
        "tune.n_trials=2",
        "tune.pruner.n_startup_trials=1",
        "tune.pruner.n_warmup_steps=0",
        f"tune.storage={storage}",
    ]
    first = run_icep(args, tmp_path / "first", cache_dir, scripted_accuracy=True)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = _csv(tmp_path / "first" / "tune_trials.csv")
    assert [(t["params.thre"], t["state"]) for t in trials] == [
        ("0.0", "COMPLETE"),
        ("100.0", "PRUNED"),
    ]
    assert trials[1]["reason"].startswith("pruned at step ")
    assert trials[1]["last_step"] == "1"
    trial_summary = json.loads((tmp_path / "first/trials/0001/summary.json").read_text())
    assert trial_summary["status"] == "pruned"
    summary = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert summary["tuning"]["chosen"]["number"] == 0 and summary["hyperparameters"]["thre"] == 0

    # The same storage again: both trials are finished, so none runs and the final run follows.
    again = run_icep(args, tmp_path / "again", cache_dir, scripted_accuracy=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing study 'default-tune': 2 of 2 trials finished" in again.stdout
    assert not (tmp_path / "again" / "trials").exists()
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["tuning"]["pruned"] == 1


def _check(*overrides):
    """Validate the composed config; returns it and the sampler and pruner check_tune built."""
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=["tune=tpe", *overrides])
        validate(cfg)
        _, _, sampler, pruner = check_tune(cfg)
    return cfg, sampler, pruner


@pytest.mark.parametrize(
    "args, message",
    [
        (["pipeline=iterative"], "tune: auto-tuning searches ICE's hyperparameters"),
        (
            ["tune.sampler=tpe"],  # a name where the node goes: tune/sampler=tpe picks it
            "tune.sampler: got 'tpe', not a sampler node with _target_; choose one with "
            "tune/sampler=NAME: gp, grid, nsga2, qmc, random, tpe",
        ),
        (
            ["+tune.sampler.foo=1"],
            "tune.sampler: cannot build optuna.samplers.TPESampler: TPESampler.__init__() got an "
            "unexpected keyword argument 'foo'",
        ),
        (
            ["tune=grid", "+tune.sampler.foo=1"],  # a _partial_ node: its keys are checked too
            "tune.sampler: cannot build optuna.samplers.GridSampler: got an unexpected keyword",
        ),
        (["tune.objectives=[drop,accuracy]"], "tune.objectives: got ['drop', 'accuracy']"),
        (["+tune.space.lr_max='interval(0,1)'"], "tune.space: lr_max is not a pipeline key"),
        (["tune.space.thre='interval(2,1)'"], "tune.space.thre: interval(2,1): the interval is"),
        (
            ["tune.objectives=[drop,time]"],
            "tune.pruner: Optuna's pruners work on one objective and this study has 2; set "
            "tune/pruner=none",
        ),
        (["+tune.pruner.name=median"], "tune.pruner: cannot build icep.tune.study.CurrentMedian"),
        (["tune.pruner.n_startup_trials=-1"], "tune.pruner: cannot build icep.tune.study.Current"),
        (["tune.train_fraction=0"], "tune.train_fraction: got 0; must be a number in (0, 1]"),
        (["tune=grid", "tune.space.fr='interval(0.1,0.5)'"], "tune.space.fr: a grid search needs"),
    ],
)
def test_tuning_mistakes_name_the_key(args, message):
    with pytest.raises(ConfigError) as err:
        _check(*args)
    assert message in str(err.value)


def test_the_ice_config_carries_the_papers_grid():
    grid = OmegaConf.load(ROOT / "conf" / "pipeline" / "ice.yaml").grid
    assert SearchSpace(grid).grid() == PAPER_GRID


def test_every_sampler_config_checks_out_for_every_ice_pipeline():
    for tune in ("grid", "tpe", "nsga2", "paper"):
        for pipeline in ("ice", "ice_densenet", "ice_wrn"):
            _check(f"tune={tune}", f"pipeline={pipeline}")


def test_every_sampler_and_pruner_option_builds():
    assert _options("sampler") == ["gp", "grid", "nsga2", "qmc", "random", "tpe"]
    for name in _options("sampler"):
        # over the paper's grid, which every sampler (GridSampler too) can search
        cfg, sampler, _ = _check("tune=grid", f"tune/sampler={name}", "tune.seed=7")
        assert isinstance(sampler, optuna.samplers.BaseSampler)
        assert cfg.tune.sampler.seed == 7, name  # seeded by tune.seed
    for name in _options("pruner"):
        _, _, pruner = _check(f"tune/pruner={name}")
        assert isinstance(pruner, optuna.pruners.BasePruner)
        assert isinstance(pruner, optuna.pruners.NopPruner) == (name == "none")
    _check("tune=nsga2")  # two objectives: no pruner


@pytest.mark.parametrize(
    ("pipeline", "search"),
    [("ice", (6, 0.02, 0.02)), ("ice_densenet", (3, 0.002, 0.002)), ("ice_wrn", (7, 0.001, 0.001))],
)
def test_tune_paper_is_the_reference_search(pipeline, search):
    """The reference's seeded grid trials on its shares of the data per model family, no pruner,
    the reference's selection."""
    cfg, sampler, pruner = _check("tune=paper", f"pipeline={pipeline}")
    assert isinstance(sampler, optuna.samplers.GridSampler)
    assert isinstance(pruner, optuna.pruners.NopPruner)
    assert (cfg.tune.n_trials, cfg.tune.train_fraction, cfg.tune.eval_fraction) == search
    assert cfg.tune.select == "reference"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["tune=tpe", "tune/sampler=cmaes2"],
            "icep: error: tune/sampler=cmaes2 is not an option; choose one of: gp, grid, nsga2, "
            "qmc, random, tpe",
        ),
        (
            ["tune=tpe", "+tune.sampler.foo=1"],
            "icep: error: tune.sampler: cannot build optuna.samplers.TPESampler",
        ),
        (
            ["tune=tpe", "tune.space.thre=interval(0,1)"],
            "quote the search expression so Hydra keeps it as text: "
            """'tune.space.thre="interval(0,1)"'""",
        ),
    ],
)
def test_tuning_mistakes_end_in_one_line_before_any_work(args, message, tmp_path, cache_dir):
    result = run_icep([*FAST, *args], tmp_path / "run", cache_dir, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "tune.db").exists()


@pytest.mark.slow
def test_tune_paper_chooses_the_trial_the_reference_objective_prefers(tmp_path, cache_dir):
    from icep.tune.select import TrialResult, reference_score

    out = tmp_path / "paper"
    result = run_icep(["tune=paper", "tune.n_trials=3", *SMALL], out, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    tune = json.loads((out / "tune_result.json").read_text())
    assert tune["complete"] == 3 and tune["pruned"] == 0  # no pruner
    trials = []
    for number in range(3):
        summary = json.loads((out / "trials" / f"{number:04d}" / "summary.json").read_text())
        trials.append(TrialResult(number, summary["acc_drop_val"], summary["time_total_s"]))
    best = min(trials, key=lambda t: (reference_score(t), t.number))
    assert tune["chosen"]["number"] == best.number


@pytest.mark.slow
def test_a_search_stopped_mid_trial_resumes_without_repeating_or_counting_a_failure(
    tmp_path, cache_dir
):
    """SIGTERM during a trial: the run stops in one line; resume=true runs the interrupted
    trial's point again (not counted as a failure), and no new trial repeats an earlier one."""
    import signal
    import subprocess
    import time

    from conftest import _icep_command

    out = tmp_path / "run"
    args = ["tune=tpe", "tune.n_trials=4", "tune/pruner=none", *SMALL]
    command, env = _icep_command(args, out, cache_dir, None, None, False)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "trials" / "0001" / "metrics.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no trial 1"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"

    resumed = run_icep([*args, "resume=true"], out, cache_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = optuna.load_study(study_name="default-tune", storage=f"sqlite:///{out / 'tune.db'}")
    stopped = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert len(stopped) == 1 and stopped[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == stopped[0].number]
    assert len(retry) == 1 and retry[0].params == stopped[0].params
    counted = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(counted) == 4
    points = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(points)) == 4  # no point drawn twice
    tune = json.loads((out / "tune_result.json").read_text())
    assert (tune["fail"], tune["interrupted"], tune["complete"]) == (0, 1, 4)


def test_a_search_that_decides_on_too_few_samples_is_warned():
    """With tune=tpe the embedded default decides on 3 val samples: one sample is 33 points, so
    thre in [0.5, 1.5] cannot tell any two trials apart."""
    from icep.tune.study import check_decision_samples

    assert check_decision_samples(200, 0.5, "tune: each trial") is None  # a sample: 0.5 points
    line = check_decision_samples(3, 0.5, "tune: each trial")
    assert line.startswith(
        "tune: each trial decides on 3 samples: one sample is 33.3 accuracy points, more than "
        "thre=0.5"
    )
    assert line.endswith("it needs at least 200 samples")
    assert check_decision_samples(3, None, "tune: each trial") is None
    assert check_decision_samples(3, 0.0, "tune: each trial") is None  # fine-tunes every step


def test_the_smallest_threshold_a_search_tries():
    from icep.tune.stage import smallest_thre

    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=["pipeline=ice"])
    ranges = SearchSpace(OmegaConf.to_container(cfg.pipeline.ranges))
    grid = SearchSpace({"thre": "choice(1.5, 0.75)", "fr": "choice(0.3, 0.9)"})
    assert smallest_thre(cfg.pipeline, ranges) == 0.5
    assert smallest_thre(cfg.pipeline, grid) == 0.75
    assert (
        smallest_thre(cfg.pipeline, SearchSpace({"fr": "interval(0.3, 0.9)"})) == cfg.pipeline.thre
    )
    cfg.pipeline.trigger = False  # every step fine-tunes: no threshold decides anything
    assert smallest_thre(cfg.pipeline, ranges) is None
