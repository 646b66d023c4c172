"""Pruning to a budget instead of a ratio: ``pipeline.target={macs: 0.5}`` (or ``params``) keeps
at most that share of the unpruned model's MACs (parameters); ``{latency: 0.5, batch: 32}`` at
most that share of its measured inference latency at that batch size (icep.latency).

The pruned widths, not the weights, set both counts, and a ratio (or a schedule's share) gives
the same widths whatever the criterion picks, so the budget is solved before any pruning, on
copies of the model: :func:`solve` finds the smallest ratio whose widths fit the budget (a binary
search over the ratios where some layer's width changes), then lets the units before the last
that change take the widths of the next ratio down, one after another, as long as the budget
still holds. One ratio moves every layer of a width at once (a ResNet-56 stage), a step of a few
percent of the MACs; the per-unit finish lands the count within one unit's step of the budget,
under it. The result is a ``plan``, the width each unit layer ends at
(:class:`~icep.pipelines.base.PruningRun` never cuts below it), and the ratio a block-wise
pipeline prunes by (or the share a schedule ends at).

Latency is measured, not counted: each candidate's pruned copy is timed on the run's device
(``latency:`` settings) against the unpruned model timed the same way, and measurements are
noisy, so a latency budget takes the binary search's ratio without the per-unit finish; the
summary's ``reached`` is then the pruned model's own measurement.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from icep import distributed
from icep.config import Budget, parse_budget
from icep.errors import ConfigError
from icep.pruning.engine import PruningEngine, count_macs_params, uniform_widths

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Budget", "Solution", "meet", "parse_budget", "solve"]

log = logging.getLogger(__name__)


@dataclass
class Solution:
    """What meets a budget: the ``ratio`` (or schedule share), the width of each unit layer,
    and the share of the unpruned count they keep."""

    ratio: float
    plan: dict[str, int]
    reached: float


def counter(budget: Budget, example_inputs: Any) -> Callable[[nn.Module], float]:
    """What a MACs or params budget counts of a model."""
    index = 0 if budget.kind == "macs" else 1
    return lambda model: float(count_macs_params(model, example_inputs)[index])


def solve(
    engine: PruningEngine,
    example_inputs: Any,
    budget: Budget,
    widths_for: Callable[[PruningEngine, float], dict[str, int]],
    measure: Callable[[nn.Module], float] | None = None,
) -> Solution:
    """The smallest ratio (over ``widths_for(engine, ratio)``, the widths a pipeline's prune
    gives every unit layer) whose widths keep at most ``budget.share`` of what ``measure`` gives
    for the unpruned model (by default its MACs or params: :func:`counter`), finished per unit
    when ``measure`` counts."""
    counts = measure is None
    measure = counter(budget, example_inputs) if measure is None else measure
    total = measure(engine.model)
    counted: dict[tuple, float] = {}

    def share_of(widths: dict[str, int]) -> float:
        key = tuple(sorted(widths.items()))
        if key not in counted:
            model = copy.deepcopy(engine.model)
            twin = PruningEngine(model, example_inputs, _twin_ignored(engine, model))
            twin.prune_to_widths(widths)
            counted[key] = measure(model) / total
            del model, twin
        return counted[key]

    ratios = _breakpoints(engine)
    lowest = share_of(widths_for(engine, ratios[-1]))
    if lowest > budget.share:
        raise ConfigError(
            "pipeline.target",
            f"{budget} cannot be met: pruning every unit as far as it goes keeps {lowest:.3f} of "
            f"the {budget.kind} (units prune only inside blocks; the stem, the shortcuts and the "
            "classifier stay); give a larger share",
        )
    low, high = 0, len(ratios) - 1  # share_of(ratios[high]) <= budget < share_of(ratios[low])
    if share_of(widths_for(engine, ratios[0])) <= budget.share:
        high = 0
    while high - low > 1:
        middle = (low + high) // 2
        if share_of(widths_for(engine, ratios[middle])) <= budget.share:
            high = middle
        else:
            low = middle
    ratio = ratios[high]
    plan = widths_for(engine, ratio)
    if high > 0 and counts:
        # Units that the ratio below would leave wider take that width, one unit after another
        # in forward order, while the budget holds.
        wider = widths_for(engine, ratios[low])
        for unit in engine.units:
            trial = {**plan, **{n: wider[n] for n in unit.convs if wider[n] != plan[n]}}
            if trial != plan and share_of(trial) <= budget.share:
                plan = trial
    if engine.round_to > 1 and counts:
        # Rounded widths move in large steps: a unit may still take one more step.
        original = engine.unit_widths()
        for unit in engine.units:
            trial = dict(plan)
            for name in unit.convs:
                step = math.lcm(engine.round_to, engine.channel_groups.get(name, 1))
                trial[name] = min(original[name], plan[name] + step)
            if trial != plan and share_of(trial) <= budget.share:
                plan = trial
    return Solution(ratio=ratio, plan=plan, reached=share_of(plan))


def _twin_ignored(engine: PruningEngine, model: Any) -> list:
    """``engine``'s ignored layers, as the same layers of ``model`` (a deep copy)."""
    names = {id(m): n for n, m in engine.model.named_modules()}
    return [model.get_submodule(names[id(m)]) for m in engine.ignored_layers if id(m) in names]


def _breakpoints(engine: PruningEngine) -> list[float]:
    """Every ratio in (0, 1) at which ``ceil(ratio * s)`` changes for some unit layer (s: its
    channels per group), ascending: between two of them the widths are the same."""
    found = set()
    for name, width in engine.unit_widths().items():
        size = width // engine.channel_groups.get(name, 1)
        found.update(Fraction(k, size) for k in range(1, size))
    return [float(f) for f in sorted(found)] or [0.0]


def blockwise_widths(engine: PruningEngine, ratio: float) -> dict[str, int]:
    """The widths pruning every unit by ``ratio`` once gives (ICE, the block-wise baseline)."""
    return {
        n: w
        for i in range(len(engine.units))
        for n, w in engine.unit_widths_after(i, ratio).items()
    }


def schedule_widths(engine: PruningEngine, share: float) -> dict[str, int]:
    """The widths a uniform schedule ending at ``share`` gives (rounded as the run rounds)."""
    widths = uniform_widths(engine.original_widths, share, engine.channel_groups)
    return {n: engine.rounded(n, w) for n, w in widths.items()}


def meet(
    pipeline: Any, run: Any, latency: Any = None, solved: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """If ``pipeline.target`` is a budget: solve it on ``run``'s model (before any pruning, or
    before a resumed run restores its checkpoint) and set what the pipeline prunes by, its
    ``ratio`` (block-wise) or its final ``target`` share (a uniform schedule), and ``run.plan``.
    ``latency``: the ``latency:`` settings a latency budget is measured with. ``solved``: the
    solution a resumed run's checkpoint holds (``run.state["budget"]``), taken as it is: a
    latency budget measured again could come out otherwise. Returns the summary's ``budget``
    entry, or None without a budget."""
    budget = parse_budget(getattr(pipeline, "target", None))
    if budget is None:
        return None
    measure = None
    if budget.kind == "latency":
        measure = _timer(run, budget.batch, latency)
    blockwise = hasattr(pipeline, "ratio") and getattr(pipeline, "schedule", "blockwise") == (
        "blockwise"
    )

    if blockwise:
        widths_for = blockwise_widths
    elif getattr(pipeline, "scope", None) == "uniform" and pipeline.structure == "structured":
        widths_for = schedule_widths
    else:
        raise ConfigError(
            "pipeline.target",
            f"{type(pipeline).__name__} cannot prune to a budget; give a share",
        )
    if solved is not None:
        solution = Solution(solved["ratio"], dict(solved["plan"]), solved["reached"])
    else:
        solution = solve(run.engine, run.example_inputs, budget, widths_for, measure)
    if blockwise:
        pipeline.ratio = solution.ratio
    else:
        pipeline.target = solution.ratio
        for key in ("one_shot", "initial"):  # hybrid's first slice, AGP's starting share
            below = getattr(pipeline, key, None)
            if below is not None and below >= solution.ratio:
                raise ConfigError(
                    f"pipeline.{key}",
                    f"got {below}; the {budget} budget ends the schedule at the share "
                    f"{solution.ratio:.4g}: set {key} below it",
                )
    run.plan = solution.plan
    run.state["budget"] = dataclasses.asdict(solution)  # kept in every checkpoint
    what = "ratio" if blockwise else "target"
    log.info(
        "budget %s: %s %.4g, then %d unit layers one step wider: %.4f of the %s planned",
        budget,
        what,
        solution.ratio,
        sum(solution.plan[n] > w for n, w in widths_for(run.engine, solution.ratio).items()),
        solution.reached,
        budget.kind,
    )
    entry = {"kind": budget.kind, "share": budget.share, what: solution.ratio}
    if budget.kind == "latency":
        entry.update(batch=budget.batch, planned=solution.reached)
    return entry


def _timer(run: Any, batch: int, latency: Any) -> Callable[[nn.Module], float]:
    """The measured latency (ms) of a model at ``batch``, on ``run``'s device as it runs models."""
    from icep.latency import measure_latency

    min_run_time = 0.5 if latency is None else latency.min_run_time
    warmup = 3 if latency is None else latency.warmup
    shape = tuple(run.example_inputs.shape[1:])

    def time_it(model: nn.Module) -> float:
        model = run.trainer.prepare(model)
        found = measure_latency(model, shape, run.trainer, [batch], min_run_time, warmup)
        if batch not in found:
            raise ConfigError(
                "pipeline.target.batch",
                f"batch {batch} does not fit in the device's memory; give a smaller one",
            )
        return found[batch]

    # Measured on rank 0 of a data-parallel run: one timing decides for every rank.
    return lambda model: distributed.from_main(lambda: time_it(model))
