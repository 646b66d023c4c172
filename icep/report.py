"""Compare pruning runs from their output folders, without W&B.

    python -m icep.report outputs/default/multirun/2025-01-01_12-00-00
    python -m icep.report RUN_A RUN_B --out comparison --baseline iterative

Reads every run folder under the given paths (a folder holding ``.hydra/config.yaml``) and writes
``report.csv`` (one row per run), ``report_aggregate.csv`` and ``report.md`` (the runs, the mean
and std over seeds per pipeline x ratio x model x dataset, the runs that failed or did not
finish), the PNG plots (:mod:`icep.report_plots`) and ``report.html``, one self-contained page
that holds the tables and the plots together (images embedded), so it can be sent on its own.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from icep.compute import format_flops
from icep.config import pipeline_label, pruned_share
from icep.errors import IcepError

if TYPE_CHECKING:
    from icep.report_plots import Plot

PROG = "icep report"
# The phases of time_total_s (icep.pipelines.base.COST_PHASES), as the summary names them.
PHASES = {
    "prune": "time_prune_s",
    "fine-tune": "time_finetune_s",
    "eval": "time_eval_s",
    "freeze analysis": "time_freeze_analysis_s",
}
SETTING = ("model", "dataset", "criterion", "ratio")  # what a baseline must share, with the seed
# report.csv: one row per run. Optional columns appear only when some run has them.
# The measured latency (icep.latency) at the default batch sizes: ms after pruning, and the
# inference speed-up over the unpruned model.
LATENCY_COLUMNS = [
    f"{key}_b{size}{unit}"
    for size in (1, 32, 256)
    for key, unit in (("latency", "_after_ms"), ("inference_speedup", ""))
]
CSV_COLUMNS = [
    "run",
    "status",
    "reason",
    "pipeline",
    "model",
    "dataset",
    "criterion",
    "ratio",
    "seed",
    "steps",
    "acc_final_val",
    "acc_final_test",
    "acc_drop_val",
    "acc_drop_test",
    "time_total_s",
    "speedup",
    "speedup_basis",
    "flops_total",
    "compute_speedup",
    "compute_speedup_basis",
    "finetunes",
    "params_after",
    "macs_after",
    "params_before",
    "macs_before",
    "remaining",
    "params_pruned",
    "macs_pruned",
    *LATENCY_COLUMNS,
    *PHASES.values(),
    "time_total_with_search_s",
    "flops_total_with_search",
    "overrides",
    "path",
]
OPTIONAL_COLUMNS = {
    "remaining",
    "time_total_with_search_s",
    "flops_total_with_search",
    *LATENCY_COLUMNS,
}
_VERDICT_NOTE = (
    "Means over the completed seeds of each setting; points: final accuracy minus the "
    "baseline's; less time and compute: the speed-ups below; inference speed-up: the unpruned model's "
    "measured latency over the pruned one's."
)
PROGRESS_FROM = 10  # more runs than this: one progress line per run read


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path
    status: str  # completed | failed | pruned | incomplete | unreadable
    reason: str = ""
    setting: dict[str, Any] = field(default_factory=dict)  # pipeline, model, ..., ratio, seed
    overrides: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    speedup: float | None = None  # in time
    speedup_basis: str = ""  # "seed": the same-seed baseline; "seed mean": over its seeds
    compute_speedup: float | None = None  # in counted work (icep.compute)
    compute_speedup_basis: str = ""

    @property
    def pipeline(self) -> str:
        return str(self.setting.get("pipeline") or "?")

    @property
    def done(self) -> bool:
        return self.status == "completed" and _number(self.summary.get("time_total_s")) is not None

    def key(self) -> tuple:
        return tuple(self.setting.get(k) for k in SETTING)

    def label(self) -> str:
        ratio, seed = self.setting.get("ratio"), self.setting.get("seed")
        return f"{self.pipeline} r={_fmt(ratio)} s={_fmt(seed)} ({self.path.name})"


# --- finding and reading runs ----------------------------------------------------------------


def is_run_folder(path: Path) -> bool:
    """A folder with the config Hydra saved for a run; not a multirun root (its own .hydra/ is
    the sweep's)."""
    return (path / ".hydra" / "config.yaml").is_file() and not (path / "multirun.yaml").is_file()


def _looks_like_run(path: Path) -> bool:
    """Run outputs without the .hydra/config.yaml that says what the run was."""
    return any(
        (path / name).is_file() for name in ("summary.json", "metrics.jsonl", "checkpoint.pt")
    )


def _is_trial(path: Path) -> bool:
    """A tuning trial's folder inside a run (trials/NNNN/): part of that run, not a run."""
    return path.parent.name == "trials" and path.name.isdigit()


def find_run_folders(paths: Sequence[Path], unlisted: dict[Path, str] | None = None) -> list[Path]:
    """Run folders at or under ``paths``, in order, each once. Descends everywhere but into
    ``.hydra/`` and tuning trials; a folder with run outputs but no ``.hydra/config.yaml`` is
    returned too, so that it is listed as unreadable instead of dropped. Folders that cannot be
    listed go to ``unlisted`` with why."""
    found: dict[Path, None] = {}

    def cannot_list(error: OSError) -> None:
        if unlisted is not None and error.filename:
            unlisted[Path(error.filename).resolve()] = f"cannot list it ({error.strerror})"

    for top in paths:
        if not top.exists():
            raise IcepError(f"{top} does not exist; give run folders or multirun folders")
        if not top.is_dir():
            raise IcepError(f"{top} is not a folder; give run folders or multirun folders")
        if is_run_folder(top) or _looks_like_run(top):  # given directly: even a trial counts
            found[top.resolve()] = None
        for root, dirs, _ in os.walk(top, onerror=cannot_list):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if d != ".hydra" and not _is_trial(here / d))
            for name in dirs:
                sub = here / name
                if is_run_folder(sub) or _looks_like_run(sub):
                    found[sub.resolve()] = None
    return list(found)


def read_run(path: Path) -> Run:
    """Read one run folder; a folder that cannot be read comes back as ``unreadable``."""
    try:
        return _read_run(path)
    except Exception as exc:  # one bad folder must not stop the report
        return Run(path, "unreadable", f"{type(exc).__name__}: {_first_line(exc)}")


def _criterion(path: Path, config: dict) -> str | None:
    """The run's criterion: the option Hydra recorded as chosen (``criterion=NAME``), or the
    ``criterion.name`` key of a config from before criteria were built from ``_target_``."""
    hydra_file = path / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        hydra = yaml.safe_load(hydra_file.read_text()) or {}
        choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
        if choices.get("criterion"):
            return choices["criterion"]
    return (config.get("criterion") or {}).get("name")


def _read_run(path: Path) -> Run:
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return Run(path, "unreadable", "no .hydra/config.yaml: not a Hydra run folder")
    config = yaml.safe_load(config_file.read_text())
    if not isinstance(config, dict):
        return Run(path, "unreadable", ".hydra/config.yaml holds no config mapping")
    pipeline = config.get("pipeline") or {}
    ratio = pruned_share(pipeline)
    setting = {
        "pipeline": pipeline_label(pipeline),
        "model": (config.get("model") or {}).get("name"),
        "dataset": (config.get("dataset") or {}).get("name"),
        "criterion": _criterion(path, config),
        "ratio": ratio,
        "seed": config.get("seed"),
    }
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    run = Run(path, "incomplete", setting=setting, overrides=[str(o) for o in overrides or []])
    run.rows, bad_lines = _read_metrics(path / "metrics.jsonl")
    summary_file = path / "summary.json"
    if summary_file.is_file():
        try:
            run.summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError as exc:
            return Run(path, "unreadable", f"summary.json is not valid JSON ({exc})", setting)
        status = run.summary.get("status")
        if status not in ("completed", "failed", "pruned"):
            return Run(path, "unreadable", f"summary.json has status {status!r}", setting)
        run.status = status
        run.reason = str(run.summary.get("reason") or "")
        if status != "completed":
            run.reason += f" (after {len(run.rows)} steps)"
    else:
        last = run.rows[-1] if run.rows else None
        if last is not None:
            acc = _row_acc(last)
            run.reason = (
                f"killed or still running: {len(run.rows)} steps done"
                + (f", {acc:.2f}% at step {last.get('step')}" if acc is not None else "")
                + (
                    f", {_number(last.get('t_total')):.1f} s so far"
                    if _number(last.get("t_total")) is not None
                    else ""
                )
            )
        elif (path / "checkpoint.pt").is_file():
            run.reason = "killed or still running: checkpoint.pt but no metrics rows"
        else:
            run.reason = "no summary.json and no steps yet: starting, or stopped before the first step (see icep.log)"
    if bad_lines:
        run.reason = "; ".join(
            filter(None, [run.reason, f"{bad_lines} unreadable metrics.jsonl lines skipped"])
        )
    return run


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of metrics.jsonl and how many lines were not JSON objects (a kill mid-write)."""
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


# --- the numbers -----------------------------------------------------------------------------


def cost_seconds(summary: dict[str, Any]) -> float | int | None:
    """What a run cost: ``time_total_s``, plus the search of a tuned run
    (``time_total_with_search_s``; METHOD.md 3.4: a tuned run's total includes its search)."""
    with_search = _number(summary.get("time_total_with_search_s"))
    return with_search if with_search is not None else _number(summary.get("time_total_s"))


def cost_flops(summary: dict[str, Any]) -> float | int | None:
    """What a run cost in counted work: ``flops_total``, or with the search of a tuned run
    ``flops_total_with_search``."""
    with_search = _number(summary.get("flops_total_with_search"))
    return with_search if with_search is not None else _number(summary.get("flops_total"))


def attach_speedups(runs: Sequence[Run], baseline: str) -> None:
    """Speed-up = the baseline's cost / the run's, in time (:func:`cost_seconds`: ``speedup``)
    and in counted work (:func:`cost_flops`: ``compute_speedup``), where the baseline is the
    completed run of pipeline ``baseline`` with the same model, dataset, criterion, ratio and
    seed (the mean of several); without a same-seed one, the mean over the seeds of that
    setting."""
    for cost, attr in ((cost_seconds, "speedup"), (cost_flops, "compute_speedup")):
        costs: dict[tuple, dict[Any, list[float]]] = {}
        for run in runs:
            if run.done and run.pipeline == baseline:
                c = cost(run.summary)
                if c:
                    costs.setdefault(run.key(), {}).setdefault(run.setting.get("seed"), []).append(
                        c
                    )
        for run in runs:
            c = cost(run.summary) if run.done else None
            if c:
                value, basis = _speedup(c, run, baseline, costs)
                setattr(run, attr, value)
                setattr(run, f"{attr}_basis", basis)


def _speedup(
    cost: float, run: Run, baseline: str, costs: dict[tuple, dict[Any, list[float]]]
) -> tuple[float | None, str]:
    if run.pipeline == baseline:
        return 1.0, "seed"
    by_seed = costs.get(run.key())
    if not by_seed:
        return None, ""
    same = by_seed.get(run.setting.get("seed"))
    if same:
        return statistics.fmean(same) / cost, "seed"
    mean = statistics.fmean(statistics.fmean(xs) for xs in by_seed.values())
    return mean / cost, "seed mean"


def run_record(run: Run, root: Path) -> dict[str, Any]:
    """The report.csv row of ``run``; ``run`` is its folder relative to ``root``."""
    s, last = run.summary, (run.rows[-1] if run.rows else {})
    record: dict[str, Any] = {
        "run": _shown_path(run.path, root),
        "status": run.status,
        "reason": run.reason,
        **{k: run.setting.get(k) for k in ("pipeline", *SETTING[:3], "ratio", "seed")},
        "steps": s.get("steps", len(run.rows) or None),
        "speedup": run.speedup,
        "speedup_basis": run.speedup_basis,
        "compute_speedup": run.compute_speedup,
        "compute_speedup_basis": run.compute_speedup_basis,
        "overrides": " ".join(run.overrides),
        "path": str(run.path),
    }
    for key in (
        "acc_final_val",
        "acc_final_test",
        "acc_drop_val",
        "acc_drop_test",
        "time_total_s",
        "time_total_with_search_s",
        "flops_total",
        "flops_total_with_search",
        "finetunes",
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
        "remaining",
        *LATENCY_COLUMNS,
        *PHASES.values(),
    ):
        record[key] = _number(s.get(key))
    if run.status != "completed":  # what the steps done so far say
        finetunes = sum(bool(r.get("finetuned")) for r in run.rows)
        for key, value in (
            ("time_total_s", _number(last.get("t_total"))),
            ("flops_total", _number(last.get("flops_total"))),
            ("params_after", _number(last.get("params"))),
            ("macs_after", _number(last.get("macs"))),
            ("remaining", _number(last.get("remaining"))),
            ("finetunes", finetunes if run.rows else None),
        ):
            if record.get(key) is None:
                record[key] = value
    for what in ("params", "macs"):
        before, after = record[f"{what}_before"], record[f"{what}_after"]
        record[f"{what}_pruned"] = 1 - after / before if before and after is not None else None
    return record


def aggregate(
    runs: Sequence[Run], records: Sequence[dict[str, Any]], baseline: str = "iterative"
) -> list[dict[str, Any]]:
    """Mean and std over seeds of the completed runs, per model x dataset x criterion x
    pipeline x ratio; ``runs`` counts every run of the group, ``completed`` those averaged."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run, record in zip(runs, records, strict=True):
        if run.status == "unreadable":
            continue
        group = tuple(record[k] for k in ("model", "dataset", "criterion", "pipeline", "ratio"))
        groups.setdefault(group, []).append(record)
    table = []

    def order(group: tuple) -> tuple:  # each setting's baseline first, next to the others
        model, dataset, criterion, pipeline, ratio = group
        return _sort_key((model, dataset, criterion, ratio, pipeline != baseline, pipeline))

    for (model, dataset, criterion, pipeline, ratio), members in sorted(
        groups.items(), key=lambda item: order(item[0])
    ):
        done = [r for r in members if r["status"] == "completed"]
        row: dict[str, Any] = {
            "model": model,
            "dataset": dataset,
            "criterion": criterion,
            "pipeline": pipeline,
            "ratio": ratio,
            "runs": len(members),
            "completed": len(done),
            "seeds": " ".join(_fmt(s) for s in sorted({r["seed"] for r in done}, key=_sort_value)),
        }
        for key in (
            "acc_final_val",
            "acc_final_test",
            "acc_drop_val",
            "acc_drop_test",
            "time_total_s",
            "speedup",
            "flops_total",
            "compute_speedup",
            "inference_speedup_b1",
            "inference_speedup_b256",
            "finetunes",
        ):
            values = [r[key] for r in done if r.get(key) is not None]
            row[f"{key}_mean"] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(row)
    return table


# --- writing ---------------------------------------------------------------------------------


def write_csv(path: Path, records: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if record.get(k) is None else record[k] for k in columns})


# (title, key, format) of the tables in report.md and report.html
RUN_TABLE = [
    ("run", "run", "{}"),
    ("pipeline", "pipeline", "{}"),
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("criterion", "criterion", "{}"),
    ("ratio", "ratio", "{}"),
    ("seed", "seed", "{}"),
    ("status", "status", "{}"),
    ("steps", "steps", "{}"),
    ("val acc (%)", "acc_final_val", "{:.2f}"),
    ("test acc (%)", "acc_final_test", "{:.2f}"),
    ("val drop", "acc_drop_val", "{:.2f}"),
    ("test drop", "acc_drop_test", "{:.2f}"),
    ("time (s)", "time_total_s", "{:.2f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("compute", "flops_total", "flops"),
    ("compute speed-up", "compute_speedup", "{:.2f}x"),
    ("fine-tunes", "finetunes", "{:.0f}"),
    ("params", "params_after", "count"),
    ("MACs", "macs_after", "count"),
    ("measured speed-up b1", "inference_speedup_b1", "{:.2f}x"),
    ("b256", "inference_speedup_b256", "{:.2f}x"),
    ("remaining", "remaining", "{:.3f}"),
    ("other overrides", "overrides_varying", "{}"),
]
AGGREGATE_TABLE = [
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("criterion", "criterion", "{}"),
    ("pipeline", "pipeline", "{}"),
    ("ratio", "ratio", "{}"),
    ("completed / runs", None, None),
    ("seeds", "seeds", "{}"),
    ("val acc (%)", "acc_final_val", "{:.2f}"),
    ("test acc (%)", "acc_final_test", "{:.2f}"),
    ("val drop", "acc_drop_val", "{:.2f}"),
    ("test drop", "acc_drop_test", "{:.2f}"),
    ("time (s)", "time_total_s", "{:.2f}"),
    ("speed-up", "speedup", "{:.2f}x"),
    ("compute", "flops_total", "flops"),
    ("compute speed-up", "compute_speedup", "{:.2f}x"),
    ("measured speed-up b1", "inference_speedup_b1", "{:.2f}x"),
    ("b256", "inference_speedup_b256", "{:.2f}x"),
    ("fine-tunes", "finetunes", "{:.1f}"),
]


def _run_cells(record: dict[str, Any]) -> list[str]:
    cells = []
    for _, key, fmt in RUN_TABLE:
        cell = _cell(record.get(key), fmt)
        if key in ("speedup", "compute_speedup") and record.get(f"{key}_basis") == "seed mean":
            cell += " *"
        cells.append(cell)
    return cells


def _aggregate_cells(row: dict[str, Any]) -> list[str]:
    cells = []
    for _, key, fmt in AGGREGATE_TABLE:
        if key is None:
            cells.append(f"{row['completed']} / {row['runs']}")
        elif f"{key}_mean" in row:
            mean, std = row[f"{key}_mean"], row[f"{key}_std"]
            cell = _cell(mean, fmt)
            cells.append(f"{cell} ± {_cell(std, fmt).rstrip('x')}" if std is not None else cell)
        else:
            cells.append(_cell(row.get(key), fmt))
    return cells


def _notes(runs: Sequence[Run], baseline: str) -> list[str]:
    notes = [
        f"Speed-up: the cost of the `{baseline}` run with the same model, dataset, criterion, "
        f"ratio and seed over this run's. Cost: time_total_s (prune, fine-tune, validation "
        f"evaluations, freeze analysis; not dense training or test evaluation), plus the search "
        f"of a tuned run (time_total_with_search_s). Compute speed-up: the same ratio of the "
        f"counted work, flops_total (forward 2 FLOPs per conv/linear MAC, backward twice that "
        f"less the weight gradients of frozen layers; README, Compute accounting), which does not "
        f"depend on the machine or its load. Measured speed-up: the unpruned model's inference "
        f"latency over the pruned one's, at batch 1 and 256 on the run's device (median of "
        f"timed calls; latency_b<N>_after_ms in the CSV)."
    ]
    if any(r.speedup_basis == "seed mean" for r in runs):
        notes.append(
            f"\\* no `{baseline}` run with this seed: the speed-up is over the mean time of the "
            f"`{baseline}` runs of the other seeds of that setting."
        )
    if not any(r.done and r.pipeline == baseline for r in runs):
        notes.append(
            f"No completed `{baseline}` run: speed-ups are empty (choose another with --baseline)."
        )
    elif any(r.done and r.speedup is None for r in runs):
        notes.append(f"An empty speed-up: no completed `{baseline}` run of that setting.")
    return notes


def verdict(groups: Sequence[dict[str, Any]], baseline: str) -> list[str]:
    """The answer the report is read for, one markdown bullet per setting: each pipeline's
    accuracy against the baseline's and what it cost (means over the completed seeds)."""
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for row in groups:
        key = tuple(row[k] for k in ("model", "dataset", "criterion", "ratio"))
        settings.setdefault(key, []).append(row)
    lines = []
    for (model, dataset, criterion, ratio), rows in settings.items():
        done = [r for r in rows if r["completed"]]
        if not done:
            continue
        split = "test" if any(r["acc_final_test_mean"] is not None for r in done) else "val"
        base = next((r for r in done if r["pipeline"] == baseline), None)
        parts = [_verdict_part(r, base, split) for r in done]
        lines.append(
            f"- **{model} / {dataset} / {criterion} / ratio {_fmt(ratio)}**: " + "; ".join(parts)
        )
    return lines


def _verdict_part(row: dict[str, Any], base: dict[str, Any] | None, split: str) -> str:
    acc = row[f"acc_final_{split}_mean"]
    seeds = f"{row['completed']} seed{'s' if row['completed'] != 1 else ''}"
    text = f"`{row['pipeline']}` {_cell(acc, '{:.2f}')}% {split}"
    if base is None or row is base:
        cost = _cell(row["time_total_s_mean"], "{:.1f}")
        text += f" in {cost} s ({_cell(row['flops_total_mean'], 'flops')})"
    else:
        base_acc = base[f"acc_final_{split}_mean"]
        if acc is not None and base_acc is not None:
            text += f" ({acc - base_acc:+.2f} points)"
        costs = [
            f"{_cell(row[key], '{:.2f}')}x less {what}"
            for key, what in (("speedup_mean", "time"), ("compute_speedup_mean", "compute"))
            if row[key] is not None
        ]
        if costs:
            text += " at " + " and ".join(costs)
    if row["inference_speedup_b1_mean"] is not None:
        text += (
            f", inference speed-up {_cell(row['inference_speedup_b1_mean'], '{:.2f}')}x (batch 1)"
        )
    return f"{text}, {seeds}"


def _problems(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["status"] != "completed"]


def markdown(
    runs: Sequence[Run],
    records: Sequence[dict[str, Any]],
    groups: Sequence[dict[str, Any]],
    baseline: str,
    plots: Sequence[Plot],
) -> str:
    common = _common_overrides(runs)
    lines = [
        "# Pruning runs compared",
        "",
        f"{len(runs)} runs: " + _counts(runs) + ".",
    ]
    if common:
        lines.append(f"Overrides shared by all runs: `{' '.join(common)}`")
    answer = verdict(groups, baseline)
    if answer:
        lines += ["", "## Which pipeline, at which cost", "", *answer, "", _VERDICT_NOTE]
    lines += [
        "",
        "## Runs",
        "",
        *_md_table([t for t, _, _ in RUN_TABLE], [_run_cells(r) for r in records]),
    ]
    lines += ["", *_notes(runs, baseline)]
    lines += [
        "",
        "## Mean ± std over seeds",
        "",
        *_md_table([t for t, _, _ in AGGREGATE_TABLE], [_aggregate_cells(g) for g in groups]),
        "",
        "Completed runs only; std needs two of them.",
    ]
    problems = _problems(records)
    lines += ["", "## Failed, pruned, incomplete and unreadable runs", ""]
    if problems:
        lines += _md_table(
            ["run", "status", "reason"], [[p["run"], p["status"], p["reason"]] for p in problems]
        )
    else:
        lines.append("None: every run completed.")
    if plots:
        lines += ["", "## Plots", ""]
        for plot in plots:
            lines += [
                f"### {plot.title}",
                "",
                f"![{plot.title}]({plot.name})",
                "",
                plot.caption,
                "",
            ]
    return "\n".join(lines).rstrip() + "\n"


def html_page(
    runs: Sequence[Run],
    records: Sequence[dict[str, Any]],
    groups: Sequence[dict[str, Any]],
    baseline: str,
    plots: Sequence[Plot],
) -> str:
    """The report as one HTML page that holds its plots (PNG data URIs): it links no file."""
    e = html.escape
    common = _common_overrides(runs)
    notes = [
        re.sub(r"`([^`]*)`", r"<code>\1</code>", e(n.replace("\\*", "*")))
        for n in _notes(runs, baseline)
    ]
    problems = _problems(records)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>icep report</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
        "font-size:90%}th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#eee}td:first-child,th:first-child{text-align:left}"
        ".wide{overflow-x:auto}img{max-width:100%;display:block;margin:1em 0 .3em}"
        "figcaption{max-width:60em;color:#333;font-size:90%;margin-bottom:2em}</style></head><body>",
        "<h1>Pruning runs compared</h1>",
        f"<p>{len(runs)} runs: {e(_counts(runs))}.</p>",
    ]
    if common:
        parts.append(f"<p>Overrides shared by all runs: <code>{e(' '.join(common))}</code></p>")
    answer = verdict(groups, baseline)
    if answer:
        parts += ["<h2>Which pipeline, at which cost</h2>", "<ul>"]
        parts += [f"<li>{_inline_html(line.removeprefix('- '))}</li>" for line in answer]
        parts += ["</ul>", f"<p>{_inline_html(_VERDICT_NOTE)}</p>"]
    parts += [
        "<h2>Runs</h2>",
        _html_table([t for t, _, _ in RUN_TABLE], [_run_cells(r) for r in records]),
    ]
    parts += [f"<p>{n}</p>" for n in notes]
    parts += [
        "<h2>Mean ± std over seeds</h2>",
        _html_table([t for t, _, _ in AGGREGATE_TABLE], [_aggregate_cells(g) for g in groups]),
        "<p>Completed runs only; std needs two of them.</p>",
        "<h2>Failed, pruned, incomplete and unreadable runs</h2>",
    ]
    if problems:
        parts.append(
            _html_table(
                ["run", "status", "reason"],
                [[p["run"], p["status"], p["reason"]] for p in problems],
            )
        )
    else:
        parts.append("<p>None: every run completed.</p>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.png).decode("ascii")
            caption = re.sub(r"`([^`]*)`", r"<code>\1</code>", e(plot.caption))
            parts.append(
                f"<figure><h3>{e(plot.title)}</h3>"
                f'<img src="data:image/png;base64,{data}" alt="{e(plot.title)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the command -----------------------------------------------------------------------------


def build_report(
    paths: Sequence[Path],
    out: Path,
    baseline: str = "iterative",
    with_html: bool = True,
    echo=print,
) -> list[Path]:
    """Read the runs under ``paths`` and write the report into ``out``; returns the files."""
    unlisted: dict[Path, str] = {}
    folders = find_run_folders(paths, unlisted)
    if not folders and not unlisted:
        shown = ", ".join(str(p) for p in paths)
        raise IcepError(
            f"no run folders under {shown} (a run folder holds .hydra/config.yaml); give the "
            "folder of a run or of a multirun (outputs/<name>/multirun/<date_time>)"
        )
    _check_writable(out)
    # Runs are named by their folder below the one that holds them all.
    everything = [*folders, *unlisted]
    root = Path(os.path.commonpath(everything)) if len(everything) > 1 else everything[0].parent
    runs = []
    progress = len(everything) > PROGRESS_FROM
    for i, folder in enumerate(everything, 1):
        run = (
            read_run(folder)
            if folder not in unlisted
            else Run(folder, "unreadable", unlisted[folder])
        )
        runs.append(run)
        if run.status == "unreadable":
            print(
                f"icep.report: warning: {folder}: {run.reason}; listed as unreadable",
                file=sys.stderr,
            )
        if progress:
            echo(f"[{i}/{len(everything)}] {_shown_path(folder, root)}: {run.status}")
    runs.sort(
        key=lambda r: _sort_key(
            (*r.key(), r.pipeline != baseline, r.pipeline, r.setting.get("seed"), str(r.path))
        )
    )
    attach_speedups(runs, baseline)
    records = [run_record(run, root) for run in runs]
    common = set(_common_overrides(runs))
    for run, record in zip(runs, records, strict=True):
        record["overrides_varying"] = " ".join(o for o in run.overrides if o not in common)
    groups = aggregate(runs, records, baseline)
    echo(f"icep.report: read {len(runs)} runs: {_counts(runs)}")
    if not any(r.done and r.pipeline == baseline for r in runs):
        echo(f"icep.report: no completed '{baseline}' run: speed-ups are empty (--baseline NAME)")

    columns = [
        c
        for c in CSV_COLUMNS
        if c not in OPTIONAL_COLUMNS or any(r.get(c) is not None for r in records)
    ]
    written = [out / "report.csv", out / "report_aggregate.csv", out / "report.md"]
    write_csv(written[0], records, columns)
    write_csv(written[1], groups, list(groups[0]) if groups else ["pipeline"])
    from icep.report_plots import write_plots  # matplotlib, only when writing

    plots = write_plots(runs, records, out, baseline)
    written[2].write_text(markdown(runs, records, groups, baseline, plots))
    written += [out / plot.name for plot in plots]
    if with_html:
        (out / "report.html").write_text(html_page(runs, records, groups, baseline, plots))
        written.append(out / "report.html")
    return written


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, as for every other input error
        _exit_with(f"{message}; see {PROG} --help")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog=PROG,
        description="Compare pruning runs: report.md, report.csv, PNG plots and report.html from "
        "run folders or multirun folders.",
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="run or multirun folders"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (default: PATH when one is given, else the current folder)",
    )
    parser.add_argument(
        "--baseline",
        default="iterative",
        help="the pipeline speed-ups are measured against (default: iterative)",
    )
    parser.add_argument(
        "--html",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write report.html (default: yes)",
    )
    args = parser.parse_args(argv)
    out = args.out or (args.paths[0] if len(args.paths) == 1 else Path.cwd())
    try:
        written = build_report(args.paths, out, args.baseline, args.html)
    except IcepError as exc:
        _exit_with(str(exc))
    print(f"icep.report: wrote {', '.join(p.name for p in written)} to {out}")
    return 0


# --- helpers ---------------------------------------------------------------------------------


def _exit_with(message: str) -> None:
    print(f"icep.report: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _check_writable(out: Path) -> None:
    """Fail before reading any run when the report cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".icep-report-"):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise IcepError(
            f"cannot write the report to {out} ({why}); pick a writable folder with --out DIR"
        ) from None


def _number(value: Any) -> float | int | None:
    """``value`` when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _row_split(row: dict[str, Any]) -> str:
    return "test" if "test_acc" in row and "val_acc" not in row else "val"


def _row_acc(row: dict[str, Any]) -> float | None:
    return _number(row.get(f"{_row_split(row)}_acc"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return ""
    if fmt == "flops":
        return format_flops(value)
    if fmt == "count":
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
            if value >= div:
                return f"{value / div:.2f}{suffix}"
        return f"{value:.0f}"
    if fmt == "{}":
        return _fmt(value)
    return fmt.format(value)


def _sort_value(value: Any) -> tuple:
    """Orders None, numbers and text together: None first, numbers by value, then text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, value, "")
    return (2, 0, str(value))


def _sort_key(values: Iterable[Any]) -> tuple:
    return tuple(_sort_value(v) for v in values)


def _shown_path(path: Path, root: Path) -> str:
    shown = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return path.name if shown == "." else shown


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _counts(runs: Sequence[Run]) -> str:
    order = ("completed", "failed", "pruned", "incomplete", "unreadable")
    counts = {s: sum(r.status == s for r in runs) for s in order}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"


def _common_overrides(runs: Sequence[Run]) -> list[str]:
    readable = [r for r in runs if r.status != "unreadable"]
    if len(readable) < 2:
        return []
    shared = set(readable[0].overrides).intersection(*(r.overrides for r in readable[1:]))
    return [o for o in readable[0].overrides if o in shared]


def _inline_html(text: str) -> str:
    """Markdown's `code` and **bold** as HTML, the rest escaped."""
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*([^*]*)\*\*", r"<strong>\1</strong>", text)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(str(c)) for c in row) + " |" for row in rows]
    return lines


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    # A wide table scrolls in its own box instead of widening the page.
    return (
        f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        "</div>"
    )


if __name__ == "__main__":
    sys.exit(main())
