"""Local run files, and the W&B mirror (offline) holding the same history, grouped by setting,
with the training epochs, a table of the steps and the model."""

from __future__ import annotations

import json
import time

import pytest
from conftest import compose_config, digits_data
from omegaconf import OmegaConf
from wandb_offline import artifacts, finished, history, run_info, summary, table

from icep.config import build
from icep.loggers import RunInfo, RunLogger, WandbLogger, setting_group

ROWS = [{"step": s, "unit": f"layer1.{s}", "val_acc": 90.0 - s, "lr": None} for s in (1, 2, 3)]


def test_local_files(tmp_path):
    make = build(compose_config("logger=local"), "logger")
    logger = make(tmp_path, RunInfo(group="exp", tags=["l1"]))
    assert type(logger) is RunLogger
    for row in ROWS:
        logger.log_step(row)
        logger.log_epoch({"epoch": row["step"], "loss": 1.0, "lr": 0.1})
    logger.log_summary({"acc_final_val": 87.0, "status": "completed"})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == ROWS
    assert json.loads((tmp_path / "summary.json").read_text())["acc_final_val"] == 87.0
    # Epochs are W&B's only: without it they cost a call and write nothing.
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.jsonl", "summary.json"}


def test_wandb_offline_run_holds_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        "logger=wandb",
        "logger.mode=offline",
        "logger.project=icep-test",
        "logger.group=exp",
        "logger.job_type=iterative",
        "logger.tags=[r0.6]",
    )
    info = RunInfo(config={"pipeline": {"ratio": 0.6}}, group="other", job_type="x", tags=["l1"])
    logger = build(cfg, "logger")(tmp_path, info)
    for row in ROWS:
        logger.log_step(row)
    logger.log_summary(
        {"acc_final_val": 87.0, "frozen_layers": ["a", "b"], "dense": {"source": "x"}}
    )
    logger.close()

    # Local files are written too.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    logged = [r for r in history(files[0]) if "val_acc" in r]  # not the steps table's row
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["val_acc"] for r in logged] == [89.0, 88.0, 87.0]
    assert all("lr" not in r for r in logged)  # None values are not sent
    logged_info = run_info(files[0])  # the logger's settings win over the run's own
    assert logged_info.run_group == "exp" and logged_info.job_type == "iterative"
    assert set(logged_info.tags) == {"r0.6", "l1", "experiment:other"}
    logged_summary = summary(files[0])
    assert logged_summary["acc_final_val"] == 87.0
    assert logged_summary["frozen_layers"] == ["a", "b"]


def test_wandb_online_without_key_or_server_says_why_at_once(monkeypatch):
    from icep.loggers import _wandb_offline_reason

    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens there
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", "/nonexistent")
    reason = _wandb_offline_reason(unreachable, timeout=5)
    assert reason == f"no API key for {unreachable} (run `wandb login` or set WANDB_API_KEY)"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    start = time.perf_counter()
    reason = _wandb_offline_reason(unreachable, timeout=5)
    assert reason.startswith(f"{unreachable} cannot be reached (")
    assert time.perf_counter() - start < 5


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """A run resumed from its checkpoint (a requeued job) logs into the same W&B run, so the
    dashboards hold one run per setting, not a partial one per attempt."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []

    def start(folder, resume: bool) -> WandbLogger:
        info = RunInfo(group="exp", job_type="ice", resume=resume)
        return WandbLogger(folder, info, mode="offline", project="icep-test")

    for attempt, rows in enumerate((ROWS[:2], ROWS[2:])):
        logger = start(tmp_path, resume=attempt > 0)
        for row in rows:
            logger.log_step(row)
        ids.append(logger.wandb_run.id)
        logger.close()
    assert ids[0] == ids[1]
    # Each attempt's offline folder is named by its start second: one or two folders.
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {run_info(f).run_id for f in files} == {ids[0]}
    assert 3 in {r["step"] for f in files for r in history(f)}
    fresh = start(tmp_path / "other", resume=True)
    assert fresh.wandb_run.id != ids[0]  # nothing to continue: a new run
    fresh.close()


# --- W&B groups: one per setting, the pipelines of a setting in it --------------------------


def resolved(*overrides: str) -> dict:
    """The resolved config of ``python -m icep OVERRIDES``, as the app hands it to a logger."""
    return OmegaConf.to_container(compose_config(*overrides), resolve=True)


def test_the_group_is_the_experiment_and_the_setting():
    group = setting_group("exp", resolved("model=resnet20", "pipeline=ice", "pipeline.ratio=0.5"))
    assert group == "exp/resnet20-digits-l1-r0.5"
    # Another pipeline at that setting joins the group; the job type tells them apart.
    baseline = resolved("model=resnet20", "pipeline=iterative", "pipeline.ratio=0.5", "seed=3")
    assert setting_group("exp", baseline) == group
    schedule = resolved(
        "model=resnet20", "pipeline=iterative", "pipeline.schedule=geometric", "pipeline.target=0.5"
    )
    assert setting_group("exp", schedule) == group
    # What a sweep varies besides pipeline and seed makes groups of its own.
    assert {
        setting_group("exp", resolved(*overrides))
        for overrides in (
            ("pipeline=ice", "pipeline.ratio=0.7"),
            ("pipeline=ice", "criterion=taylor"),
            ("pipeline=ice", "model=resnet32"),
            ("pipeline=ice",),
        )
    } == {
        "exp/resnet20-digits-l1-r0.7",
        "exp/resnet20-digits-taylor-r0.6",
        "exp/resnet32-digits-l1-r0.6",
        "exp/resnet20-digits-l1-r0.6",
    }
    budget = resolved(
        "pipeline=iterative",
        "pipeline.schedule=constant",
        "pipeline.scope=uniform",
        "+pipeline.target={macs: 0.5}",
    )
    assert setting_group("default", budget) == "default/resnet20-digits-l1-macs0.5"
    assert setting_group("default", resolved("pipeline=dense")) == "default/resnet20-digits-l1"
    assert setting_group("exp", None) == "exp"  # nothing to tell the setting by


def test_wandb_groups_a_setting_and_logs_epochs_a_table_and_the_model(tmp_path, monkeypatch):
    """One offline run with the defaults of conf/logger/wandb.yaml: its group is the setting,
    its job type the pipeline; the training epochs are on their own axis; the steps table holds
    metrics.jsonl as it is at the end (after a resume's rewrite); the model is an artifact."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = resolved("pipeline=ice", "pipeline.ratio=0.5", "name=exp")
    make = build(
        compose_config("logger=wandb", "logger.mode=offline", "logger.log_model=true"), "logger"
    )
    logger = make(tmp_path, RunInfo(config=config, group="exp", job_type="ice"))
    for epoch in (1, 2, 3):  # the dense model trained first, on its own axis
        logger.log_epoch({"epoch": epoch, "loss": 1.0 / epoch, "lr": 0.1}, "dense")
    epochs = 0
    for row in [*ROWS, {**ROWS[0], "step": 4, "frozen": ["a", "b"]}]:
        for lr in (0.1, 0.01):
            epochs += 1
            logger.log_epoch({"epoch": epochs, "loss": 2.0 / epochs, "lr": lr})
        logger.log_step(row)
    logger.rewrite_steps(ROWS[:2])  # a resume drops the rows after its checkpoint
    logger.log_step({**ROWS[2], "frozen": ["a", "b"]})
    (tmp_path / "model.pt").write_bytes(b"weights")
    logger.log_summary({"acc_final_val": 87.0, "steps": 3})
    logger.close()

    path = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    info = run_info(path)
    assert (info.run_group, info.job_type) == ("exp/resnet20-digits-l1-r0.5", "ice")
    assert "experiment:exp" in info.tags
    logged = history(path)
    trained = [r for r in logged if "train/epoch" in r]
    assert [r["train/epoch"] for r in trained] == list(range(1, 9))
    assert all({"train/loss", "train/lr"} <= set(r) for r in trained)
    assert not any("step" in r for r in trained)  # the steps' axis stays the pruning step
    axes = {r.metric.name: r.metric.step_metric for r in finished(path) if r.metric.name}
    assert axes["train/loss"] == axes["train/lr"] == "train/epoch"
    assert [r["dense/epoch"] for r in logged if "dense/epoch" in r] == [1, 2, 3]
    assert axes["dense/loss"] == axes["dense/lr"] == "dense/epoch"
    assert not any("train/epoch" in r for r in logged if "dense/epoch" in r)

    assert [r["steps_table/nrows"] for r in logged if "steps_table/nrows" in r] == [3]
    steps = table(path, "steps_table")
    local = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps["columns"] == ["step", "unit", "val_acc", "lr", "frozen"]
    assert steps["data"] == [
        [
            r["step"],
            r["unit"],
            r["val_acc"],
            None,
            json.dumps(r["frozen"]) if "frozen" in r else None,
        ]
        for r in local
    ]
    assert summary(path)["steps"] == 3  # the table does not take the summary's count's key

    models = [a for a in artifacts(path) if a.type == "model"]
    assert [a.name for a in models] == [f"model-{info.run_id}"]
    assert "model.pt" in str(models[0].manifest)
    assert json.loads(models[0].metadata)["acc_final_val"] == 87.0


@pytest.mark.parametrize("log_model, failed", [(False, False), (True, True)])
def test_no_model_artifact_unless_asked_and_completed(tmp_path, monkeypatch, log_model, failed):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(tmp_path, RunInfo(), mode="offline", project="t", log_model=log_model)
    (tmp_path / "model.pt").write_bytes(b"weights")
    logger.log_step(ROWS[0])
    logger.close(failed=failed)
    path = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [a.type for a in artifacts(path)] == [
        "run_table"
    ]  # the steps table, logged whatever the run's end


# --- the pruned model's training epochs reach the logger ------------------------------------


class EpochLogger(RunLogger):
    def __init__(self, run_dir):
        super().__init__(run_dir)
        self.epochs = []

    def log_epoch(self, row):
        self.epochs.append(row)


def test_the_run_logs_its_models_epochs_counted_across_fine_tunes_and_resumes(tmp_path, cache_dir):
    import copy

    import torch

    from icep.models import cifar_resnet
    from icep.pipelines import PruningRun
    from icep.pruning.criteria import L1
    from icep.train import Trainer, sgd

    digits = digits_data(cache_dir, 128)

    def new_run(logger):
        model = cifar_resnet(8, num_classes=10, in_channels=1)
        trainer = Trainer(torch.device("cpu"))
        return PruningRun(model, digits, trainer, L1(), logger, checkpoint=tmp_path / "ckpt.pt")

    logger = EpochLogger(tmp_path)
    run = new_run(logger)
    run.fit(sgd(run.model, lr=0.05), 2)
    run.fit(sgd(run.model, lr=0.02), 1)
    trial = copy.deepcopy(run.model)  # an analysis trains a copy: not the run's epochs
    run.fit(sgd(trial, lr=0.5), 1, model=trial, phase="freeze_analysis")
    assert [(e["epoch"], e["lr"]) for e in logger.epochs] == [(1, 0.05), (2, 0.05), (3, 0.02)]
    assert all(set(e) == {"epoch", "loss", "lr"} for e in logger.epochs)

    run.save_checkpoint()
    again = EpochLogger(tmp_path)
    resumed = new_run(again)
    resumed.restore(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.fit(sgd(resumed.model, lr=0.02), 1)
    assert [e["epoch"] for e in again.epochs] == [4]
