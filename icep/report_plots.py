"""The plots of ``python -m icep.report``: accuracy against the remaining MACs and params with each
pipeline's Pareto front, speed-up bars over seeds, accuracy and time per pruning step, final
accuracy against time, and time per phase.

Seeds of one pipeline are drawn as thin lines in the pipeline's colour with their mean over top
and a band from the lowest to the highest seed; bars show the mean with ±1 std (the numbers of the
report's "mean ± std over seeds" table). Each plot is written as a PNG and also kept in memory, so
that report.html can hold it.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icep.report import PHASES, SETTING, _fmt, _number, _row_acc, _row_split, _sort_key

if TYPE_CHECKING:
    from icep.report import Run

MAX_PHASE_BARS = 30  # more completed runs than this: the phase plot shows group means
MAX_POINT_LABELS = 12  # more runs in a panel than this: no ratio/seed labels on the points
LOG_SPREAD = 10  # speed-ups further apart than this factor: a log axis
SIZES = {"macs": "MACs", "params": "params"}  # the per-step size counts, as the axes name them
BAND = "band: lowest to highest seed"
DPI = 100
LEGEND_WIDTH = 1.8  # inches beside the panels for the figure's legend


@dataclass(frozen=True)
class Plot:
    """One written plot: its file name, a title, a caption saying what it shows, the PNG."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Spread:
    """Values over seeds: their mean, std (two or more values), lowest and highest."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


@dataclass(frozen=True)
class SeedPoint:
    """One pruning step over the seeds: the mean x of the seeds that reached it, and their y."""

    step: int | float
    x: float
    y: Spread


# --- the numbers the plots draw ----------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (size, accuracy) that no other point dominates: none has at most their size and
    at least their accuracy (one of the two strictly). Ordered by size; equal points count once."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def mean_over_seeds(curves: Sequence[Mapping[Any, tuple[float, float]]]) -> list[SeedPoint]:
    """The seeds' curves (step -> (x, y)) joined by step: at each step, the mean x of the seeds
    that reached it and the spread of their y. Steps by number."""
    steps: dict[Any, list[tuple[float, float]]] = {}
    for curve in curves:
        for step, point in curve.items():
            steps.setdefault(step, []).append(point)
    return [
        SeedPoint(
            step,
            statistics.fmean(x for x, _ in steps[step]),
            Spread(tuple(y for _, y in steps[step])),
        )
        for step in sorted(steps)
    ]


def speedups_over_seeds(runs: Sequence[Run], attr: str) -> dict[tuple, Spread]:
    """The speed-ups ``attr`` (``speedup`` or ``compute_speedup``) of the completed runs, over
    seeds, per (model, dataset, criterion, ratio, pipeline)."""
    values: dict[tuple, list[float]] = {}
    for run in runs:
        value = getattr(run, attr)
        if run.done and value is not None:
            values.setdefault((*run.key(), run.pipeline), []).append(value)
    return {key: Spread(tuple(v)) for key, v in values.items()}


def _split(run: Run) -> str:
    """The split the run's per-step accuracy is measured on."""
    return run.summary.get("decision_split") or _row_split(run.rows[-1])


def _start_accuracy(run: Run, split: str) -> float | None:
    """The unpruned accuracy on what the steps measure: the step-data subset when there is one."""
    step_data = run.summary.get("step_data")
    source = step_data if isinstance(step_data, dict) else run.summary
    return _number(source.get(f"acc_original_{split}"))


def _split_label(runs: Sequence[Run]) -> str:
    """'val accuracy', 'test accuracy' or 'val/test accuracy', plus whether a subset was used."""
    splits = sorted({_split(r) for r in runs if r.rows})
    subset = any(isinstance(r.summary.get("step_data"), dict) for r in runs)
    return "/".join(splits) + " accuracy" + (" (step subset)" if subset else "")


def _accuracy_curve(run: Run) -> dict[Any, float]:
    """Step -> accuracy after it, with step 0 the unpruned model."""
    split = _split(run)
    curve: dict[Any, float] = {}
    start = _start_accuracy(run, split)
    if start is not None:
        curve[0] = start
    for row in run.rows:
        step, acc = _number(row.get("step")), _row_acc(row)
        if step is not None and acc is not None:
            curve[step] = acc
    return curve


def _dense_sizes(runs: Sequence[Run], what: str) -> dict[tuple, float]:
    """The unpruned model's ``what`` (macs or params) per (model, dataset), from any run that
    finished (a run killed early has no summary, but its model is the same)."""
    sizes = {}
    for run in runs:
        before = _number(run.summary.get(f"{what}_before"))
        if before:
            sizes[run.key()[:2]] = before
    return sizes


# --- writing ---------------------------------------------------------------------------------


def write_plots(
    runs: Sequence[Run], records: Sequence[dict[str, Any]], out: Path, baseline: str
) -> list[Plot]:
    """Write the plots that have data into ``out`` as PNG files; returns them, PNGs included."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colors = _pipeline_colors(runs)
    stepped = [r for r in runs if r.rows and r.status != "unreadable"]
    done = [(r, rec) for r, rec in zip(runs, records, strict=True) if r.done]
    plots = []

    def save(name: str, title: str, caption: str, fig: Figure | None) -> None:
        if fig is None:
            return
        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        (out / name).write_bytes(buffer.getvalue())
        plots.append(Plot(name, title, caption, buffer.getvalue()))

    if stepped:
        accuracy = _split_label(stepped)
        for what, unit in SIZES.items():
            save(
                f"accuracy_vs_{what}.png",
                f"Accuracy vs remaining {unit}",
                f"The {accuracy} after each pruning step against the {unit} left, as a share of "
                f"the unpruned model{' (MACs of one input)' * (what == 'macs')}, per model x dataset x "
                f"criterion. One colour per pipeline; thin lines: seeds, thick line: their mean, "
                f"{BAND}; dashed steps and ringed points: the pipeline's Pareto front (no other "
                f"of its mean points has fewer {unit} and higher accuracy); star: unpruned. Up "
                f"and to the left is better.",
                _accuracy_vs_size(Figure, stepped, colors, what),
            )
    if done:
        save(
            "speedup.png",
            f"Speed-up over {baseline}",
            f"How many times less the pipeline cost than the `{baseline}` run of the same "
            f"setting: in time (time_total_s, with a tuned run's search) and in counted compute "
            f"(flops_total). Bars: mean over seeds; error bars: ±1 std over seeds (two or more); "
            f"dots: the seeds. The dashed line at 1 is {baseline} itself.",
            _speedup_bars(Figure, [r for r, _ in done], colors, baseline),
        )
    if stepped:
        save(
            "accuracy_vs_step.png",
            "Accuracy after each pruning step",
            f"The {accuracy} after each pruning step (step 0: unpruned), per setting. Thin "
            f"lines: seeds, thick line: their mean, {BAND}; dotted: the run did not complete.",
            _per_step_figure(Figure, stepped, colors, "accuracy"),
        )
        save(
            "time_vs_step.png",
            "Cumulative pipeline time per step",
            f"Cumulative pipeline time (t_total) after each pruning step, per setting; filled "
            f"marker: the step was fine-tuned, open: not. Thin lines: seeds, thick line: their "
            f"mean, {BAND}; dotted: the run did not complete.",
            _per_step_figure(Figure, stepped, colors, "time"),
        )
    if done:
        save(
            "accuracy_vs_time.png",
            "Final test accuracy vs total pipeline time",
            "Each completed run's final test accuracy (val when there is no test) against its "
            "total pipeline time, per model x dataset x criterion; labels: r ratio, s seed.",
            _accuracy_vs_time(Figure, done, colors),
        )
        save(
            "time_per_phase.png",
            "Pipeline time per phase",
            "Seconds spent pruning, fine-tuning, evaluating and analysing for freezing, stacked, "
            f"per completed run (more than {MAX_PHASE_BARS} runs: the mean per group).",
            _time_per_phase(Figure, done, colors),
        )
    return plots


# --- the figures -------------------------------------------------------------------------------


def _panels(Figure, keys: Sequence[tuple], height: float = 4.0, legend: float = 0.0):
    """A figure with one panel per setting key (and ``legend`` inches for a legend beside them),
    and the panels by key."""
    n = len(keys)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(max(7.0, 5.5 * cols) + legend, height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, dict(zip(keys, axes, strict=False))


def _setting_title(key: tuple) -> str:
    return " ".join(f"{name}={_fmt(value)}" for name, value in zip(SETTING, key, strict=False))


def _draw_seeds(ax, curves: Sequence[tuple[Run, dict]], color, label: str) -> list[SeedPoint]:
    """The seeds' curves (run, step -> (x, y)) as thin lines, and the mean of the completed ones
    as a thick line over a band from the lowest to the highest seed. One seed: one plain line.
    Returns the mean points."""
    complete = [curve for run, curve in curves if run.status == "completed"]
    means = mean_over_seeds(complete)
    single = len(curves) == 1
    for run, curve in curves:
        if not curve:
            continue
        xs, ys = zip(*(curve[s] for s in sorted(curve)), strict=True)
        ax.plot(
            xs,
            ys,
            "-" if run.status == "completed" else ":",
            color=color,
            alpha=0.9 if single else 0.35,
            linewidth=1.6 if single else 0.8,
            label=label if single else None,
        )
    if single or not means:
        return means
    xs = [p.x for p in means]
    ax.plot(xs, [p.y.mean for p in means], "-", color=color, linewidth=2.0, label=label)
    ax.fill_between(
        xs, [p.y.low for p in means], [p.y.high for p in means], color=color, alpha=0.15, lw=0
    )
    return means


def _accuracy_vs_size(Figure, runs: Sequence[Run], colors: dict[str, Any], what: str):
    """Accuracy after each step against the share of ``what`` (macs or params) left."""
    dense = _dense_sizes(runs, what)
    runs = [r for r in runs if r.key()[:2] in dense]
    if not runs:
        return None
    keys = sorted({r.key()[:3] for r in runs}, key=_sort_key)
    fig, axes = _panels(Figure, keys, height=4.6, legend=LEGEND_WIDTH)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.key()[:3], run.pipeline, run.key()[3]), []).append(run)
    fronts: dict[tuple, list[tuple[float, float]]] = {}  # (key, pipeline) -> mean points
    ratios = {key: {r.key()[3] for r in runs if r.key()[:3] == key} for key in keys}
    unpruned: dict[tuple, list[float]] = {}
    for (key, pipeline, ratio), members in groups.items():
        ax, color, size = axes[key], colors[pipeline], dense[key[:2]]
        curves = []
        for run in members:
            accuracy = _accuracy_curve(run)
            sizes = {0: size} | {row.get("step"): _number(row.get(what)) for row in run.rows}
            curve = {
                step: (100 * sizes[step] / size, acc)
                for step, acc in accuracy.items()
                if sizes.get(step) is not None
            }
            if 0 in curve:
                unpruned.setdefault(key, []).append(curve[0][1])
            curves.append((run, curve))
        means = _draw_seeds(ax, curves, color, None if (key, pipeline) in fronts else pipeline)
        # The front of what the pipeline produced: the unpruned model is no pipeline's.
        fronts.setdefault((key, pipeline), []).extend((p.x, p.y.mean) for p in means if p.step != 0)
        if len(ratios[key]) > 1 and means:
            last = means[-1]
            ax.annotate(
                f"r={_fmt(ratio)}",
                (last.x, last.y.mean),
                fontsize=7,
                color=color,
                xytext=(2, -12),
                textcoords="offset points",
            )
    for (key, pipeline), points in fronts.items():
        front = pareto_front(points)
        if not front:
            continue
        xs, ys = zip(*front, strict=True)
        # The front holds each accuracy from its point to the next, larger one.
        axes[key].step(xs, ys, where="post", linestyle="--", color=colors[pipeline], alpha=0.8)
        axes[key].plot(
            xs, ys, "o", markersize=6, markerfacecolor="none", color=colors[pipeline], mew=1.2
        )
    for key, ax in axes.items():
        if key in unpruned:
            ax.plot(100, statistics.fmean(unpruned[key]), "*", color="black", markersize=11)
        ax.set_title(_setting_title(key), fontsize=9)
        ax.set_xlabel(f"remaining {SIZES[what]} (% of the unpruned model)")
        ax.set_ylabel(f"{_split_label([r for r in runs if r.key()[:3] == key])} (%)")
        ax.grid(alpha=0.3)
    _legend(fig, seeds=any(len(m) > 1 for m in groups.values()), front=True)
    fig.suptitle(f"accuracy vs remaining {SIZES[what]} (up and to the left is better)", fontsize=10)
    return fig


def _legend(fig, seeds: bool, front: bool = False) -> None:
    """One legend beside the panels (a pipeline has one colour in all of them): the pipelines,
    plus what the seeds' lines and band, the Pareto front and the star mean."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    named: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            named.setdefault(label, handle)
    handles, labels = list(named.values()), list(named)
    if seeds:
        handles += [
            Line2D([], [], color="gray", linewidth=0.8, alpha=0.6),
            Line2D([], [], color="gray", linewidth=2.0),
            Patch(color="gray", alpha=0.25, linewidth=0),
        ]
        labels += ["a seed", "mean over seeds", "lowest to highest seed"]
    if front:
        handles += [
            Line2D([], [], color="gray", linestyle="--", marker="o", markerfacecolor="none"),
            Line2D([], [], color="black", marker="*", linestyle="none", markersize=10),
        ]
        labels += ["Pareto front", "unpruned"]
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")


def _per_step_figure(Figure, runs: Sequence[Run], colors: dict[str, Any], what: str):
    keys = sorted({r.key() for r in runs}, key=_sort_key)
    fig, axes = _panels(Figure, keys, legend=LEGEND_WIDTH)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault((run.key(), run.pipeline), []).append(run)
    for (key, pipeline), members in groups.items():
        ax, color = axes[key], colors[pipeline]
        curves = []
        for run in members:
            if what == "accuracy":
                curve = {step: (step, acc) for step, acc in _accuracy_curve(run).items()}
            else:
                curve, tuned = {}, {}
                for row in run.rows:
                    x, y = _number(row.get("step")), _number(row.get("t_total"))
                    if x is not None and y is not None:
                        curve[x] = (x, y)
                        tuned[x] = bool(row.get("finetuned"))
                for filled in (True, False):
                    points = [curve[x] for x in curve if tuned[x] == filled]
                    if points:
                        ax.plot(
                            *zip(*points, strict=True),
                            "o",
                            color=color,
                            markerfacecolor=color if filled else "white",
                            markersize=4,
                        )
            curves.append((run, curve))
        _draw_seeds(ax, curves, color, pipeline)
    for key, ax in axes.items():
        ax.set_title(_setting_title(key), fontsize=9)
        ax.set_xlabel("pruning step")
        ax.set_ylabel(
            f"{_split_label([r for r in runs if r.key() == key])} (%)"
            if what == "accuracy"
            else "cumulative time (s)"
        )
        ax.grid(alpha=0.3)
    _legend(fig, seeds=any(len(m) > 1 for m in groups.values()))
    fig.suptitle(
        f"{_split_label(runs)} after each pruning step (step 0: unpruned)\n"
        "dotted: the run did not complete"
        if what == "accuracy"
        else "cumulative pipeline time (filled marker: fine-tuned step, open: not)\n"
        "dotted: the run did not complete",
        fontsize=10,
    )
    return fig


def _speedup_bars(Figure, runs: Sequence[Run], colors: dict[str, Any], baseline: str):
    """Speed-up over the baseline per setting and pipeline, in time and in compute."""
    from matplotlib.ticker import FuncFormatter

    kinds = [
        (attr, title, spreads)
        for attr, title in (("speedup", "time"), ("compute_speedup", "compute (FLOPs)"))
        if (spreads := speedups_over_seeds(runs, attr))
        and any(key[-1] != baseline for key in spreads)
    ]
    if not kinds:
        return None
    settings = sorted({key[:-1] for _, _, s in kinds for key in s}, key=_sort_key)
    pipelines = sorted({key[-1] for _, _, s in kinds for key in s} - {baseline})
    # Name a setting only by what varies between the settings (ratio when only it does).
    varying = [i for i in range(len(SETTING)) if len({s[i] for s in settings}) > 1] or [3]
    names = [
        "\n".join(f"{SETTING[i]}={_fmt(s[i])}" for i in varying).replace("ratio=", "r=")
        for s in settings
    ]
    width = min(0.8 / len(pipelines), 0.3)
    fig = Figure(
        figsize=(max(4.0, 1.5 + 0.9 * len(settings) * len(pipelines) ** 0.5) * len(kinds), 4.4),
        layout="constrained",
    )
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    means = [s.mean for _, _, spreads in kinds for s in spreads.values()]
    log = max(means) / min(means) > LOG_SPREAD  # else the small speed-ups are flat bars
    for ax, (_, title, spreads) in zip(axes, kinds, strict=True):
        for j, pipeline in enumerate(pipelines):
            color = colors[pipeline]
            for i, setting in enumerate(settings):
                spread = spreads.get((*setting, pipeline))
                if spread is None:
                    continue
                x = i + (j - (len(pipelines) - 1) / 2) * width
                ax.bar(
                    x,
                    spread.mean,
                    width * 0.9,
                    color=color,
                    alpha=0.75,
                    label=pipeline,
                    yerr=spread.std,
                    capsize=4,
                )
                # The seeds beside the error bar, not on it.
                n = len(spread.values)
                dots = [x + width * (0.15 + 0.2 * k / max(n - 1, 1)) for k in range(n)]
                ax.plot(dots, spread.values, ".", color="black", ms=4)
                ax.annotate(
                    f"{spread.mean:.2f}x",
                    (x, spread.high if spread.std is None else spread.mean + spread.std),
                    xytext=(0, 5),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{baseline} (1x)")
        ax.set_xticks(range(len(settings)), names, fontsize=8)
        ax.set_xlim(-0.6, len(settings) - 0.4)
        ax.set_ylabel(f"speed-up over {baseline} (x{', log scale' if log else ''})")
        ax.set_title(f"in {title}", fontsize=9)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_ylim(min(0.5, min(means) * 0.5), max(means) * 3)
        else:
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), fontsize=8, loc="outside right upper")
    fig.suptitle(
        f"speed-up over {baseline}: bars mean over seeds, error bars ±1 std, dots seeds",
        fontsize=10,
    )
    return fig


def _accuracy_vs_time(Figure, done: Sequence[tuple[Run, dict]], colors: dict[str, Any]):
    keys = sorted({r.key()[:3] for r, _ in done}, key=_sort_key)
    fig, axes = _panels(Figure, keys)
    per_panel = {key: sum(r.key()[:3] == key for r, _ in done) for key in keys}
    labelled: set[tuple] = set()
    for run, record in done:
        acc = (
            record["acc_final_test"]
            if record["acc_final_test"] is not None
            else record["acc_final_val"]
        )
        if acc is None:
            continue
        ax = axes[run.key()[:3]]
        label = run.pipeline if (run.key()[:3], run.pipeline) not in labelled else None
        labelled.add((run.key()[:3], run.pipeline))
        ax.scatter(record["time_total_s"], acc, color=colors[run.pipeline], label=label)
        if per_panel[run.key()[:3]] > MAX_POINT_LABELS:
            continue
        ax.annotate(
            f"r={_fmt(record['ratio'])} s={_fmt(record['seed'])}",
            (record["time_total_s"], acc),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for key, ax in axes.items():
        ax.set_title(_setting_title(key), fontsize=9)
        ax.set_xlabel("total pipeline time (s)")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("final accuracy vs total pipeline time (labels: r ratio, s seed)", fontsize=10)
    return fig


def _time_per_phase(Figure, done: Sequence[tuple[Run, dict]], colors: dict[str, Any]):
    if len(done) <= MAX_PHASE_BARS:
        labels = [run.label() for run, _ in done]
        values = [[record[key] or 0.0 for key in PHASES.values()] for _, record in done]
        title = "pipeline time per phase, per run"
    else:  # the mean per pipeline x ratio x setting
        groups: dict[tuple, list[dict]] = {}
        for run, record in done:
            groups.setdefault((*run.key(), run.pipeline), []).append(record)
        labels, values = [], []
        for key in groups:  # in the order of the runs: each setting's baseline first
            members = groups[key]
            labels.append(
                f"{key[-1]} r={_fmt(key[3])} {key[0]}/{key[1]}/{key[2]} (n={len(members)})"
            )
            values.append([statistics.fmean(r[k] or 0.0 for r in members) for k in PHASES.values()])
        title = "pipeline time per phase, mean over seeds"
    fig = Figure(figsize=(9, 1.5 + 0.35 * len(labels)), layout="constrained")
    ax = fig.subplots()
    left = [0.0] * len(labels)
    phase_colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i, phase in enumerate(PHASES):
        widths = [v[i] for v in values]
        ax.barh(labels, widths, left=left, color=phase_colors[i], label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title)
    return fig


def _pipeline_colors(runs: Sequence[Run]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    names = sorted({r.pipeline for r in runs})
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}
