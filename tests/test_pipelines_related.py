"""The pipelines from the related work (METHOD.md section 4): schedules wired into the loop with
uniform and global scope, one-shot, hybrid, AGP, EPI, patience-based fine-tuning, unstructured
masks and resume. Runs are in-process on digits with a ResNet-8; one goes through the app."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    FAST,
    compose_config,
    digits_data,
    pipeline_overrides,
    read_jsonl,
    run_icep,
    trained_on_digits,
)
from hydra.utils import instantiate

from icep.config import validate
from icep.errors import ConfigError
from icep.loggers import RunLogger
from icep.models import cifar_resnet
from icep.pipelines import EPI, PruningRun
from icep.pipelines.epi import epi_values, fires, similarity
from icep.pruning import L1, select_global, uniform_widths
from icep.pruning.schedules import agp, constant, geometric, hybrid, one_shot
from icep.train import Trainer


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return digits_data(tmp_path_factory.mktemp("data"), train_subset=400)


@pytest.fixture(scope="module")
def dense_state(digits):
    """A ResNet-8 (3 units: 16, 32, 64 channels) trained a little on digits."""
    return trained_on_digits(digits, depth=8, epochs=4, min_val_acc=50)


def pipeline_cfg(name: str, *overrides: str, **keys):
    """The whole config with pipeline=NAME, ``overrides`` and ``pipeline.KEY=VALUE`` for
    ``keys``, checked as the app checks it."""
    cfg = compose_config(*pipeline_overrides(name, *overrides, **keys))
    validate(cfg)
    return cfg


def firing_epoch(counts, tau: float, window: int) -> int | None:
    """The first epoch (1-based) at which EPI fires for this sequence of per-layer counts."""
    values = epi_values(counts, window)
    return next((t for t in range(1, len(values) + 1) if fires(values[:t], tau, window)), None)


def new_run(digits, dense_state, tmp_path, checkpoint=None):
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=10, in_channels=1)
    model.load_state_dict(dense_state)
    digits.train.generator.manual_seed(0)  # the same batches for every run
    logger = RunLogger(tmp_path)
    return PruningRun(model, digits, Trainer(torch.device("cpu")), L1(), logger, checkpoint)


def run_pipeline(cfg, digits, dense_state, tmp_path):
    run = new_run(digits, dense_state, tmp_path)
    return run, instantiate(cfg.pipeline)(run)


def expected_share(original: dict[str, int], share: float) -> float:
    """Scope uniform after a step to ``share``: what the unit convs lose, out of all of them."""
    widths = uniform_widths(original, share)
    return 1 - sum(widths.values()) / sum(original.values())


# --- structured schedules end at their target -----------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "cumulative"),
    [
        ("one_shot", {"target": 0.5}, one_shot(0.5)),
        ("iterative", {"schedule": "constant", "target": 0.6, "steps": 2}, constant(0.6, 2)),
        ("iterative_geometric", {"target": 0.7, "steps": 2}, geometric(0.7, 2)),
        ("hybrid", {"target": 0.7, "one_shot": 0.4, "steps": 1}, hybrid(0.7, 1, 0.4)),
        ("agp", {"target": 0.6, "steps": 2, "epochs": 2}, agp(0.6, 2)),
    ],
)
def test_schedule_pipelines_prune_every_unit_to_each_share(
    name, overrides, cumulative, digits, dense_state, tmp_path
):
    run, summary = run_pipeline(pipeline_cfg(name, **overrides), digits, dense_state, tmp_path)
    original = run.engine.original_widths
    shares = [r["channels_pruned_share"] for r in run.rows if r.get("pruned", True)]
    assert shares == pytest.approx([expected_share(original, c) for c in cumulative])
    target = cumulative[-1]
    assert summary["channels_pruned_share"] == pytest.approx(shares[-1])
    assert abs(summary["channels_pruned_share"] - target) <= 1 / min(original.values())
    assert run.engine.unit_widths() == uniform_widths(original, target)
    assert summary["macs_after"] < summary["macs_before"]
    assert summary["target"] == target and summary["ratio"] is None
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == len(run.rows)


def test_agp_prunes_at_its_epochs_and_trains_in_between():
    cfg = pipeline_cfg("agp", target=0.8, steps=3, start_epoch=2, frequency=2, epochs=7)
    epochs = instantiate(cfg.pipeline).prune_epochs()
    assert list(epochs) == [2, 4, 6]
    assert list(epochs.values()) == pytest.approx(agp(0.8, 3))
    with pytest.raises(ConfigError, match=r"pipeline\.epochs: got 5; the last AGP step"):
        pipeline_cfg("agp", target=0.8, steps=3, start_epoch=2, frequency=2, epochs=5)


# --- scope ------------------------------------------------------------------------------------


def test_global_scope_gives_other_widths_and_keeps_the_floor(digits, dense_state, tmp_path):
    floor = 0.2
    cfg = pipeline_cfg("one_shot", target=0.6, scope="global", min_channels_share=floor)
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path / "global")
    original = run.engine.original_widths
    widths = run.engine.unit_widths()
    assert widths != uniform_widths(original, 0.6)
    for name, width in widths.items():
        assert width >= max(1, math.ceil(floor * original[name])), name
    total = sum(original.values())
    assert summary["channels_pruned_share"] == pytest.approx(math.ceil(0.6 * total) / total)


def test_global_ranking_normalises_per_layer_and_stops_at_the_floor():
    # Layer "small" has scores 1000 times smaller: unnormalised, it would lose everything.
    scores = {"small": torch.tensor([1e-3, 2e-3, 3e-3, 4e-3]), "big": torch.tensor([1.0, 2, 3, 4])}
    original = {"small": 4, "big": 4}
    chosen = select_global(scores, original, 0.5, min_channels_share=0.0)
    assert {k: sorted(v) for k, v in chosen.items()} == {"small": [0, 1], "big": [0, 1]}
    # A floor of half the channels stops both layers at two, short of the 0.75 target.
    chosen = select_global(scores, original, 0.75, min_channels_share=0.5)
    assert all(len(v) == 2 for v in chosen.values())
    # A second step counts what is already gone: the layers are narrower now.
    narrower = {"small": scores["small"][2:], "big": scores["big"]}
    assert sum(map(len, select_global(narrower, original, 0.5, 0.0).values())) == 2


def test_global_ranking_takes_a_grouped_layer_by_position_across_its_groups():
    """A layer cut in 2 equal groups of 4 is ranked by position (the mean of its two groups'
    normalised scores); each position taken removes one channel in each group."""
    scores = {
        "grouped": torch.tensor([4.0, 1, 3, 2, 4, 1, 2, 3]),  # position 1 lowest in both
        "plain": torch.tensor([2.0, 4, 4, 4]),
    }
    original = {"grouped": 8, "plain": 4}
    chosen = select_global(scores, original, 0.25, 0.0, groups={"grouped": 2})
    # ceil(0.25 * 12) = 3 wanted: position 1 of the grouped layer (mean 0.25, two channels), then
    # the plain layer's channel 0 (0.5).
    assert chosen == {"grouped": [1, 5], "plain": [0]}
    # Every group keeps two: at most two positions of four go, whatever the target.
    chosen = select_global(scores, original, 0.99, 0.0, groups={"grouped": 2})
    assert len(chosen["grouped"]) == 4 and len(chosen["plain"]) == 3


# --- unstructured -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "cumulative"),
    [
        ("one_shot", {"target": 0.9}, [0.9]),
        ("iterative_geometric", {"target": 0.8, "steps": 2}, geometric(0.8, 2)),
        ("agp", {"target": 0.7, "steps": 2, "epochs": 2}, agp(0.7, 2)),
    ],
)
def test_unstructured_sparsity_is_exact_and_claims_no_speed_up(
    name, overrides, cumulative, digits, dense_state, tmp_path
):
    cfg = pipeline_cfg(name, structure="unstructured", **overrides)
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path)
    weights = [
        m.weight for m in run.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    total = sum(w.numel() for w in weights)
    exact = [math.ceil(c * total - 1e-9) / total for c in cumulative]
    assert [r["sparsity"] for r in run.rows if r.get("pruned", True)] == exact
    assert summary["sparsity"] == exact[-1] == sum(int((w == 0).sum()) for w in weights) / total
    assert summary["macs_after"] == summary["macs_before"]
    assert summary["params_after"] == summary["params_before"]
    assert summary["structure"] == "unstructured"
    assert all(not w._backward_hooks for w in weights)  # the masks were made permanent


# --- patience ---------------------------------------------------------------------------------


def test_patience_stops_and_puts_back_the_best_weights(digits, dense_state, tmp_path):
    run = new_run(digits, dense_state, tmp_path)
    accuracies = iter([50.0, 60.0, 60.05, 58.0, 70.0])  # epoch 3 gains less than min_delta
    snapshots = []

    def evaluate(model, loader, desc="eval"):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(accuracies)

    run.trainer.evaluate = evaluate
    cfg = pipeline_cfg(
        "one_shot",
        "pipeline/finetune=patience",
        **{"finetune.patience": 2, "finetune.min_delta": 0.1},
    )
    assert (
        run.recover(instantiate(cfg.pipeline.finetune), 0.01) == 4
    )  # epochs 3 and 4 did not improve on epoch 2
    assert run.acc_now == 60.0
    best = snapshots[1]
    assert all(torch.equal(v, best[k]) for k, v in run.model.state_dict().items())
    assert not torch.equal(snapshots[3]["fc.weight"], best["fc.weight"])  # it did train on
    # the run timed it: four epochs of fine-tuning and four evaluations
    assert run.timer.totals["finetune"] > 0 and "eval" in run.timer.totals and run.finetunes == 1


def test_patience_is_capped_by_max_epochs(digits, dense_state, tmp_path):
    run = new_run(digits, dense_state, tmp_path)
    accuracies = iter([50.0, 60.0, 70.0, 80.0])
    run.trainer.evaluate = lambda model, loader, desc="eval": next(accuracies)
    cfg = pipeline_cfg(
        "hybrid", "pipeline/finetune=patience", **{"finetune.patience": 5, "finetune.max_epochs": 3}
    )
    assert run.recover(instantiate(cfg.pipeline.finetune), 0.01) == 3
    assert run.acc_now == 70.0


def test_patience_runs_in_a_pipeline_and_records_the_epochs(digits, dense_state, tmp_path):
    cfg = pipeline_cfg(
        "iterative_geometric",
        "pipeline/finetune=patience",
        steps=2,
        **{"finetune.patience": 1, "finetune.max_epochs": 2},
    )
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path)
    assert all(1 <= r["epochs"] <= 2 for r in run.rows)
    assert summary["finetunes"] == 2
    assert summary["time_eval_s"] > 0


# --- EPI --------------------------------------------------------------------------------------


def test_epi_similarity_and_values():
    assert similarity([4, 8], [4, 8]) == 1.0
    assert similarity([2, 8], [6, 8]) == pytest.approx(1 - (4 / 8) / 2)
    counts = [[4, 8], [2, 8], [6, 8]]
    assert epi_values(counts, 1) == [None, pytest.approx(0.8333333), pytest.approx(0.75)]
    assert epi_values(counts, 2)[:2] == [None, None]


def test_epi_fires_on_a_settling_sequence_and_not_before_its_window():
    # Layer counts that settle: the distance to the final counts halves every epoch.
    final = [1000, 2000, 3000]
    counts = [[n + int(1024 * 0.5**t) for n in final] for t in range(14)]
    values = epi_values(counts, 5)
    assert values[:5] == [None] * 5  # EPI needs 5 earlier counts
    assert values[8] > 0.983  # above tau from epoch 9, and rising ...
    assert all(a < b for a, b in zip(values[5:], values[6:], strict=False))
    # ... but it must also beat 5 earlier EPI values, which exist from epoch 11 on.
    assert firing_epoch(counts, tau=0.983, window=5) == 11
    assert firing_epoch(counts[:10], tau=0.983, window=5) is None
    assert firing_epoch(counts, tau=0.9995, window=5) == 14  # the first value above tau
    # Stable from the first epoch, EPI is 1 throughout: a plateau at or above tau fires as soon
    # as 5 earlier EPI values exist (METHOD.md section 4); a sequence that never settles never
    # fires.
    assert firing_epoch([final] * 20, tau=0.983, window=5) == 11
    assert firing_epoch([final] * 20, tau=1.0, window=5) == 11
    assert firing_epoch([[5, 5] if t % 2 else [1, 9] for t in range(20)], 0.9, 5) is None
    # A window of 1 can fire at epoch 3 at the earliest.
    assert firing_epoch([[1, 9], [3, 7], [4, 6], [4, 6]], tau=0.5, window=1) == 3


# A crafted ranking for EPI: the first layer keeps 9, 7, then 6 channels from epoch 3 on.
KEPT = [[9, 16, 32], [7, 16, 32], [6, 16, 32], [6, 16, 32]]


def crafted_ranking(self, run):
    widths = run.engine.unit_widths()
    kept = KEPT[len(run.rows)]  # this epoch's
    return {n: list(range(w - k)) for (n, w), k in zip(widths.items(), kept, strict=True)}


def test_epi_pipeline_prunes_once_when_it_fires(digits, dense_state, tmp_path, monkeypatch):
    monkeypatch.setattr(EPI, "rank_channels", crafted_ranking)
    cfg = pipeline_cfg("epi", epochs=4, window=1, tau=0.5, alpha=0.4)
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path)
    counts = KEPT[:3]
    assert summary["epi_fired_epoch"] == firing_epoch(counts, 0.5, 1) == 3
    assert [r["epi"] for r in run.rows] == [*epi_values(counts, 1), None]
    assert [r["pruned"] for r in run.rows] == [False, False, True, False]
    assert run.engine.unit_widths() == dict(zip(run.engine.original_widths, KEPT[2], strict=True))
    assert [r["channels_pruned_share"] for r in run.rows][-1] == summary["channels_pruned_share"]
    assert summary["steps"] == 4 and summary["finetunes"] == 4


def test_epi_that_never_fires_prunes_at_the_last_epoch_and_says_so(digits, dense_state, tmp_path):
    cfg = pipeline_cfg("epi", epochs=2, alpha=0.4)  # window 5: cannot fire in 2 epochs
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path)
    assert summary["epi_fired"] is False and summary["epi_fired_epoch"] is None
    assert summary["pruned_epoch"] == 2
    assert [r["pruned"] for r in run.rows] == [False, True]
    assert [r["epi"] for r in run.rows] == [None, None]
    total = sum(run.engine.original_widths.values())
    assert summary["channels_pruned_share"] == pytest.approx(math.ceil(0.4 * total) / total)


def test_epi_fires_on_a_settled_ranking(digits, dense_state, tmp_path, monkeypatch):
    """The same ranking every epoch: EPI = 1.000 from the second epoch (window 1), a plateau that
    fires as soon as one earlier EPI value exists."""

    def settled(self, run):
        widths = run.engine.unit_widths()
        return {n: list(range(w - k)) for (n, w), k in zip(widths.items(), KEPT[2], strict=True)}

    monkeypatch.setattr(EPI, "rank_channels", settled)
    cfg = pipeline_cfg("epi", epochs=4, window=1, tau=0.983, alpha=0.4)
    run, summary = run_pipeline(cfg, digits, dense_state, tmp_path)
    assert [r["epi"] for r in run.rows] == [None, 1.0, 1.0, None]
    assert (
        summary["epi_fired"] is True and summary["epi_fired_epoch"] == summary["pruned_epoch"] == 3
    )


# --- resume -----------------------------------------------------------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("iterative_geometric", {"target": 0.7, "steps": 3, "scope": "global"}),
        ("iterative_geometric", {"target": 0.8, "steps": 3, "structure": "unstructured"}),
        ("agp", {"target": 0.7, "steps": 2, "epochs": 3}),
        ("agp", {"target": 0.8, "steps": 3, "epochs": 3, "structure": "unstructured"}),
        ("epi", {"epochs": 4, "window": 1, "tau": 0.5, "alpha": 0.4}),
    ],
)
def test_a_run_resumes_from_its_checkpoint_to_the_same_metrics(
    name, overrides, digits, dense_state, tmp_path, monkeypatch
):
    monkeypatch.setattr(EPI, "rank_channels", crafted_ranking)  # EPI fires after the resume
    cfg = pipeline_cfg(name, **overrides)
    full_run, full = run_pipeline(cfg, digits, dense_state, tmp_path / "full")

    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    killed = new_run(digits, dense_state, tmp_path / "killed", checkpoint)

    def stop_after_step_two(run, row):
        if row["step"] == 2:
            raise Stop

    killed.on_step.append(stop_after_step_two)
    with pytest.raises(Stop):
        instantiate(cfg.pipeline)(killed)

    resumed = new_run(digits, dense_state, tmp_path / "killed", checkpoint)
    resumed.restore(torch.load(checkpoint, weights_only=True))
    summary = instantiate(cfg.pipeline)(resumed)

    def untimed(rows):
        return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]

    assert untimed(resumed.rows) == untimed(full_run.rows)
    for key in ("acc_final_val", "acc_final_test", "channels_pruned_share", "sparsity"):
        assert summary.get(key) == full.get(key), key
    assert summary.get("epi_fired_epoch") == full.get("epi_fired_epoch")


# --- config and the app ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("one_shot", {"finetune.epochs": 0}, "pipeline.finetune.epochs"),
        ("one_shot", {"finetune.lr": -1}, "pipeline.finetune.lr"),
        ("iterative", {"schedule": "cubic"}, "pipeline.schedule"),
        ("iterative", {"structure": "unstructured"}, "pipeline.structure"),
        ("one_shot", {"scope": "layer"}, "pipeline.scope"),
        ("one_shot", {"target": 1.2}, "pipeline.target"),
        ("hybrid", {"one_shot": 0.9}, "pipeline.one_shot"),
        ("one_shot", {"scope": "global", "target": 0.95}, "pipeline.min_channels_share"),
        ("epi", {"alpha": 0.0}, "pipeline.alpha"),
    ],
)
def test_bad_pipeline_settings_name_the_key(name, overrides, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + ": "):
        pipeline_cfg(name, **overrides)


def test_a_bad_patience_setting_names_the_key():
    with pytest.raises(ConfigError, match=r"^pipeline\.finetune\.patience: got 0"):
        pipeline_cfg("one_shot", "pipeline/finetune=patience", **{"finetune.patience": 0})


def test_hybrid_through_the_app(tmp_path, cache_dir):
    args = [*FAST, "pipeline=hybrid", "pipeline.steps=1", "pipeline.target=0.5"]
    result = run_icep(args, tmp_path / "run", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pipeline"] == "hybrid" and summary["steps"] == 2
    assert abs(summary["channels_pruned_share"] - 0.5) <= 1 / 16
    assert "target 0.5, channels pruned" in result.stdout
    bad = run_icep(
        [*FAST, "pipeline=one_shot", "pipeline.scope=layer"], tmp_path / "bad", cache_dir
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "icep: error: pipeline.scope: got 'layer'; must be uniform or global"
    )
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # refused before any work
