"""ICE-Pruning: trigger, freezing, pruning-aware learning rate, ablation switches (METHOD.md 3)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import build_pipeline, digits_data, trained_on_digits
from harness import ScriptedAccuracy

from icep.loggers import RunLogger
from icep.models import cifar_resnet
from icep.pipelines import PruningRun
from icep.pipelines.ice import pruning_aware_lr, select_frozen, should_finetune
from icep.pruning import L1
from icep.train import Trainer, sgd

BASE, P, BETA, DELTA = 0.001, 0.15, 50, 0.0007


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (1.0, BASE - DELTA / (1 + (1.0 / 0.7) ** BETA)),  # dense: ~base
        (0.85, BASE - DELTA / 2),  # x = 1 - p: the sigmoid's centre
        (0.5, BASE - DELTA / (1 + (0.5 / 1.2) ** BETA)),  # sparse: ~base - delta
        (0.0, BASE - DELTA),
        (1.7, BASE),  # x = 2(1-p): the formula divides by zero
        (1.69999999, BASE),  # the power overflows a float; the limit is base
        (2.5, BASE),  # beyond it the formula would be complex
    ],
)
def test_pruning_aware_lr_values(x, expected):
    lr = pruning_aware_lr(x, BASE, P, BETA, DELTA)
    assert isinstance(lr, float)
    assert lr == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_pruning_aware_lr_is_a_rising_sigmoid():
    xs = [i / 100 for i in range(0, 200)]
    lrs = [pruning_aware_lr(x, BASE, P, BETA, DELTA) for x in xs]
    assert all(a <= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[0] == pytest.approx(BASE - DELTA) and lrs[-1] == BASE
    assert pruning_aware_lr(1.0, BASE, P, BETA, DELTA) == pytest.approx(BASE, rel=1e-6)


def test_trigger_rule():
    assert should_finetune(90.0, 88.5, 1.5)  # dropped exactly thre: fine-tune
    assert not should_finetune(90.0, 88.6, 1.5)
    assert should_finetune(90.0, 90.0, 0.0)


@pytest.mark.parametrize(("fr", "n"), [(0.3, 17), (0.9, 49), (0.0, 0), (1.0, 54), (0.5, 27)])
def test_select_frozen_takes_ceil_fr_n_lowest(fr, n):
    scores = {f"conv{i}": (i * 37 % 54) / 54 for i in range(54)}
    frozen = select_frozen(scores, fr)
    assert len(frozen) == math.ceil(fr * 54) == n
    assert set(frozen) == set(sorted(scores, key=scores.get)[:n])


# --- runs on real data (digits) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    # 700 of the 1,437 train+val digits: the ICE decisions still vary, each epoch costs half.
    return digits_data(tmp_path_factory.mktemp("data"), train_subset=700)


@pytest.fixture(scope="module")
def dense_state(digits):
    """A ResNet-20 trained on digits for a few epochs (about 95% val accuracy)."""
    return trained_on_digits(digits, depth=20, epochs=6, min_val_acc=85)


def ice(**keys):
    """pipeline=ice as Hydra composes and builds it, with ``pipeline.KEY=VALUE`` for ``keys``."""
    return build_pipeline("ice", **keys)


def run_pipeline(pipeline, digits, dense_state, tmp_path, trainer=None):
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=10, in_channels=1)
    model.load_state_dict(dense_state)
    trainer = trainer if trainer is not None else Trainer(torch.device("cpu"))
    run = PruningRun(model, digits, trainer, L1(), RunLogger(tmp_path))
    digits.train.generator.manual_seed(0)  # the same batches for every pipeline
    summary = pipeline(run)
    return run, summary


def test_frozen_layers_stay_bit_identical_while_others_train(digits, dense_state, tmp_path):
    pipeline = ice(fr=0.5, thre=-100.0)  # fine-tune every step
    run, summary = run_pipeline(pipeline, digits, dense_state, tmp_path)
    touched = run.engine.touched_convs()
    assert len(touched) == 18  # conv1 and conv2 of each of ResNet-20's 9 blocks
    assert len(summary["frozen_layers"]) == math.ceil(0.5 * 18)
    assert summary["t_freeze_analysis"] > 0
    assert summary["time_total_s"] >= summary["t_freeze_analysis"]

    # One more fine-tune: frozen convs and their BatchNorm affine parameters do not move.
    frozen = summary["frozen_layers"]
    norms = [run.engine.norm_after(n) for n in frozen]
    snapshot = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.fit(run.new_optimizer(sgd, 0.01), 1)
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, snapshot[n])}
    for layer in frozen + norms:
        assert not any(n.startswith(layer + ".") for n in changed), layer
    trainable = [n for n in touched if n not in frozen]
    assert all(f"{n}.weight" in changed for n in trainable)
    assert run.frozen_params() == summary["frozen_params"] > 0


def test_thre_below_any_drop_fine_tunes_every_step_and_huge_thre_none(
    digits, dense_state, tmp_path
):
    # Not thre=0: on 70 val digits a prune can leave the accuracy where it was, or raise it.
    _, every = run_pipeline(ice(thre=-100.0, freeze=False), digits, dense_state, tmp_path / "a")
    assert every["finetunes"] == every["steps"] == 9
    assert every["finetunes_skipped"] == 0
    run, none = run_pipeline(ice(thre=1000.0, freeze=False), digits, dense_state, tmp_path / "b")
    assert none["finetunes"] == 0 and none["finetunes_skipped"] == 9
    assert none["time_finetune_s"] == 0
    assert all(r["lr"] is None and r["epochs"] == 0 for r in run.rows)


def test_ablation_switches_change_exactly_what_they_name(digits, dense_state, tmp_path):
    def run(pipeline, name):
        return run_pipeline(pipeline, digits, dense_state, tmp_path / name, ScriptedAccuracy())

    full_run, full = run(ice(thre=3.0), "full")
    assert full["frozen_layers"] and full["finetunes"] == 4
    assert [r["step"] for r in full_run.rows if r["finetuned"]] == [2, 4, 6, 8]
    lrs = [r["lr"] for r in full_run.rows if r["lr"] is not None]
    assert any(lr < BASE * 0.99 for lr in lrs)  # the adaptive lr falls as the network thins

    no_trigger_run, no_trigger = run(ice(thre=3.0, trigger=False), "nt")
    assert no_trigger["finetunes"] == 9
    assert all(r["acc_pruned"] is None for r in no_trigger_run.rows)  # no decision evaluation
    assert no_trigger["frozen_layers"] == full["frozen_layers"]
    assert any(r["lr"] < BASE * 0.99 for r in no_trigger_run.rows)

    no_freeze_run, no_freeze = run(ice(thre=3.0, freeze=False), "nf")
    assert no_freeze["frozen_layers"] == [] and no_freeze["frozen_params"] == 0
    assert no_freeze["t_freeze_analysis"] == 0
    assert all(r["frozen_params"] == 0 for r in no_freeze_run.rows)
    assert all(r["acc_pruned"] is not None for r in no_freeze_run.rows)
    assert [r["finetuned"] for r in no_freeze_run.rows] == [r["finetuned"] for r in full_run.rows]

    const_run, _ = run(ice(thre=3.0, adaptive_lr=False), "cl")
    assert all(r["lr"] == BASE for r in const_run.rows if r["finetuned"])
    assert const_run.rows[0]["frozen_params"] == full_run.rows[0]["frozen_params"]


def test_all_switches_off_is_the_baseline_at_lr_base(digits, dense_state, tmp_path):
    off = ice(trigger=False, freeze=False, adaptive_lr=False, base=0.002)
    ice_run, ice_summary = run_pipeline(off, digits, dense_state, tmp_path / "ice")
    baseline = build_pipeline("iterative", **{"finetune.lr": 0.002})
    base_run, base = run_pipeline(baseline, digits, dense_state, tmp_path / "it")
    for a, b in zip(ice_run.rows, base_run.rows, strict=True):
        for key in ("val_acc", "params", "macs", "remaining", "lr", "finetuned", "epochs"):
            assert a[key] == b[key], key
    assert ice_summary["acc_final_test"] == base["acc_final_test"]
    assert ice_summary["finetunes"] == base["finetunes"] == 9


def test_ice_fine_tunes_less_than_the_baseline(digits, dense_state, tmp_path):
    _, ice_summary = run_pipeline(
        ice(thre=3.0), digits, dense_state, tmp_path / "ice", ScriptedAccuracy()
    )
    _, base = run_pipeline(
        build_pipeline("iterative"), digits, dense_state, tmp_path / "it", ScriptedAccuracy()
    )
    assert ice_summary["finetunes"] == 4 < base["finetunes"] == 9
    # Fewer fine-tunes is the saving; how much time that is belongs to the benchmarks, not here.
    assert ice_summary["params_after"] == base["params_after"]  # same pruning, different cost


def test_decision_split_test_and_recovery_fine_tune(digits, dense_state, tmp_path):
    pipeline = ice(decision_split="test", freeze=False, final_finetune_epochs=1, thre=1000.0)
    run, summary = run_pipeline(pipeline, digits, dense_state, tmp_path)
    assert summary["decision_split"] == "test"
    assert all("test_acc" in r and "val_acc" not in r for r in run.rows)
    assert summary["final_finetune"]["epochs"] == 1
    assert summary["finetunes"] == 1  # only the recovery one: the trigger never fired
    assert summary["acc_original_test"] == pytest.approx(
        Trainer(torch.device("cpu")).evaluate(_dense(dense_state), digits.test)
    )
    assert {"acc_original_val", "acc_final_val", "acc_final_test"} <= summary.keys()


def _dense(state):
    model = cifar_resnet(20, num_classes=10, in_channels=1)
    model.load_state_dict(copy.deepcopy(state))
    return model


@pytest.mark.slow
def test_main_job_without_arguments_runs_ice(tmp_path, cache_dir):
    import json

    from conftest import run_icep

    result = run_icep([], tmp_path / "main", cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "main" / "summary.json").read_text())
    assert summary["pipeline"] == "ice" and summary["dataset"] == "digits"
    assert summary["acc_original_test"] > 90  # the embedded dense model is properly trained
    for text in ("fine-tunes skipped", "frozen", "freeze analysis", "test accuracy"):
        assert text in result.stdout


@pytest.mark.parametrize(("freeze_lr", "expected"), [(0.001, 0.001), ("null", 0.005)])
def test_the_freeze_analysis_trains_at_freeze_lr_or_base(
    freeze_lr, expected, digits, dense_state, tmp_path, monkeypatch
):
    """The reference's analysis epoch runs at a fixed lr (0.001 for ResNet: METHOD.md section 7),
    whatever base is; freeze_lr=null trains it at base."""
    seen = []
    new_optimizer = PruningRun.new_optimizer

    def record(self, make, lr, model=None, phase="finetune"):
        seen.append((phase, lr))
        return new_optimizer(self, make, lr, model=model, phase=phase)

    monkeypatch.setattr(PruningRun, "new_optimizer", record)
    pipeline = ice(base=0.005, freeze_lr=freeze_lr, thre=1000.0)
    run_pipeline(pipeline, digits, dense_state, tmp_path)
    assert [lr for phase, lr in seen if phase == "freeze_analysis"] == [expected]


@pytest.mark.parametrize("pipeline", ["ice", pytest.param("iterative", marks=pytest.mark.slow)])
def test_without_a_val_split_every_image_trains_and_decisions_are_on_test(
    pipeline, tmp_path, cache_dir
):
    """dataset.val_fraction=0 with decision_split=test: the reference's data (METHOD.md 7)."""
    import json

    from conftest import FAST, read_jsonl, run_icep

    out = tmp_path / "run"
    args = [*FAST, f"pipeline={pipeline}", "dataset.val_fraction=0", "pipeline.decision_split=test"]
    result = run_icep(args, out, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "700 train / 0 val / 360 test samples" in result.stderr + result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decision_split"] == "test"
    assert summary["acc_original_val"] is None and summary["acc_drop_val"] is None
    assert summary["acc_final_test"] is not None
    assert all("test_acc" in row for row in read_jsonl(out / "metrics.jsonl"))
    assert re.search(r"val accuracy \(%\) +n/a +n/a", result.stdout)


def test_frozen_norms_follow_the_block_layout():
    """Post-activation blocks (conv-BN-ReLU) freeze the norm after a conv; pre-activation ones
    (DenseNet's BN-ReLU-conv) the norm before it, as the reference pairs norm1 with conv1 and
    norm2 with conv2 (METHOD.md section 7)."""
    import torchvision

    from icep.pipelines.ice import paired_norms
    from icep.pruning import PruningEngine

    x = torch.zeros(1, 3, 32, 32)
    resnet = PruningEngine(cifar_resnet(20), x)
    convs = resnet.touched_convs()
    assert paired_norms(resnet, convs)["layer1.0.conv2"] == "layer1.0.bn2"
    assert paired_norms(resnet, convs) == paired_norms(resnet, convs, "after")
    densenet = PruningEngine(torchvision.models.densenet121(num_classes=10), x)
    layer = "features.denseblock2.denselayer3"
    convs = densenet.touched_convs()
    auto = paired_norms(densenet, convs)
    assert auto[f"{layer}.conv1"] == f"{layer}.norm1"
    assert auto[f"{layer}.conv2"] == f"{layer}.norm2"
    assert paired_norms(densenet, convs, "after")[f"{layer}.conv1"] == f"{layer}.norm2"
    assert f"{layer}.conv2" not in paired_norms(densenet, convs, "after")  # a concat follows


@pytest.mark.parametrize("pipeline", ["ice", "iterative"])
def test_densenet_units_in_blocks_3_and_4_fine_tune_two_epochs(pipeline):
    """The DenseNet experiment, ICE and the baseline alike (METHOD.md section 7)."""
    from hydra import compose, initialize_config_module

    from icep.config import build

    overrides = ["+experiment=densenet121_tinyimagenet", f"pipeline={pipeline}"]
    if pipeline == "ice":
        overrides[1] = "pipeline=ice_densenet"
    with initialize_config_module("icep.conf", version_base="1.3"):
        densenet = build(compose("config", overrides=overrides), "pipeline")
    assert densenet.policy_for("features.denseblock3.denselayer5").epochs == 2
    assert densenet.policy_for("features.denseblock4.denselayer1").epochs == 2
    assert densenet.policy_for("features.denseblock2.denselayer1").epochs == 1
    assert densenet.final_finetune_epochs == 4
    assert ice().policy_for("features.denseblock3.denselayer5").epochs == 1


def test_the_recovery_fine_tune_runs_at_its_lr_factor_and_reports_each_epoch(
    digits, dense_state, tmp_path
):
    pipeline = ice(freeze=False, thre=1000.0, final_finetune_epochs=2, final_lr_factor=2.0)
    run, summary = run_pipeline(pipeline, digits, dense_state, tmp_path)
    final = summary["final_finetune"]
    assert final["lr"] == pytest.approx(2 * pipeline.learning_rate(run))
    assert len(final["val_accs"]) == 2 and final["best_acc"] == max(final["val_accs"])
    assert final["val_accs"][-1] == summary["acc_final_val"]


class _LoaderSizes(Trainer):
    """Records the size of the dataset behind every training and evaluation loader."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.seen = []

    def fit(self, model, loader, *args, desc="train", **kwargs):
        self.seen.append(("fit", desc, len(loader.dataset)))
        return super().fit(model, loader, *args, desc=desc, **kwargs)

    def evaluate(self, model, loader, desc="eval"):
        self.seen.append(("eval", desc, len(loader.dataset)))
        return super().evaluate(model, loader, desc)


@pytest.mark.parametrize("final_eval", ["all", "step"])
def test_step_data_runs_the_loop_on_its_share_and_the_recovery_on_all(
    final_eval, digits, dense_state, tmp_path
):
    """pipeline.step_train_fraction / step_eval_fraction, as the reference's DenseNet run: the
    freezing analysis, the fine-tunes and the decisions use a seeded share; the final fine-tune
    trains on all of train (its epochs evaluated on the whole split, or with final_eval=step on
    the share as the reference's) and the summary's accuracies are on whole splits. A resumed run
    keeps the unpruned accuracy on the whole split."""
    from icep.data import subsample

    step = subsample(digits, 0.25, 0.5, seed=0)
    n_train, n_val = len(step.train.dataset), len(step.val.dataset)
    assert n_train < len(digits.train.dataset) and n_val < len(digits.val.dataset)
    trainer = _LoaderSizes()
    model = cifar_resnet(20, num_classes=10, in_channels=1)
    model.load_state_dict(dense_state)
    checkpoint = tmp_path / "checkpoint.pt"
    run = PruningRun(
        model, digits, trainer, L1(), RunLogger(tmp_path), checkpoint=checkpoint, step_data=step
    )
    summary = ice(thre=-100.0, final_finetune_epochs=1, final_eval=final_eval)(run)

    fits = [(desc, n) for kind, desc, n in trainer.seen if kind == "fit"]
    assert fits[0] == ("freeze analysis", n_train)
    assert all(n == n_train for desc, n in fits if desc.startswith("fine-tune"))
    assert len([f for f in fits if f[0].startswith("fine-tune")]) == 9
    assert fits[-1] == ("recovery fine-tune 1/1", len(digits.train.dataset))
    decisions = [n for kind, desc, n in trainer.seen if kind == "eval" and desc == "val"]
    # The unpruned model, then after each prune and each fine-tune: on the share; the unpruned
    # model for the summary and the recovery epoch: on the whole split.
    # With final_eval=step the recovery epoch reports on the share and the summary measures the
    # final model on the whole split.
    assert decisions.count(n_val) == 1 + 2 * 9 + (final_eval == "step")
    assert decisions.count(len(digits.val.dataset)) == 2
    whole = Trainer(torch.device("cpu"))
    assert summary["acc_original_val"] == pytest.approx(
        whole.evaluate(_dense(dense_state), digits.val)
    )
    assert summary["acc_final_val"] == pytest.approx(whole.evaluate(run.model, digits.val))
    if final_eval == "all":
        assert summary["acc_final_val"] == summary["final_finetune"]["val_accs"][-1]
    assert summary["step_data"]["train_images"] == n_train
    assert summary["step_data"]["val_images"] == n_val
    assert summary["step_data"]["acc_last_step_val"] == run.rows[-1]["val_acc"]
    if final_eval == "step":
        return

    again = PruningRun(
        cifar_resnet(20, num_classes=10, in_channels=1).requires_grad_(True),
        digits,
        Trainer(torch.device("cpu")),
        L1(),
        RunLogger(tmp_path / "again"),
        step_data=step,
    )
    again.model.load_state_dict(dense_state)
    blob = torch.load(checkpoint, weights_only=True)
    again.restore(blob)
    resumed = ice(thre=-100.0, final_finetune_epochs=1)(again)
    assert resumed["acc_original_val"] == summary["acc_original_val"]
    assert resumed["step_data"] == summary["step_data"]

    # The wall clock holds every phase, reporting and checkpoints too, and the attempt before a
    # resume (the reference's timer scope, METHOD.md section 7).
    parts = ("time_total_s", "time_report_s", "time_checkpoint_s")
    assert summary["time_wall_s"] >= sum(summary[k] for k in parts) > 0
    assert resumed["time_wall_s"] > blob["wall_s"] > 0


def test_the_baseline_takes_the_reference_densenet_additions(digits, dense_state, tmp_path):
    """pipeline=iterative with unit_epochs and a final fine-tune, as the reference's DenseNet
    baseline: the matching units fine-tune longer, the final epochs run at finetune.lr."""
    baseline = build_pipeline(
        "iterative", **{"unit_epochs": "{layer3.*: 2}", "final_finetune_epochs": 1}
    )
    run, summary = run_pipeline(baseline, digits, dense_state, tmp_path)
    assert [r["epochs"] for r in run.rows] == [1] * 6 + [2] * 3
    final = summary["final_finetune"]
    assert (final["epochs"], final["lr"]) == (1, baseline.finetune.lr)
    assert final["val_accs"][-1] == summary["acc_final_val"]
    assert summary["finetunes"] == 9 + 1
