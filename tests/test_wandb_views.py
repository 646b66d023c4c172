"""The W&B view that compares pipelines (icep.wandb_views), built offline: its panels plot the
keys runs log, its runs are grouped by setting and pipeline; saving is a separate step."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import digits_data

from icep.errors import IcepError
from icep.loggers import STEP_TABLE, RunLogger
from icep.models import cifar_resnet
from icep.pipelines import PruningRun
from icep.pruning.criteria import L1
from icep.train import Trainer, sgd
from icep.wandb_views import INSTALL, PHASE_TIMES, comparison_workspace, main


def _has_library() -> bool:
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        return False
    return True


needs_library = pytest.mark.skipif(not _has_library(), reason=f"needs wandb-workspaces ({INSTALL})")


class Recorder:
    """Stands in for a W&B run: what RunLogger mirrors to it."""

    def __init__(self):
        self.history: list[dict] = []
        self.summary: dict = {}

    def log(self, row: dict) -> None:
        self.history.append(row)

    def finish(self, exit_code: int = 0) -> None:
        pass


def panels(workspace) -> dict:
    return {
        getattr(p, "title", None) or p.table_name: p for s in workspace.sections for p in s.panels
    }


@needs_library
def test_the_panels_plot_the_keys_a_run_logs(tmp_path, cache_dir):
    """Every key a panel plots is one a pruning run sends to W&B: per-step rows and training
    epochs (history), or the summary."""
    logger = RunLogger(tmp_path)
    logger.wandb_run = recorder = Recorder()
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=10, in_channels=1)
    run = PruningRun(model, digits_data(cache_dir, 128), Trainer(torch.device("cpu")), L1(), logger)
    run.start()
    run.prune(run.units[0], 0.5)
    run.fit(sgd(run.model, lr=0.01), 1)
    run.evaluate()
    run.record(run.units[0], finetuned=True)
    logger.log_summary(run.summary())
    logger.close()
    history = {key for row in recorder.history for key in row}
    summary = set(recorder.summary)

    found = panels(comparison_workspace("entity", "project", experiment="exp"))
    curves = [p for p in found.values() if type(p).__name__ == "LinePlot"]
    assert {(p.x, *p.y) for p in curves} == {
        ("step", "val_acc"),
        ("t_total", "val_acc"),
        ("flops_total", "val_acc"),
        ("train/epoch", "train/loss"),
        ("train/epoch", "train/lr"),
    }
    assert {key for p in curves for key in (p.x, *p.y)} <= history
    assert all(p.groupby_aggfunc == "mean" for p in curves)
    bars = found["time per phase (s)"]
    assert bars.metrics == list(PHASE_TIMES) and set(PHASE_TIMES) <= summary
    scatter = found["accuracy vs cost"]
    assert (scatter.x, scatter.y) == ("time_total_s", "acc_final_test")
    assert {scatter.x, scatter.y} <= summary
    assert found[STEP_TABLE].table_name == "steps_table"  # what WandbLogger.close logs


@needs_library
def test_the_runs_are_grouped_by_setting_then_pipeline():
    """The spec the view is saved as (what ``Workspace.save`` sends): runs filtered to the
    experiment's tag and the group, grouped by W&B group then job type."""
    group = "exp/resnet20-digits-l1-r0.5"
    workspace = comparison_workspace("entity", "project", experiment="exp", group=group)
    assert workspace.name == f"icep: {group}"
    spec = workspace._to_model().model_dump(by_alias=True, exclude_none=True)
    (runset,) = spec["spec"]["section"]["runSets"]
    assert runset["grouping"] == [
        {"section": "run", "name": "group"},
        {"section": "run", "name": "jobType"},
    ]
    assert [(f["key"]["name"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("tags", "IN", ["experiment:exp"]),
        ("group", "=", group),
    ]
    assert "summary:acc_final_test" in runset["runFeed"]["columnOrder"]
    sections = spec["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [
        "Pipelines compared",
        "Fine-tuning epochs",
        "Per-step rows",
    ]
    step_curve = sections[0]["panels"][0]["config"]
    assert (step_curve["xAxis"], step_curve["metrics"]) == ("step", ["val_acc"])
    # Every run of the project when neither is given.
    everything = comparison_workspace("entity", "project")
    assert everything.runset_settings.filters == ""
    assert everything.name == "icep: project"


@needs_library
def test_a_name_the_library_would_garble_is_refused():
    with pytest.raises(IcepError, match="--group a=b"):
        comparison_workspace("entity", "project", group="a=b")


@needs_library
def test_dry_run_saves_nothing_and_a_save_is_its_own_step(monkeypatch, capsys):
    import icep.wandb_views

    saved = []
    monkeypatch.setattr(icep.wandb_views, "save", lambda w: saved.append(w) or "https://x/view")
    main(["--entity", "e", "--experiment", "exp", "--dry-run"])
    out = capsys.readouterr().out
    assert "LinePlot: accuracy vs pruning step" in out and "icep: exp (e/icep)" in out
    assert saved == []
    main(["--entity", "e", "--project", "p", "--group", "exp/g"])
    assert [w.project for w in saved] == ["p"]
    assert "icep: saved the view https://x/view" in capsys.readouterr().out


def test_without_wandb_workspaces_one_line_says_what_to_install(monkeypatch, capsys):
    for module in (
        "wandb_workspaces",
        "wandb_workspaces.workspaces",
        "wandb_workspaces.reports.v2",
    ):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--entity", "e", "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and INSTALL in err
