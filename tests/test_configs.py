"""Every config file composes and its objects build."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
from hydra import compose, initialize_config_module

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_config_is_packaged_for_wheels():
    import importlib.resources

    assert importlib.resources.files("icep.conf").joinpath("config.yaml").is_file()


@pytest.mark.parametrize(
    "group",
    ["model", "dataset", "criterion", "pipeline", "trainer", "logger", "tune", "experiment"],
)
def test_every_group_option_composes(group):
    assert options(group), f"conf/{group} is empty"
    with initialize_config_module("icep.conf", version_base="1.3"):
        for name in options(group):
            prefix = "+" if group == "experiment" else ""
            cfg = compose("config", overrides=[f"{prefix}{group}={name}"])
            if group != "experiment":
                assert cfg[group] is not None


def test_experiment_resnet56_cifar10():
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=resnet56_cifar10"])
    assert cfg.model.name == "resnet56"
    assert cfg.dataset.name == "cifar10"
    assert cfg.pipeline.name == "iterative"
    assert cfg.pipeline.ratio == 0.6
    assert cfg.criterion._target_ == "icep.pruning.criteria.L1"
    assert cfg.name == "resnet56_cifar10"


TRAINING_PIPELINES = ("agp", "epi")  # they train with their own optimizer, no fine-tune policy


@pytest.mark.parametrize(
    ("name", "finetune"),
    [
        *(
            (name, finetune)
            for name in options("pipeline")
            if name not in ("dense", *TRAINING_PIPELINES)
            for finetune in options("pipeline/finetune")
        ),
        *((name, None) for name in TRAINING_PIPELINES),
    ],
)
def test_every_pipeline_builds_with_every_fine_tune_policy(name, finetune):
    """Each pipeline's config is its class's schema: every key is an argument it takes."""
    from icep.config import build, validate

    overrides = [f"pipeline={name}", *([f"pipeline/finetune={finetune}"] if finetune else [])]
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    pipeline = build(cfg, "pipeline")
    assert callable(pipeline) and pipeline.name == cfg.pipeline.name
    training = pipeline.finetune if finetune else pipeline  # where lr and optimizer live
    if finetune:
        assert training.name == finetune
    optimizer = training.optimizer(torch.nn.Linear(2, 2).parameters(), lr=training.lr)
    assert optimizer.param_groups[0]["lr"] == training.lr


@pytest.mark.parametrize("name", [n for n in options("model")])
def test_model_configs_instantiate(name):
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    model = hydra.utils.instantiate(cfg.model.arch, num_classes=7, in_channels=3)
    last = [m for m in model.modules() if hasattr(m, "out_features")][-1]
    assert last.out_features == 7


@pytest.mark.parametrize(
    ("experiment", "model", "units_pipeline"),
    [
        ("resnet56_cifar10_ice", "resnet56", "ice"),
        ("resnet152_cifar10", "resnet152", "ice"),
        ("densenet121_tinyimagenet", "densenet121", "ice"),
        ("wrn101_imagenet", "wide_resnet101_2", "ice"),
    ],
)
def test_paper_experiments_select_ratio_and_either_pipeline(experiment, model, units_pipeline):
    with initialize_config_module("icep.conf", version_base="1.3"):
        ice = compose("config", overrides=[f"+experiment={experiment}", "pipeline.ratio=0.8"])
        base = compose("config", overrides=[f"+experiment={experiment}", "pipeline=iterative"])
    assert ice.model.name == model
    assert ice.pipeline.name == units_pipeline and ice.pipeline.ratio == 0.8
    assert base.pipeline.name == "iterative" and base.pipeline.ratio == 0.6
    # The baseline's fine-tune lr is ICE's base, and the baseline carries no ICE keys.
    assert base.pipeline.finetune.lr == ice.pipeline.base
    assert "thre" not in base.pipeline
    assert ice.pipeline.finetune == base.pipeline.finetune


@pytest.mark.parametrize(
    ("experiment", "freeze_lr"),
    [("resnet152_cifar10", 0.001), ("densenet121_tinyimagenet", 0.01), ("wrn101_imagenet", 0.001)],
)
@pytest.mark.parametrize("pipeline", ["ice", "iterative"])
def test_paper_experiments_compose_to_the_reference_settings(experiment, freeze_lr, pipeline):
    """METHOD.md section 7: every train image trains and the test set decides, for ICE and the
    baseline alike; the freeze analysis runs at the reference's fixed lr."""
    from icep.config import build, validate

    overrides = [f"+experiment={experiment}"] + (["pipeline=iterative"] * (pipeline != "ice"))
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    built = build(cfg, "pipeline")
    assert cfg.dataset.val_fraction == 0 and built.decision_split == "test"
    if pipeline == "ice":
        assert built.freeze_lr == freeze_lr
    # The reference's AMP (DenseNet, WRN) is fp16 with a gradient scaler; its ResNet runs FP32.
    fp16 = experiment != "resnet152_cifar10"
    assert cfg.trainer.amp_dtype == ("float16" if fp16 else "bfloat16")
    if experiment == "wrn101_imagenet":  # cross-entropy only, batch 256, Resize((224, 224))
        assert not built.finetune.distill and cfg.trainer.batch_size == 256
        assert cfg.dataset.train_subset == 128117  # 10% of ImageNet's train images
        assert (cfg.dataset.fit, cfg.dataset.augment) == ("stretch", "none")
    if experiment == "densenet121_tinyimagenet":  # ICE and the baseline alike
        assert built.unit_epochs == {"features.denseblock3.*": 2, "features.denseblock4.*": 2}
        assert built.final_finetune_epochs == 4
        assert (built.step_train_fraction, built.step_eval_fraction) == (0.02, 0.02)
        assert built.final_eval == "step"  # its final epochs report on the 2% share
        assert cfg.dataset.augment == "none" and not built.finetune.distill
        if pipeline == "ice":
            assert built.final_lr_factor == 2.0  # the baseline's final epochs: at finetune.lr
    else:  # the steps use all the data
        assert (built.step_train_fraction, built.step_eval_fraction) == (None, None)
    if experiment == "resnet152_cifar10":
        assert cfg.model.shortcut == "A"
        assert list(cfg.dataset.mean) == [0.485, 0.456, 0.406]
        assert list(cfg.dataset.std) == [0.229, 0.224, 0.225]
        model = hydra.utils.instantiate({**cfg.model.arch, "num_classes": 10})
        assert sum(p.numel() for p in model.parameters()) == 2_408_474


@pytest.mark.parametrize(
    ("experiment", "model", "dataset"),
    [("paper_comparison", "resnet152", "cifar10"), ("paper_comparison_toy", "resnet20", "digits")],
)
def test_paper_comparison_sweeps_baseline_and_ice_over_ratios_and_seeds(experiment, model, dataset):
    """The paper's table as one multirun: 2 pipelines x 3 ratios x 3 seeds, the rest shared."""
    with initialize_config_module("icep.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params)
        assert params == {
            "pipeline": "iterative,ice",
            "pipeline.ratio": "0.6,0.7,0.8",
            "seed": "0,1,2",
        }
        for pipeline in params["pipeline"].split(","):
            job = compose(
                "config", overrides=[f"+experiment={experiment}", f"pipeline={pipeline}", "seed=2"]
            )
            assert [job.pipeline.name, job.model.name, job.dataset.name] == [
                pipeline,
                model,
                dataset,
            ]
            finetune = job.pipeline.finetune
            assert finetune.distill and finetune.lr == 0.001 and job.name == experiment
