"""Run outputs: local files always, W&B as a mirror when ``logger=wandb``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from icep.serialization import atomic_open

log = logging.getLogger(__name__)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, so a kill never leaves half a file."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


class RunLogger:
    """Writes ``metrics.jsonl`` (one row per pruning step) and ``summary.json`` in the run folder,
    and mirrors both to W&B when a ``wandb`` logger config is given."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: Any = None,
        config: dict[str, Any] | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.wandb_run = None
        if cfg is not None and cfg.get("name") == "wandb":
            self.wandb_run = self._start_wandb(cfg, config, group, job_type, tags)

    def _start_wandb(self, cfg, config, group, job_type, tags):
        import wandb

        run = wandb.init(
            project=cfg.project,
            entity=cfg.get("entity"),
            group=cfg.get("group") or group,
            job_type=cfg.get("job_type") or job_type,
            tags=list(cfg.get("tags") or []) + list(tags or []),
            name=cfg.get("run_name"),
            mode=cfg.mode,
            dir=str(self.run_dir),
            config=config,
            settings=wandb.Settings(quiet=True),
            reinit="create_new",  # the tuning stage's trial runs live beside the final run
        )
        # The pruning step is the x-axis of every per-step metric; t_total is the time axis.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def log_step(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None})

    def rewrite_steps(self, rows: list[dict[str, Any]]) -> None:
        """Make ``metrics.jsonl`` exactly ``rows`` (a resume drops what came after its
        checkpoint), atomically."""
        with atomic_open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def log_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_path, summary)
        if self.wandb_run is not None:
            for key, value in summary.items():
                self.wandb_run.summary[key] = value

    def close(self, failed: bool = False) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if failed else 0)
            self.wandb_run = None
