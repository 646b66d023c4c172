"""Local run files, and the W&B mirror (offline) holding the same history."""

from __future__ import annotations

import json
import time

from conftest import compose_config
from wandb_offline import history, run_info, summary

from icep.config import build
from icep.loggers import RunInfo, RunLogger, WandbLogger

ROWS = [{"step": s, "unit": f"layer1.{s}", "val_acc": 90.0 - s, "lr": None} for s in (1, 2, 3)]


def test_local_files(tmp_path):
    make = build(compose_config("logger=local"), "logger")
    logger = make(tmp_path, RunInfo(group="exp", tags=["l1"]))
    assert type(logger) is RunLogger
    for row in ROWS:
        logger.log_step(row)
    logger.log_summary({"acc_final_val": 87.0, "status": "completed"})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == ROWS
    assert json.loads((tmp_path / "summary.json").read_text())["acc_final_val"] == 87.0
    assert not (tmp_path / "wandb").exists()


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
    logged = history(files[0])
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert [r["val_acc"] for r in logged] == [89.0, 88.0, 87.0]
    assert all("lr" not in r for r in logged)  # None values are not sent
    logged_info = run_info(files[0])  # the logger's settings win over the run's own
    assert logged_info.run_group == "exp" and logged_info.job_type == "iterative"
    assert set(logged_info.tags) == {"r0.6", "l1"}
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
