"""The ``icep`` command: subcommands, help pages built from conf/'s YAML comments, answered
without loading torch, and the per-user cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, icep_env

from icep import cli
from icep.config import user_cache


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Help lines are cut to the terminal's width: 120 columns here, whatever runs the tests."""
    monkeypatch.setenv("COLUMNS", "120")


def icep(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icep", *args],
        capture_output=True,
        text=True,
        env=icep_env(),
        cwd=ROOT,
        timeout=timeout,
    )


HELP_PROBE = """
import sys
from icep.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
print("loaded:", " ".join(m for m in ("torch", "hydra", "matplotlib") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["run", "--help"],
        ["run", "--help", "pipeline"],
        ["report", "--help"],
        ["criteria", "--help"],
        ["eval", "--help"],
        ["export", "--help"],
        ["compare", "--help"],
        ["paper", "--help"],
        ["bench", "--help"],
        ["bench", "finetune", "--help"],
        ["bench", "pipelines", "--help"],
    ],
)
def test_every_help_page_answers_without_loading_torch(args):
    """Help in well under 2 s: torch (seconds to import) and Hydra stay unloaded."""
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()
    loaded = result.stdout.strip().splitlines()[-1]
    assert "torch" not in loaded.split() and "hydra" not in loaded.split(), loaded


def test_top_help_lists_every_command_and_every_config_group(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"\n  {name} " in out
    for group in ("model", "dataset", "criterion", "pipeline", "tune/sampler", "hydra/launcher"):
        assert f"\n  {group} " in out
    assert "resnet56" in out and "+experiment" in out and "icep_optuna" in out


def first_comment(path: Path) -> str:
    lines = [line for line in path.read_text().splitlines() if not line.startswith("# @package")]
    return lines[0].lstrip("# ").strip()


def test_run_help_describes_each_option_from_its_yaml_and_marks_the_defaults(capsys):
    cli.main(["run", "--help"])
    out = capsys.readouterr().out.splitlines()
    for group in ("criterion", "pipeline", "model", "tune/sampler"):
        start = out.index(f"  {group}") + 1
        section = out[start : next(i for i in range(start, len(out)) if out[i][:3] != "   ")]
        assert len(section) == len(list((ROOT / "conf" / group).glob("*.yaml")))
        for yaml in (ROOT / "conf" / group).glob("*.yaml"):
            (line,) = [ln for ln in section if ln.lstrip(" *").startswith(yaml.stem + " ")]
            words = first_comment(yaml).split()[:3]  # long lines are cut to the terminal
            assert " ".join(words) in line, (yaml, line)
    defaults = [line.strip() for line in out if line.startswith("   *")]
    assert any(d.startswith("*l1 ") for d in defaults)
    assert any(d.startswith("*ice ") for d in defaults)
    assert any(d.startswith("*resnet20 ") for d in defaults)
    assert not any(d.startswith("*resnet56 ") for d in defaults)
    # the top-level keys, with the comment beside them
    (seed,) = [line for line in out if line.strip().startswith("name=default")]
    assert "experiment name" in seed
    assert any(line.strip().startswith("dense.epochs=30") for line in out)


def test_a_group_page_lists_each_options_keys_with_their_comments(capsys):
    cli.main(["run", "--help", "pipeline/finetune"])
    out = capsys.readouterr().out
    assert "fixed\n" in out and "patience\n" in out
    assert "pipeline.finetune.epochs=1" in out
    assert "pipeline.finetune.distill=false" in out
    assert "knowledge distillation from the unpruned model" in out
    assert "_target_" not in out


def test_key_lines_read_inline_and_block_comments_and_skip_hydra_keys():
    text = """\
# The group's description.
defaults:
  - finetune: fixed
_target_: some.Class
ratio: 0.6               # share removed
# A block above a key. More detail here.
target: null
nested:
  inner: 3   # an inner key
hydra:
  run:
    dir: x
after: 1
"""
    lines = [line.split() for line in cli.key_lines(text, prefix="pipeline.")]
    assert lines == [
        ["pipeline.ratio=0.6", "share", "removed"],
        ["pipeline.target=null", "A", "block", "above", "a", "key."],
        ["pipeline.nested.inner=3", "an", "inner", "key"],
        ["pipeline.after=1"],
    ]


def test_an_unknown_command_or_group_is_one_line_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["reprot", "outputs"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"icep: error: 'reprot' is not an icep command; commands: {', '.join(cli.COMMANDS)}; "
        "did you mean report?"
    ]
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help", "pipelines"])
    assert exc.value.code == 2
    assert (
        "'pipelines' is not a config group; groups: criterion, dataset" in capsys.readouterr().err
    )


def test_overrides_alone_run_and_a_named_command_is_not_an_override():
    """`icep KEY=VALUE` is `icep run KEY=VALUE` (as `python -m icep` always was); `icep report X`
    reaches the report, whose error is its own."""
    run = icep("model=resnet56", "--cfg", "job")
    assert run.returncode == 0, run.stderr
    assert "depth: 56" in run.stdout
    named = icep("run", "model=resnet32", "--cfg", "job")
    assert named.returncode == 0 and "depth: 32" in named.stdout
    report = icep("report", "no/such/folder")
    assert report.returncode != 0
    assert "no/such/folder" in report.stderr and "override" not in report.stderr


def test_the_default_cache_is_the_users(monkeypatch, tmp_path):
    monkeypatch.delenv("ICEP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache() == tmp_path / "xdg" / "icep"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache() == tmp_path / "home" / ".cache" / "icep"
    monkeypatch.setenv("ICEP_CACHE", str(tmp_path / "mine"))
    assert user_cache() == tmp_path / "mine"


def test_the_config_resolves_the_same_cache(monkeypatch, tmp_path):
    from hydra import compose, initialize_config_module

    monkeypatch.delenv("ICEP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config")
    assert Path(cfg.paths.cache) == user_cache() == tmp_path / "xdg" / "icep"


# --- what produced a run, and where a multirun's results are -----------------------------------


def git(folder: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(folder), "PATH": os.environ["PATH"],
    }  # fmt: skip
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    from icep.provenance import git_state, run_git

    assert git_state(tmp_path) is None  # not a checkout
    repo = tmp_path / "mine"
    (repo / "models").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "models" / "net.py").write_text("x = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    state = git_state(repo / "models")
    assert state == {
        "repo": str(repo.resolve()),
        "commit": git(repo, "rev-parse", "HEAD"),
        "dirty": False,
    }
    (repo / "untracked.txt").write_text("not part of the code\n")
    assert git_state(repo)["dirty"] is False
    (repo / "models" / "net.py").write_text("x = 2\n")
    assert git_state(repo)["dirty"] is True
    assert run_git(repo)["workdir"]["commit"] == state["commit"]  # a user's own checkout


def test_a_multirun_ends_saying_where_its_runs_report_and_logs_are(tmp_path, cache_dir):
    """Even when every job fails (here: each refuses its config)."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "icep", "-m", "seed=0,1", "pipeline.ratio=1.5",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=icep_env(cache_dir), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("icep: ")]
    assert lines == [
        f"icep: 2 runs in {sweep}/ (2 not finished)",
        f"icep: compare them: icep report {sweep}",
        f"icep: each run's log: {sweep}/<job>/icep.log",
    ], result.stdout + result.stderr


def test_the_closing_lines_count_each_status_and_name_submitits_logs(tmp_path):
    from omegaconf import OmegaConf

    from icep import sweeps

    sweep = tmp_path / "sweep"
    for job, status in enumerate(["completed", "completed", "failed", None]):
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        if status:
            (sweep / str(job) / "summary.json").write_text(json.dumps({"status": status}))
    (sweep / ".submitit").mkdir()  # not a job
    launcher = {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "submitit_folder": f"{sweep}/.submitit/%j",
    }
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "launcher": launcher}})
    sweeps.NoteSweep().on_multirun_start(config)
    assert sweeps.closing_lines() == [
        f"icep: 4 runs in {sweep}/ (2 completed, 1 failed, 1 not finished)",
        f"icep: compare them: icep report {sweep}",
        f"icep: launcher logs (submitit): {sweep}/.submitit/",
    ]
    assert sweeps.closing_lines() == []  # said once


def test_printing_the_composed_config_loads_no_torch():
    """`icep --cfg job` answers in about a second: Hydra composes, nothing trains."""
    result = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, "model=resnet56", "--cfg", "job"],
        capture_output=True, text=True, timeout=120, env=icep_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "depth: 56" in result.stdout
    assert "torch" not in result.stdout.strip().splitlines()[-1].split()
