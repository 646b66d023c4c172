"""Pruning to a budget (pipeline.target={macs: S} | {params: S}) and to widths that are multiples
of pipeline.round_to; the measured latency beside them (issue 19.5, 19.6)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, run_icep

from icep.config import Budget
from icep.errors import ConfigError
from icep.latency import latency_fields, measure_latency
from icep.models import cifar_resnet
from icep.pruning import L1, PruningEngine, count_macs_params
from icep.pruning.budget import blockwise_widths, schedule_widths, solve
from icep.train import Trainer

X = torch.zeros(1, 1, 8, 8)


def _engine(round_to: int = 1) -> PruningEngine:
    torch.manual_seed(0)
    return PruningEngine(cifar_resnet(20, num_classes=10, in_channels=1), X, round_to=round_to)


@pytest.mark.parametrize(
    "kind, share, round_to, widths_for",
    [
        ("macs", 0.5, 1, blockwise_widths),
        ("params", 0.4, 8, blockwise_widths),
        ("macs", 0.7, 4, schedule_widths),
    ],
)
def test_a_solved_budget_is_met_within_two_percent(kind, share, round_to, widths_for):
    engine = _engine(round_to)
    before = count_macs_params(engine.model, X)
    solution = solve(engine, X, Budget(kind, share), widths_for)
    assert 0.98 * share <= solution.reached <= share
    # The plan, applied to the model itself, keeps what the solver counted on its copies.
    engine.prune_to_widths(solution.plan, L1())
    after = count_macs_params(engine.model, X)
    kept = after[0] / before[0] if kind == "macs" else after[1] / before[1]
    assert kept == pytest.approx(solution.reached, abs=1e-12)
    for name, width in engine.unit_widths().items():
        assert width % round_to == 0 or width == engine.original_widths[name], (name, width)


def test_a_budget_beyond_reach_is_refused_naming_what_is_left():
    with pytest.raises(ConfigError, match=r"macs 0.01 cannot be met: pruning every unit as far"):
        solve(_engine(), X, Budget("macs", 0.01), blockwise_widths)


def test_round_to_keeps_every_pruned_width_a_multiple():
    engine = _engine(round_to=8)
    assert engine.rounded("layer3.0.conv1", 61) == 64  # nearest multiple, at most the width
    assert engine.rounded("layer3.0.conv1", 43) == 40
    assert engine.rounded("layer3.0.conv1", 2) == 8  # at least one multiple
    for unit in range(len(engine.units)):
        engine.prune_unit(unit, 0.3, L1())
    widths = engine.unit_widths()
    # 16 channels: ceil(0.3 * 16) = 5 cut leaves 11, rounded to 8; 32 -> 22 -> 24; 64 -> 44 -> 48
    assert set(widths.values()) == {8, 24, 48}
    plain = _engine()
    for unit in range(len(plain.units)):
        plain.prune_unit(unit, 0.3, L1())
    assert set(plain.unit_widths().values()) == {11, 22, 44}


def test_latency_is_a_median_per_batch_size_and_leaves_the_model_as_it_was():
    model = cifar_resnet(20, num_classes=10, in_channels=1).train()
    found = measure_latency(model, (1, 8, 8), Trainer(torch.device("cpu")), [1, 4], 0.01, 1)
    assert sorted(found) == [1, 4] and all(ms > 0 for ms in found.values())
    assert model.training
    fields = latency_fields({1: 2.0, 4: 6.0}, {1: 1.0, 4: 4.0})
    assert fields == {
        "latency_b1_before_ms": 2.0,
        "latency_b1_after_ms": 1.0,
        "inference_speedup_b1": 2.0,
        "latency_b4_before_ms": 6.0,
        "latency_b4_after_ms": 4.0,
        "inference_speedup_b4": 1.5,
    }


@pytest.mark.slow  # 30 s; the quick suite runs a budget through the app in process (below)
def test_ice_meets_a_macs_budget_in_widths_of_four_and_reports_its_speed(tmp_path, cache_dir):
    out = tmp_path / "run"
    args = [*FAST, "pipeline=ice", "pipeline.target={macs: 0.5}", "pipeline.round_to=4"]
    done = run_icep([*args, "latency.batch_sizes=[1,8]"], out, cache_dir)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    budget = summary["budget"]
    assert budget["kind"] == "macs" and budget["share"] == 0.5 and budget["met"]
    assert 0.49 <= budget["reached"] == summary["macs_ratio"] <= 0.5
    assert summary["ratio"] == budget["ratio"] != 0.6  # found, not the config's
    assert summary["macs_ratio"] == summary["macs_after"] / summary["macs_before"]
    for size in (1, 8):
        before, after = summary[f"latency_b{size}_before_ms"], summary[f"latency_b{size}_after_ms"]
        assert summary[f"inference_speedup_b{size}"] == pytest.approx(before / after)
    layers = torch.load(out / "model.pt", weights_only=True)["layers"]
    pruned = {n: a["out_channels"] for n, a in layers.items() if n.endswith(".conv1")}
    assert all(w % 4 == 0 for w in pruned.values()) and min(pruned.values()) < 16
    assert "budget macs 0.5: 0.4" in done.stdout and "latency b8 (ms)" in done.stdout
    assert "measured speed-up b1 " in done.stdout


def test_a_latency_budget_is_searched_on_measurements(monkeypatch):
    """The search takes any measure of a model (here a stand-in for timing: its parameter count,
    so the test does not hinge on this machine's speed) and skips the per-unit finish."""
    engine = _engine()
    calls = []

    def fake_latency(model):
        calls.append(1)
        return float(sum(p.numel() for p in model.parameters()))

    solution = solve(engine, X, Budget("latency", 0.5), blockwise_widths, fake_latency)
    ratio_only = blockwise_widths(engine, solution.ratio)
    assert solution.plan == ratio_only  # no finish on noisy measurements
    assert solution.reached <= 0.5 and len(calls) < 20


def test_a_run_with_a_latency_budget_judges_it_by_its_own_measurement(place, monkeypatch, capsys):
    from places import call_main

    import icep.latency

    def fake(model, input_shape, trainer, batch_sizes, min_run_time=0.5, warmup=3):
        params = sum(p.numel() for p in model.parameters())
        return {size: params * size / 1e5 for size in batch_sizes}

    monkeypatch.setattr(icep.latency, "measure_latency", fake)
    args = [*FAST, "pipeline=one_shot", "pipeline.target={latency: 0.6, batch: 4}"]
    args += ["latency.batch_sizes=[1]", "pipeline.round_to=4"]
    code, out, err = call_main(args, place, monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads((place.run_dir / "summary.json").read_text())
    budget = summary["budget"]
    assert (budget["kind"], budget["share"], budget["batch"]) == ("latency", 0.6, 4)
    assert budget["reached"] == pytest.approx(1 / summary["inference_speedup_b4"])
    assert budget["reached"] == pytest.approx(budget["planned"]) and budget["met"]
    assert summary["target"] == budget["target"] and 0 < budget["target"] < 1
    assert "latency_b1_after_ms" in summary and "latency_b4_after_ms" in summary
    layers = torch.load(place.run_dir / "model.pt", weights_only=True)["layers"]
    widths = [a["out_channels"] for n, a in layers.items() if n.endswith(".conv1") and "." in n]
    assert all(w % 4 == 0 for w in widths) and min(widths) < 16
    assert "(budget latency 0.6: 0.5" in out and "latency b4 (ms)" in out


def test_a_resumed_run_keeps_the_solution_its_checkpoint_holds():
    """A latency budget measured again could come out otherwise: a resumed run takes the plan
    from its checkpoint's state (``run.state["budget"]``) and measures nothing."""
    from types import SimpleNamespace

    from icep.pipelines.iterative import Iterative
    from icep.pruning.budget import meet

    engine = _engine()
    run = SimpleNamespace(engine=engine, example_inputs=X, state={}, plan={}, trainer=None)
    pipeline = Iterative.__new__(Iterative)  # the keys meet() reads, no fine-tune policy
    pipeline.schedule, pipeline.ratio = "blockwise", 0.6
    pipeline.target = {"latency": 0.5, "batch": 4}
    plan = blockwise_widths(engine, 0.25)
    saved = {"ratio": 0.25, "plan": plan, "reached": 0.48}
    entry = meet(pipeline, run, solved=saved)  # run.trainer=None: any measurement would fail
    assert pipeline.ratio == 0.25 and run.plan == plan
    assert run.state["budget"] == saved
    assert entry == {"kind": "latency", "share": 0.5, "ratio": 0.25, "batch": 4, "planned": 0.48}


@pytest.mark.cuda
def test_latency_on_a_gpu_is_timed_with_cuda_events_under_autocast():
    model = cifar_resnet(20, num_classes=10, in_channels=3)
    trainer = Trainer(torch.device("cuda"), amp=True, channels_last=True)
    model = trainer.prepare(model)
    found = measure_latency(model, (3, 32, 32), trainer, [1, 256], 0.05, 3)
    assert sorted(found) == [1, 256] and all(ms > 0 for ms in found.values())
    assert model.training  # eval() only while timed
