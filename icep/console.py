"""The closing report a run prints: accuracy before and after, size, fine-tunes, time and compute
per phase, and where the outputs are."""

from __future__ import annotations

from typing import Any

from icep.compute import format_flops


def scalars(d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` whose values are numbers, strings, booleans or None."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: float | None) -> str:
    """An accuracy, or "n/a" for a split the run does not have (dataset.val_fraction=0)."""
    return "n/a" if v is None else f"{v:.2f}"


def _count(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(int(n))


def _share(s: dict[str, Any]) -> str:
    """How much the run pruned: a per-unit ratio, or a schedule's target and where it ended; a
    budget and what met it."""
    budget = s.get("budget")
    if budget:
        how = "ratio" if "ratio" in budget else "target"
        found = f"{how} {budget[how]:.4g}"
        return f"budget {budget['kind']} {budget['share']:g}: {budget['reached']:.4f} left, {found}"
    if s.get("target") is None:
        return f"ratio {s.get('ratio')}"
    if "sparsity" in s:
        return f"target {s['target']}, sparsity {s['sparsity']:.4f}"
    return f"target {s['target']}, channels pruned {s['channels_pruned_share']:.4f}"


_PHASE_LABELS = (
    ("prune", "prune"),
    ("finetune", "fine-tune"),
    ("eval", "eval"),
    ("freeze_analysis", "freeze analysis"),
)


def _latencies(s: dict[str, Any]) -> list[tuple[int, float]]:
    """(batch size, ms after pruning) of each size the summary holds a latency for."""
    found = []
    for key, value in s.items():
        if key.startswith("latency_b") and key.endswith("_after_ms"):
            found.append((int(key[len("latency_b") : -len("_after_ms")]), value))
    return sorted(found)


def format_table(s: dict[str, Any]) -> str:
    """The closing report: accuracy, size, fine-tunes, time per phase, where the outputs are."""
    if s["pipeline"] == "dense":
        return (
            f"\nicep: dense {s['model']} on {s['dataset']} ({s['device']}): val {_pct(s['acc_val'])}%, "
            f"test {_pct(s['acc_test'])}%\nmodel: {s['model_path']}\n"
        )
    rows = [
        ("", "before", "after"),
        ("val accuracy (%)", _pct(s["acc_original_val"]), _pct(s["acc_final_val"])),
        ("test accuracy (%)", _pct(s["acc_original_test"]), _pct(s["acc_final_test"])),
        ("params", _count(s["params_before"]), _count(s["params_after"])),
        ("MACs", _count(s["macs_before"]), _count(s["macs_after"])),
        *(
            (f"latency b{size} (ms)", f"{s[f'latency_b{size}_before_ms']:.3g}", f"{after:.3g}")
            for size, after in _latencies(s)
        ),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"\nicep: {s['pipeline']} pruning of {s['model']} on {s['dataset']} "
        f"({_share(s)}, {s['device']})"
    ]
    lines += [f"  {a:<{width}}{b:>10}  {c:>10}" for a, b, c in rows]
    final = s.get("final_finetune") or {}
    finetuned = f"{s['finetunes'] - bool(final)} of {s['steps']} steps"
    if final:
        finetuned += f", then {final['epochs']} recovery epochs"
    if "params_ratio" in s:  # summaries written before icep measured latency have none
        left = [f"params x{s['params_ratio']:.3f}", f"MACs x{s['macs_ratio']:.3f}"]
        speedups = [f"b{size} {s[f'inference_speedup_b{size}']:.2f}x" for size, _ in _latencies(s)]
        if speedups:
            left.append(f"measured speed-up {', '.join(speedups)}")
        lines.append(f"  {'left':<{width}}" + ", ".join(left))
    lines.append(f"  {'fine-tuned':<{width}}{finetuned}")
    if s.get("step_data"):
        step = s["step_data"]
        split = s["decision_split"]
        lines.append(
            f"  {'step data':<{width}}{step['train_images']} train images, "
            f"{step[f'{split}_images']} {split} images (unpruned "
            f"{_pct(step[f'acc_original_{split}']).strip()}% on them)"
        )
    if "finetunes_skipped" in s:
        lines.append(f"  {'fine-tunes skipped':<{width}}{s['finetunes_skipped']}")
        share = s["frozen_params"] / max(s["params_after"], 1)
        lines.append(
            f"  {'frozen':<{width}}{len(s['frozen_layers'])} layers, {100 * share:.1f}% of the "
            "remaining params"
        )
    lines.append(
        f"  {'time (s)':<{width}}{s['time_total_s']:.2f} total = prune {s['time_prune_s']:.2f}"
        f" + fine-tune {s['time_finetune_s']:.2f} + eval {s['time_eval_s']:.2f}"
        + (
            f" + freeze analysis {s['time_freeze_analysis_s']:.2f}"
            if s["time_freeze_analysis_s"]
            else ""
        )
    )
    if "flops_total" in s:
        parts = [
            f"{label} {format_flops(s.get(f'flops_{phase}', 0))}"
            for phase, label in _PHASE_LABELS
            if s.get(f"flops_{phase}") or phase != "freeze_analysis"
        ]
        lines.append(
            f"  {'compute':<{width}}{format_flops(s['flops_total'])} total = " + " + ".join(parts)
        )
        lines.append(
            f"  {'images':<{width}}{_count(s['images_fwd_total'])} forward, "
            f"{_count(s['images_bwd_total'])} backward"
        )
    if "time_search_s" in s:
        t = s["tuning"]
        lines.append(
            f"  {'time with search':<{width}}{s['time_total_with_search_s']:.2f} = search "
            f"{s['time_search_s']:.2f} ({t['complete']} complete, {t['pruned']} pruned, "
            f"{t['fail']} failed trials) + this run {s['time_final_s']:.2f}"
        )
        if "flops_search" in s:
            lines.append(
                f"  {'compute with search':<{width}}{format_flops(s['flops_total_with_search'])} "
                f"= search {format_flops(s['flops_search'])} + this run "
                f"{format_flops(s['flops_total'])}"
            )
        lines.append(
            f"  {'tuned':<{width}}" + ", ".join(f"{k}={_num(v)}" for k, v in t["params"].items())
        )
    if s["dense"].get("dense_seconds"):
        flops = s["dense"].get("dense_flops")
        lines.append(
            f"  {'dense training (s)':<{width}}{s['dense']['dense_seconds']:.1f}"
            + (f", {format_flops(flops)}" if flops else "")
            + " (not in the totals)"
        )
    lines.append(f"  {'outputs':<{width}}{s['output_dir']}")
    return "\n".join(lines) + "\n"
