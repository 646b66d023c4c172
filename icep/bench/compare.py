"""The paper's comparison: baseline iterative vs ICE-Pruning and each ICE ablation, on the same
model, data, ratio and seed, in one table.

    icep compare                                                  # toy: digits, CPU
    icep compare +experiment=resnet56_cifar10_ice dataset.root=PATH
    (from a checkout also: python experiments/compare_pipelines.py ...)

Every argument that is not an option of this script is a Hydra override passed to each run
(`tune.*` overrides only to the tuned variant). Each
variant runs as `python -m icep` into OUT/<variant>/; the dense model is trained once (by the
first variant) and reused from the cache by the others. The table goes to OUT/comparison.md and
OUT/comparison.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from icep.compute import format_flops

# variant -> the overrides that make it. All share the caller's overrides.
VARIANTS = {
    "baseline": ["pipeline=iterative"],
    "ice": ["pipeline=ice"],
    "ice_no_trigger": ["pipeline=ice", "pipeline.trigger=false"],
    "ice_no_freeze": ["pipeline=ice", "pipeline.freeze=false"],
    "ice_no_adaptive_lr": ["pipeline=ice", "pipeline.adaptive_lr=false"],
    # ICE with its auto-tuning stage (a seeded grid over the paper's grid): the search counts.
    "ice_tuned": ["pipeline=ice", "tune=grid"],
}

COLUMNS = [
    ("variant", "variant", "{}"),
    ("acc_final_val", "val acc (%)", "{:.2f}"),
    ("acc_final_test", "test acc (%)", "{:.2f}"),
    ("drop_test", "test drop (pts)", "{:.2f}"),
    ("cost_s", "cost (s)", "{:.1f}"),
    ("time_search_s", "of which search (s)", "{:.1f}"),
    ("time_total_s", "pipeline (s)", "{:.1f}"),
    ("time_prune_s", "prune (s)", "{:.2f}"),
    ("time_finetune_s", "fine-tune (s)", "{:.1f}"),
    ("time_eval_s", "eval (s)", "{:.1f}"),
    ("time_freeze_analysis_s", "freeze analysis (s)", "{:.1f}"),
    ("finetunes", "fine-tunes", "{}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("cost_flops", "compute", format_flops),
    ("compute_speedup", "compute speed-up", "{:.2f}x"),
    ("params_after", "params", "{:,}"),
    ("macs_after", "MACs", "{:,}"),
]


def run_variant(name: str, overrides: list[str], out: Path, timeout: float | None = None) -> dict:
    """``python -m icep`` for variant ``name`` into OUT/<name>/; its summary as a row, or a
    failed row with the reason. ``timeout`` (seconds): stop it then; its checkpoint stays in the
    run folder, and a later call with ``resume=true`` among the overrides continues it."""
    run_dir = out / name
    if not any(o.startswith("tune=") for o in VARIANTS[name]):  # tune.* only where tuning runs
        overrides = [o for o in overrides if not o.lstrip("+~").startswith("tune.")]
    cmd = [sys.executable, "-m", "icep", *overrides, *VARIANTS[name], f"hydra.run.dir={run_dir}"]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        log = [(x or b"").decode(errors="replace") for x in (exc.stdout, exc.stderr)]
        (out / f"{name}.log").write_text("".join(log))
        reason = f"stopped after {timeout:.0f}s (resume=true continues it from {run_dir})"
        print(f"[{name}] {reason}", flush=True)
        return {"variant": name, "status": "stopped", "reason": reason}
    (out / f"{name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"[{name}] failed: {last} (log: {out / f'{name}.log'})", flush=True)
        return {"variant": name, "status": "failed", "reason": last}
    summary = json.loads((run_dir / "summary.json").read_text())
    print(
        f"[{name}] done in {time.perf_counter() - start:.0f}s: test {summary['acc_final_test']:.2f}%, "
        f"{summary['finetunes']} fine-tunes, pipeline time {summary['time_total_s']:.1f}s, "
        f"{format_flops(summary.get('flops_total', 0))}",
        flush=True,
    )
    return {"variant": name, **summary}


def table(rows: list[dict]) -> list[dict]:
    """Add the accuracy drop, the cost (pipeline time, plus the search for a tuned run) and the
    speed-up over the baseline's cost, in time and in counted FLOPs (icep.compute)."""
    baseline = next((r for r in rows if r["variant"] == "baseline" and "time_total_s" in r), None)
    for row in rows:
        if "time_total_s" not in row:
            continue
        row["drop_test"] = row["acc_original_test"] - row["acc_final_test"]
        row["drop_val"] = row["acc_original_val"] - row["acc_final_val"]
        row["time_freeze_analysis_s"] = row.get("time_freeze_analysis_s", 0.0)
        row["cost_s"] = row.get("time_total_with_search_s", row["time_total_s"])
        if "flops_total" in row:
            row["cost_flops"] = row.get("flops_total_with_search", row["flops_total"])
    for row in rows:
        if baseline is not None and "cost_s" in row:
            row["speedup"] = baseline["cost_s"] / row["cost_s"]
        if baseline is not None and row.get("cost_flops") and baseline.get("cost_flops"):
            row["compute_speedup"] = baseline["cost_flops"] / row["cost_flops"]
    return rows


def markdown(rows: list[dict], overrides: list[str]) -> str:
    done = [r for r in rows if "time_total_s" in r]
    head = done[0] if done else {}
    lines = [
        "# Baseline iterative vs ICE-Pruning",
        "",
        f"Model {head.get('model')}, dataset {head.get('dataset')}, ratio {head.get('ratio')}, "
        f"seed {head.get('seed')}, device {head.get('device')}. Unpruned: val "
        f"{head.get('acc_original_val', float('nan')):.2f}%, test "
        f"{head.get('acc_original_test', float('nan')):.2f}%.",
        f"Overrides: `{' '.join(overrides) or '(none: the embedded default)'}`",
        "Pipeline time: prune, fine-tune, validation evaluations, ICE's freeze analysis. Cost: "
        "the pipeline time, plus the search for a tuned run; speed-up is the baseline's cost "
        "over the variant's. Compute: the FLOPs counted in the same phases (README, Compute "
        "accounting), the same on any machine; compute speed-up is their ratio.",
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        if "time_total_s" not in row:
            lines.append(
                f"| {row['variant']} | {row.get('status', 'failed')}: {row.get('reason', '')} |"
            )
            continue
        cells = [cell(row, key, fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cell(row: dict, key: str, fmt) -> str:
    """``row[key]`` through ``fmt`` (a format string or a function); empty when missing."""
    if row.get(key) is None:
        return ""
    return fmt(row[key]) if callable(fmt) else fmt.format(row[key])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="icep compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}",
    )
    args, overrides = parser.parse_known_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    out = args.out or Path("outputs") / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    rows = table([run_variant(name, overrides, out) for name in names])
    (out / "comparison.md").write_text(markdown(rows, overrides))
    with (out / "comparison.csv").open("w", newline="") as f:
        keys = ["variant", "status", "acc_original_val", "acc_original_test", "drop_val"] + [
            k for k, _, _ in COLUMNS if k != "variant"
        ]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows, overrides))
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}")
    return 0 if all("time_total_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
