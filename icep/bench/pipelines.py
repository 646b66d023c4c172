"""Benchmark 2: baseline iterative pruning against ICE-Pruning (fixed parameters, and with its
auto-tuning stage, the search counted) over seeds, and how the pipeline time scales.

    # the measurement: ResNet-56 on CIFAR-10 (JPEG) at r = 0.6, seeds 0-2 as the time allows
    icep bench pipelines --budget-minutes 120 \\
        +experiment=resnet56_cifar10_ice dataset.root=../shared/data/cifar10-jpeg.tar.gz
    # scaling: ResNet-20/56/110 at r = 0.6, and ResNet-56 at r = 0.3/0.6/0.9
    icep bench pipelines --scaling \\
        +experiment=resnet56_cifar10_ice dataset.root=../shared/data/cifar10-jpeg.tar.gz
    # toy size on the CPU (digits)
    icep bench pipelines --seeds 0,1 trainer.device=cpu dense.epochs=5
    (from a checkout also: python experiments/bench_pipelines.py ...)

Every argument that is not an option of this script is a Hydra override for each run, as in
``icep compare`` (icep/bench/compare.py), whose runner this uses: each run is `python -m icep` into
OUT/<part>/<variant>/. Each seed's dense model is trained once, by its first run, and cached for
the other variants (icep's dense cache is keyed on the seed, since the val split is);
`--reuse-dense` starts every seed from the first seed's dense model instead (`model.checkpoint=`),
saving its training at the price of later seeds deciding on samples it was trained on. The dense
test accuracies head the table. Tables go to OUT/bench_pipelines.md and .csv (OUT/scaling.* and
scaling.png with --scaling), rewritten after each seed (point), so a run stopped from outside
keeps what it finished.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

from icep.bench import compare

GOAL_SPEEDUP = 9.6  # the paper's best case
GOAL_ACC_POINTS = 1.0  # final test accuracy within this of the baseline's

# Aggregated columns: key, title, format.
AGGREGATE = [
    ("acc_final_test", "test acc (%)", "{:.2f}"),
    ("drop_test", "test drop (pts)", "{:.2f}"),
    ("cost_s", "cost (s)", "{:.1f}"),
    ("time_search_s", "of which search (s)", "{:.1f}"),
    ("finetunes", "fine-tunes", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("cost_flops", "compute", compare.format_flops),
    ("compute_speedup", "compute speed-up", "{:.2f}x"),
]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, in order")
    parser.add_argument("--variants", default="baseline,ice,ice_tuned")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="start no seed that the first seed's time says would end after this",
    )
    parser.add_argument(
        "--reuse-dense",
        action="store_true",
        help="start every seed from the first seed's dense model (saves its training; later "
        "seeds' val splits then hold samples it was trained on)",
    )
    parser.add_argument("--scaling", action="store_true", help="the scaling tables instead")
    parser.add_argument("--models", default="resnet20,resnet56,resnet110")
    parser.add_argument("--ratios", default="0.3,0.6,0.9")
    parser.add_argument("--ratio-model", default="resnet56", help="the model the ratios run on")
    parser.add_argument("--ratio", type=float, default=0.6, help="the ratio the models run at")
    args, overrides = parser.parse_known_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2")
    try:
        args.ratios = [float(r) for r in args.ratios.split(",") if r]
    except ValueError:
        parser.error(f"--ratios {args.ratios!r}: expected comma-separated numbers, e.g. 0.3,0.6")
    bad = [r for r in [*args.ratios, args.ratio] if not 0 < r < 1]
    if bad:
        parser.error(f"ratio {bad[0]}: a pruning ratio lies strictly between 0 and 1")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in compare.VARIANTS]
    if unknown or "baseline" not in args.variants:
        what = f"unknown variant {unknown[0]!r}" if unknown else "the baseline is missing"
        parser.error(f"{what}; --variants takes baseline and any of {', '.join(compare.VARIANTS)}")
    args.models = [m for m in args.models.split(",") if m]
    known = sorted(p.name[: -len(".yaml")] for p in (files("icep.conf") / "model").iterdir())
    missing = [m for m in [*args.models, args.ratio_model] if m not in known]
    if missing:
        parser.error(f"unknown model {missing[0]!r}; choose from {', '.join(known)}")
    if not args.seeds:
        parser.error("--seeds is empty; give at least one seed")
    return args, overrides


# --- pipelines over seeds -------------------------------------------------------------------------


class Runner:
    """Runs variants with compare_pipelines' runner. Each seed's dense model is trained by its
    first run and cached (the variants of a seed share it); with ``reuse_dense`` the first seed's
    dense model is the start of every later run too."""

    def __init__(self, overrides: list[str], reuse_dense: bool = False):
        self.overrides = overrides
        self.reuse_dense = reuse_dense
        self.dense: str | None = None  # the first run's dense model file
        self.dense_acc: dict[int, float] = {}  # seed -> the dense model's test accuracy

    def __call__(self, variant: str, seed: int, out: Path) -> dict:
        start = [f"model.checkpoint={self.dense}"] if self.dense and self.reuse_dense else []
        row = compare.run_variant(variant, [*self.overrides, f"seed={seed}", *start], out)
        source = str(row.get("dense", {}).get("source", ""))
        if self.dense is None and source.endswith(".pt"):
            self.dense = source
        if "acc_original_test" in row:
            self.dense_acc.setdefault(seed, row["acc_original_test"])
        return row


def seeds_that_fit(done: int, elapsed_s: float, budget_s: float | None, left: int) -> int:
    """How many more seeds to start: all ``left`` without a budget, else as many as the mean
    time per seed so far says fit in what remains of it."""
    if budget_s is None or done == 0:
        return left
    per_seed = elapsed_s / done
    return max(0, min(left, int((budget_s - elapsed_s) // per_seed)))


def aggregate(per_seed: dict[int, list[dict]], variants: list[str]) -> list[dict]:
    """Per variant: mean and std over seeds of the AGGREGATE columns; the speed-up is the mean of
    the per-seed ratios (each seed's baseline cost over the variant's)."""
    rows = []
    for variant in variants:
        runs = [r for rows_ in per_seed.values() for r in rows_ if r["variant"] == variant]
        done = [r for r in runs if "cost_s" in r]
        row: dict = {"variant": variant, "seeds": len(done), "failed": len(runs) - len(done)}
        for key, _, _ in AGGREGATE:
            values = [float(r.get(key, 0.0)) for r in done if key in r or key == "time_search_s"]
            if values:
                row[key] = statistics.fmean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def goal_lines(summary: list[dict]) -> list[str]:
    """Each ICE variant against the goals: at least GOAL_SPEEDUP times faster than the baseline,
    final test accuracy within GOAL_ACC_POINTS of it."""
    base = next((r for r in summary if r["variant"] == "baseline" and "cost_s" in r), None)
    lines = []
    for row in summary:
        if row["variant"] == "baseline" or "cost_s" not in row or base is None:
            continue
        diff = row["acc_final_test"] - base["acc_final_test"]
        fast = row["speedup"] >= GOAL_SPEEDUP
        close = abs(diff) <= GOAL_ACC_POINTS
        compute = (
            f", compute speed-up {row['compute_speedup']:.2f}x"
            if row.get("compute_speedup") is not None
            else ""
        )
        lines.append(
            f"- {row['variant']}: speed-up {row['speedup']:.2f}x (goal >= {GOAL_SPEEDUP}x: "
            f"{'met' if fast else 'not met'}){compute}, test accuracy {diff:+.2f} points against "
            f"the baseline (goal within {GOAL_ACC_POINTS:g}: {'met' if close else 'not met'})"
        )
    return lines


def summary_markdown(summary: list[dict], head: dict, overrides: list[str]) -> str:
    dense = head.get("dense_acc", {})
    trained = (
        "once, by the first seed, and every run starts from it (val splits differ by seed: later "
        "seeds decide on samples it was trained on)"
        if head.get("reuse_dense")
        else "once per seed, shared by that seed's variants"
    )
    dense_acc = ", ".join(f"seed {s}: {a:.2f}%" for s, a in dense.items()) or "none finished"
    lines = [
        "# Baseline iterative vs ICE-Pruning over seeds",
        "",
        f"Model {head.get('model')}, dataset {head.get('dataset')}, ratio {head.get('ratio')}, "
        f"device {head.get('device')}, seeds {head.get('seeds')}. Dense model trained {trained}; "
        f"its test accuracy: {dense_acc}.",
        f"Overrides: `{' '.join(overrides) or '(none)'}`",
        "Mean ± std over seeds. Cost: pipeline time plus, for a tuned run, the search; speed-up: "
        "the mean over seeds of the baseline's cost over the variant's. Compute: the FLOPs "
        "counted in the same phases (README, Compute accounting); compute speed-up: the same "
        "ratio of them.",
        "",
        "| variant | seeds | " + " | ".join(title for _, title, _ in AGGREGATE) + " |",
        "|" + "---|" * (len(AGGREGATE) + 2),
    ]
    for row in summary:
        cells = []
        for key, _, fmt in AGGREGATE:
            if key not in row:
                cells.append("")
                continue
            spread = (
                f" ± {compare.cell(row, f'{key}_std', fmt).rstrip('x')}" if row["seeds"] > 1 else ""
            )
            cells.append(compare.cell(row, key, fmt) + spread)
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        lines.append(f"| {row['variant']} | {row['seeds']}{failed} | " + " | ".join(cells) + " |")
    lines += ["", *goal_lines(summary)]
    return "\n".join(lines) + "\n"


def bench_pipelines(args: argparse.Namespace, overrides: list[str], out: Path) -> int:
    run = Runner(overrides, reuse_dense=args.reuse_dense)
    per_seed: dict[int, list[dict]] = {}
    budget = args.budget_minutes * 60 if args.budget_minutes is not None else None
    start = time.perf_counter()
    for i, seed in enumerate(args.seeds):
        left = len(args.seeds) - i
        if seeds_that_fit(i, time.perf_counter() - start, budget, left) == 0:
            print(f"[bench] budget: seeds {args.seeds[i:]} would not fit; stopping", flush=True)
            break
        print(f"[bench] seed {seed} ({i + 1}/{len(args.seeds)})", flush=True)
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = compare.table([run(v, seed, folder) for v in args.variants])
        (folder / "comparison.md").write_text(compare.markdown(rows, [*overrides, f"seed={seed}"]))
        per_seed[seed] = rows
        # Written after every seed, so a run stopped from outside keeps the seeds it finished.
        text = write_bench(out, args, overrides, per_seed, run)
    if not per_seed:
        text = write_bench(out, args, overrides, per_seed, run)
    print(text)
    print(f"written: {out / 'bench_pipelines.md'}, {out / 'bench_pipelines.csv'}")
    ok = all("cost_s" in r for rows in per_seed.values() for r in rows)
    return 0 if ok and per_seed else 1


def write_bench(
    out: Path,
    args: argparse.Namespace,
    overrides: list[str],
    per_seed: dict[int, list[dict]],
    run: Runner,
) -> str:
    """Write OUT/bench_pipelines.md and .csv for the seeds done so far; return the markdown."""
    summary = aggregate(per_seed, args.variants)
    first = next((r for rows in per_seed.values() for r in rows if "cost_s" in r), {})
    head = {
        **{k: first.get(k) for k in ("model", "dataset", "ratio", "device")},
        "seeds": ",".join(map(str, per_seed)),
        "dense_acc": run.dense_acc,
        "reuse_dense": args.reuse_dense,
    }
    text = summary_markdown(summary, head, overrides)
    for seed, rows in per_seed.items():
        text += f"\n## Seed {seed}\n\n" + compare.markdown(rows, [f"seed={seed}"]).split("\n", 2)[2]
    (out / "bench_pipelines.md").write_text(text)
    write_csv(
        out / "bench_pipelines.csv", [{**r, "seed": s} for s, rs in per_seed.items() for r in rs]
    )
    return text


# --- scaling --------------------------------------------------------------------------------------

SCALING = [
    ("axis", "varied", "{}"),
    ("model", "model", "{}"),
    ("ratio", "ratio", "{:g}"),
    ("units", "pruning steps", "{}"),
    ("baseline_s", "baseline (s)", "{:.1f}"),
    ("ice_s", "ICE (s)", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("baseline_flops", "baseline compute", compare.format_flops),
    ("ice_flops", "ICE compute", compare.format_flops),
    ("compute_speedup", "compute speed-up", "{:.2f}x"),
    ("baseline_finetunes", "baseline fine-tunes", "{}"),
    ("ice_finetunes", "ICE fine-tunes", "{}"),
    ("baseline_acc", "baseline test (%)", "{:.2f}"),
    ("ice_acc", "ICE test (%)", "{:.2f}"),
]


def scaling_row(axis: str, model: str, ratio: float, rows: list[dict]) -> dict:
    runs = {r["variant"]: r for r in rows if "cost_s" in r}
    row = {"axis": axis, "model": model, "ratio": ratio}
    base, ice = runs.get("baseline"), runs.get("ice")
    if base is not None:
        row.update(units=base["steps"], baseline_s=base["cost_s"])
        row.update(baseline_finetunes=base["finetunes"], baseline_acc=base["acc_final_test"])
    if ice is not None:
        row.update(ice_s=ice["cost_s"], ice_finetunes=ice["finetunes"])
        row.update(ice_acc=ice["acc_final_test"], units=row.get("units", ice["steps"]))
    for name, run in (("baseline", base), ("ice", ice)):
        if run is not None and run.get("cost_flops"):
            row[f"{name}_flops"] = run["cost_flops"]
    if base is not None and ice is not None:
        row["speedup"] = base["cost_s"] / ice["cost_s"]
        if ice.get("compute_speedup") is not None:
            row["compute_speedup"] = ice["compute_speedup"]
    return row


def scaling_markdown(rows: list[dict], overrides: list[str]) -> str:
    lines = [
        "# Pipeline time against model size and ratio",
        "",
        f"Overrides: `{' '.join(overrides) or '(none)'}`. Time: the pipeline's own (prune, "
        "fine-tune, evaluations, ICE's freeze analysis), the dense model excluded.",
        "",
        "| " + " | ".join(title for _, title, _ in SCALING) + " |",
        "|" + "---|" * len(SCALING),
    ]
    for row in rows:
        cells = [compare.cell(row, key, fmt) or "failed" for key, _, fmt in SCALING]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scaling(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, x_key, label in (
        (axes[0], "model", "units", "pruning steps (units of the model)"),
        (axes[1], "ratio", "ratio", "pruning ratio"),
    ):
        part = [r for r in rows if r["axis"] == axis and "speedup" in r]
        for key, name in (("baseline_s", "baseline"), ("ice_s", "ICE")):
            ax.plot([r[x_key] for r in part], [r[key] for r in part], marker="o", label=name)
        for r in part:
            ax.annotate(r["model"] if axis == "model" else "", (r[x_key], r["baseline_s"]))
        ax.set_xlabel(label)
        ax.set_ylabel("pipeline time (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_scaling(args: argparse.Namespace, overrides: list[str], out: Path) -> int:
    plan = [("model", m, args.ratio) for m in args.models]
    plan += [
        ("ratio", args.ratio_model, r)
        for r in args.ratios
        if (args.ratio_model, r) not in {(m, args.ratio) for m in args.models}
    ]
    done: dict[tuple[str, float], list[dict]] = {}
    rows: list[dict] = []
    table: list[dict] = []
    for axis, model, ratio in plan:
        key = (model, ratio)
        if key not in done:
            print(f"[bench] {model} at r = {ratio}", flush=True)
            folder = out / f"{model}-r{ratio:g}"
            folder.mkdir(parents=True, exist_ok=True)
            extra = [f"model={model}", f"pipeline.ratio={ratio}"]
            done[key] = compare.table(
                [compare.run_variant(v, [*overrides, *extra], folder) for v in ("baseline", "ice")]
            )
        rows.append(scaling_row(axis, model, ratio, done[key]))
        # Written after every point, so a run stopped from outside keeps the points it finished.
        table = write_scaling(out, rows, args.ratio_model, overrides)
    print(scaling_markdown(table, overrides))
    print(f"written: {out / 'scaling.md'}, {out / 'scaling.csv'}")
    return 0 if table and all("speedup" in r for r in table) else 1


def write_scaling(
    out: Path, rows: list[dict], ratio_model: str, overrides: list[str]
) -> list[dict]:
    """Write OUT/scaling.md, .csv and (where a point has both pipelines) .png; return the rows."""
    # The ratio model at the shared ratio also belongs on the ratio axis.
    shared = [r for r in rows if r["axis"] == "model" and r["model"] == ratio_model]
    rows = rows + [{**r, "axis": "ratio"} for r in shared]
    rows.sort(key=lambda r: (r["axis"] != "model", r.get("units", 0), r["ratio"]))
    (out / "scaling.md").write_text(scaling_markdown(rows, overrides))
    write_csv(out / "scaling.csv", rows)
    if any("speedup" in r for r in rows):
        plot_scaling(rows, out / "scaling.png")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    out = args.out or Path("outputs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    if args.scaling:
        return bench_scaling(args, overrides, out)
    return bench_pipelines(args, overrides, out)


if __name__ == "__main__":
    sys.exit(main())
