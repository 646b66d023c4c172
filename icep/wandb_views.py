"""The W&B workspace that compares pipelines (README, "Comparing pipelines in W&B"), built in
code instead of by hand:

    icep views --entity ENTITY [--project icep] [--experiment NAME] [--group G]
    (python -m icep.wandb_views is the same)

saves a view of the project whose runs are grouped by setting (the W&B group) and pipeline (the
job type), with the panels that compare them. ``--dry-run`` builds it and lists its panels
without saving. Needs the optional ``wandb-workspaces`` package (``pip install
'icep[wandb-views]'``); icep itself runs without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from icep.errors import IcepError
from icep.loggers import EPOCH_AXIS, EPOCH_METRICS, STEP_TABLE, experiment_tag

PROG = "icep views"
INSTALL = "pip install 'icep[wandb-views]'"
# The decision split's accuracy after each step (metrics.jsonl); test_acc in runs without a val
# split (dataset.val_fraction=0).
STEP_ACCURACY = "val_acc"
# The summary's seconds of each phase of the pipeline's cost (summary.json).
PHASE_TIMES = ("time_prune_s", "time_finetune_s", "time_eval_s", "time_freeze_analysis_s")
# Summary keys pinned in the runs table, beside the run's name.
COLUMNS = ("acc_final_test", "acc_drop_test", "time_total_s", "macs_ratio", "params_ratio")


def _library() -> tuple[Any, Any, Any]:
    """wandb_workspaces' workspaces, reports and expressions modules, imported on first use."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
        from wandb_workspaces import expr
    except ImportError:
        raise IcepError(f"the W&B views need the wandb-workspaces package: {INSTALL}") from None
    return ws, wr, expr


def comparison_workspace(
    entity: str,
    project: str,
    experiment: str | None = None,
    group: str | None = None,
    name: str | None = None,
) -> Any:
    """A ``wandb_workspaces.workspaces.Workspace`` (not saved) of the runs of ``project``, or of
    one ``experiment`` (its ``name=``) or one W&B ``group`` (a setting), grouped by setting and
    pipeline (W&B group, then job type) so that each pipeline's seeds make one line with their
    mean and spread. Its panels: accuracy vs pruning step, vs cumulative pruning time and vs
    counted compute; time per phase; final test accuracy vs pruning time; the fine-tunes' loss
    and lr per epoch; the per-step rows of each run (the ``steps_table`` Table)."""
    ws, wr, expr = _library()
    for what, value in (("experiment", experiment), ("group", group)):
        # wandb-workspaces writes filters as text and reads them back, turning = into ==.
        if value is not None and "=" in value:
            raise IcepError(f"--{what} {value}: a view cannot filter on a name holding '='")
    filters = []
    if experiment is not None:  # its runs carry its tag (icep.loggers.experiment_tag)
        filters.append(expr.Tags().isin([experiment_tag(experiment)]))
    if group is not None:
        filters.append(expr.Metric("Group") == group)

    def curve(title: str, x: str, y: str) -> Any:
        return wr.LinePlot(
            title=title, x=x, y=[y], groupby_aggfunc="mean", groupby_rangefunc="stddev"
        )

    compared = [
        curve("accuracy vs pruning step", "step", STEP_ACCURACY),
        curve("accuracy vs cumulative pruning time (s)", "t_total", STEP_ACCURACY),
        curve("accuracy vs counted compute (FLOPs)", "flops_total", STEP_ACCURACY),
        wr.BarPlot(
            title="time per phase (s)",
            metrics=list(PHASE_TIMES),
            orientation="v",
            groupby_aggfunc="mean",
            groupby_rangefunc="stddev",
        ),
        wr.ScatterPlot(title="accuracy vs cost", x="time_total_s", y="acc_final_test"),
    ]
    epochs = [curve(f"{key} per epoch", EPOCH_AXIS, key) for key in EPOCH_METRICS]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name or f"icep: {group or experiment or project}",
        sections=[
            ws.Section(name="Pipelines compared", panels=compared, is_open=True),
            ws.Section(name="Fine-tuning epochs", panels=epochs, is_open=True),
            ws.Section(
                name="Per-step rows", panels=[wr.WeavePanelSummaryTable(table_name=STEP_TABLE)]
            ),
        ],
        runset_settings=ws.RunsetSettings(
            filters=filters,
            groupby=[expr.Metric("Group"), expr.Metric("JobType")],
            pinned_columns=[f"summary:{key}" for key in COLUMNS],
        ),
    )


def describe(workspace: Any) -> list[str]:
    """One line per section and panel of ``workspace``: what ``--dry-run`` prints."""
    lines = [f"{workspace.name} ({workspace.entity}/{workspace.project})"]
    settings = workspace.runset_settings
    lines.append(f"  runs: {settings.filters or 'all'}, grouped by group, then job type")
    for section in workspace.sections:
        lines.append(f"  {section.name}:")
        for panel in section.panels:
            title = getattr(panel, "title", None) or getattr(panel, "table_name", "")
            lines.append(f"    {type(panel).__name__}: {title}")
    return lines


def save(workspace: Any) -> str:
    """Save ``workspace`` to the W&B server (needs network and an API key); its URL."""
    import wandb

    try:
        workspace.save()
    except wandb.errors.Error as exc:  # no API key, no such entity or project, no server
        raise IcepError(f"cannot save the view to W&B ({type(exc).__name__}: {exc})") from None
    return workspace.url


def main(argv: Sequence[str] | None = None) -> None:
    from icep.cli_errors import run_command

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Save a W&B view of a project that compares icep's pipelines: runs grouped "
        "by setting and pipeline, with the README's panels.",
    )
    parser.add_argument("--entity", required=True, help="the W&B user or team")
    parser.add_argument("--project", default="icep", help="the W&B project (default: icep)")
    parser.add_argument("--experiment", help="only the runs of this experiment (its name=)")
    parser.add_argument("--group", help="only the runs of this W&B group (one setting)")
    parser.add_argument("--name", help="the view's name (default: icep: <group or experiment>)")
    parser.add_argument(
        "--dry-run", action="store_true", help="build the view and list its panels; save nothing"
    )
    args = parser.parse_args(argv)

    def body() -> None:
        workspace = comparison_workspace(
            args.entity, args.project, args.experiment, args.group, args.name
        )
        print("\n".join(describe(workspace)), flush=True)
        if not args.dry_run:
            print(f"icep: saved the view {save(workspace)}", flush=True)

    run_command(body)


if __name__ == "__main__":
    main()
