"""Run outputs: local files always (:class:`RunLogger`), W&B as a mirror when ``logger=wandb``
(:class:`WandbLogger`)."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icep.files import atomic_open
from icep.interrupts import uninterruptible

log = logging.getLogger(__name__)

# W&B keys of the pruned model's training epochs (RunLogger.log_epoch): the mean loss and the lr,
# plotted against the epochs trained so far in the run (all fine-tunes together).
EPOCH_AXIS = "train/epoch"
EPOCH_METRICS = ("train/loss", "train/lr")
# The dense model's training, when the run trains it (not from the cache): its own epochs.
DENSE_AXIS = "dense/epoch"
DENSE_METRICS = ("dense/loss", "dense/lr")
STEP_TABLE = "steps_table"  # the W&B Table of metrics.jsonl ("steps" is the summary's count)
MAX_TAG = 64  # characters: wandb.init refuses a longer tag

# W&B server URL -> why online runs cannot start there; checked once per process, so a tuning
# stage's many runs warn once.
_wandb_offline: dict[str, str | None] = {}
WANDB_ID_FILE = ".wandb-run-id"  # the W&B run of a run folder, continued by a resume


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically, so a kill never leaves half a file."""
    with atomic_open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


@dataclass
class RunInfo:
    """What a logger is told about the run it logs (W&B's run page, grouping and filters)."""

    config: dict[str, Any] | None = None  # the resolved config
    group: str | None = None  # the experiment (W&B's group adds the setting: setting_group)
    job_type: str | None = None  # the pipeline, or trial / final in a tuned run
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    resume: bool = False  # continues from a checkpoint: the W&B run continues too


class RunLogger:
    """Writes ``metrics.jsonl`` (one row per pruning step) and ``summary.json`` in the run folder
    (``logger=local``). Built from conf/logger/ as a ``_partial_`` node, then called with the run
    folder and its :class:`RunInfo`."""

    def __init__(self, run_dir: str | Path, info: RunInfo | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.summary_path = self.run_dir / "summary.json"
        self.wandb_run = None

    def log_step(self, row: dict[str, Any]) -> None:
        with uninterruptible(), self.metrics_path.open("a") as f:  # never half a row
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None})

    def log_epoch(self, row: dict[str, float], what: str = "train") -> None:
        """One training epoch of the pruned model (``what="train"``: ``epoch`` counts the
        epochs trained so far in the run) or of the dense model (``"dense"``): its mean ``loss``
        and ``lr``. W&B only: locally icep.log has a line per epoch."""
        if self.wandb_run is not None:
            self.wandb_run.log({f"{what}/{key}": value for key, value in row.items()})

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


class SilentLogger(RunLogger):
    """What the ranks other than 0 of a data-parallel run log: nothing (rank 0 writes the run's
    files and its W&B run, :mod:`icep.distributed`)."""

    def __init__(self, run_dir: str | Path, info: RunInfo | None = None):
        self.run_dir = Path(run_dir)
        self.wandb_run = None

    def log_step(self, row: dict[str, Any]) -> None:
        pass

    def log_epoch(self, row: dict[str, float], what: str = "train") -> None:
        pass

    def rewrite_steps(self, rows: list[dict[str, Any]]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass


class WandbLogger(RunLogger):
    """The local files plus a Weights & Biases run mirroring them (``logger=wandb``). A resumed
    run continues its W&B run (the id kept in ``.wandb-run-id``) instead of starting a second,
    partial one. Each setting left null takes the run's own (group, job type, name); ``tags``
    are added to the run's. The group, when left null, is the run's setting
    (:func:`setting_group`), so that W&B's grouped view compares the pipelines of one setting.

    Besides the per-step rows and the summary it logs each training epoch's loss and lr
    (:meth:`log_epoch`), a W&B Table of ``metrics.jsonl`` when the run ends (``steps_table``)
    and, with ``log_model``, ``model.pt`` as a ``model`` artifact."""

    def __init__(
        self,
        run_dir: str | Path,
        info: RunInfo | None = None,
        *,
        mode: str,
        project: str,
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        run_name: str | None = None,
        tags: Sequence[str] = (),
        connect_timeout: float = 5.0,
        init_timeout: float | None = None,
        log_model: bool = False,
    ):
        super().__init__(run_dir, info)
        info = info or RunInfo()
        self.mode, self.connect_timeout, self.init_timeout = mode, connect_timeout, init_timeout
        self.log_model = log_model
        self.wandb_run = self._start(
            project=project,
            entity=entity,
            group=group or setting_group(info.group, info.config),
            job_type=job_type or info.job_type,
            tags=[*tags, *info.tags, *_experiment_tags(info.group)],
            name=run_name or info.name,
            config=info.config,
            resume=info.resume,
        )

    def _start(self, resume: bool, **settings: Any):
        import wandb

        id_path = self.run_dir / WANDB_ID_FILE
        run_id = id_path.read_text().strip() if resume and id_path.is_file() else None

        def init(mode: str, silent: bool = False):
            timeout = self.init_timeout
            return wandb.init(
                **settings,
                id=run_id,
                resume="allow" if run_id else None,
                mode=mode,
                dir=str(self.run_dir),
                settings=wandb.Settings(
                    quiet=True,
                    silent=silent,  # after icep's own warning, wandb's offline notes repeat it
                    **({"init_timeout": timeout} if timeout is not None else {}),
                ),
                reinit="create_new",  # the tuning stage's trial runs live beside the final run
            )

        mode = self.mode
        if mode == "online":
            base_url = wandb.setup().settings.base_url
            if base_url not in _wandb_offline:
                reason = _wandb_offline_reason(base_url, self.connect_timeout)
                _wandb_offline[base_url] = reason
                if reason is not None:
                    self._warn_offline(reason)
            if _wandb_offline[base_url] is not None:
                mode = "offline"
        try:
            run = init(mode, silent=mode != self.mode)
        except wandb.errors.Error as exc:  # CommError (timeout), UsageError, AuthenticationError
            if mode != "online":
                raise
            self._warn_offline(f"wandb.init failed ({type(exc).__name__}: {_first_line(exc)})")
            run = init("offline", silent=True)
        id_path.write_text(run.id + "\n")
        # The pruning step is the x-axis of every per-step metric; t_total (cumulative seconds of
        # pruning cost) and flops_total (its counted work) are the axes a panel can pick instead
        # ("accuracy vs time", "accuracy vs compute").
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        run.define_metric("t_total", step_metric="step", summary="max")
        run.define_metric("flops_total", step_metric="step", summary="max")
        # The epochs have their own axis: a step holds any number of them.
        for axis, metrics in ((EPOCH_AXIS, EPOCH_METRICS), (DENSE_AXIS, DENSE_METRICS)):
            run.define_metric(axis)
            for key in metrics:
                run.define_metric(key, step_metric=axis)
        return run

    def close(self, failed: bool = False) -> None:
        """Log the per-step rows as a W&B Table (whatever the run's end) and, with
        ``log_model``, the pruned model of a completed run; then finish the W&B run."""
        run = self.wandb_run
        if run is not None:
            try:
                rows = self._rows()
                if rows:
                    run.log({STEP_TABLE: step_table(rows)})
                model = self.run_dir / "model.pt"
                if self.log_model and not failed and model.is_file():
                    self._log_model(run, model)
            # The W&B run mirrors the local files: its failure must not end the run, nor hide
            # the error the run is ending with.
            except Exception as exc:
                log.warning("W&B: the steps table or model artifact was not logged: %s", exc)
        super().close(failed)

    def _rows(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _log_model(self, run: Any, path: Path) -> None:
        import wandb

        summary = json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {}
        metadata = {k: v for k, v in summary.items() if isinstance(v, (bool, int, float, str))}
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact)

    def _warn_offline(self, reason: str) -> None:
        log.warning(
            "W&B: %s; logging offline instead (logger.mode=offline): upload later with "
            "`wandb sync %s`",
            reason,
            self.run_dir / "wandb" / "offline-run-*",
        )


def setting_group(experiment: str | None, config: dict[str, Any] | None) -> str | None:
    """The W&B group of a run: its experiment and the setting at which pipelines are compared,
    ``<experiment>/<model>-<dataset>-<criterion>-<share>`` (``paper_comparison/resnet152-cifar10-
    l1-r0.6``, ``default/resnet20-digits-l1-macs0.5``), so that the runs of one group differ only
    in pipeline (their job type) and seed. ``config``: the resolved config; without a model and
    dataset in it, the group is ``experiment``."""
    from icep.config import pruned_share

    config = config or {}
    model, dataset = config.get("model") or {}, config.get("dataset") or {}
    if "name" not in model or "name" not in dataset:
        return experiment
    share = pruned_share(config.get("pipeline") or {})
    setting = [
        str(model["name"]),
        str(dataset["name"]),
        *filter(None, [_criterion_name(config.get("criterion") or {})]),
        *([share if isinstance(share, str) else f"r{share}"] if share is not None else []),
    ]
    return "/".join(filter(None, [experiment, "-".join(setting)]))


def experiment_tag(experiment: str) -> str:
    """The W&B tag of an experiment's runs (``experiment:paper_comparison``), which a view
    filters them by: W&B filters groups by whole name only, not by prefix. Left out of a run
    when longer than W&B allows (:data:`MAX_TAG`)."""
    return f"experiment:{experiment}"


def _experiment_tags(experiment: str | None) -> list[str]:
    tag = experiment_tag(experiment) if experiment else None
    return [tag] if tag is not None and len(tag) <= MAX_TAG else []


def _criterion_name(node: dict[str, Any]) -> str | None:
    """The ``name`` of the criterion class a config node builds (``l1``), or None."""
    from hydra.utils import get_class

    try:
        return getattr(get_class(node["_target_"]), "name", None)
    except (KeyError, ImportError, ValueError):
        return None


def step_table(rows: list[dict[str, Any]]) -> Any:
    """``rows`` (metrics.jsonl) as a ``wandb.Table``: one column per key, in the order the keys
    first appear; a list or mapping value as its JSON text."""
    import wandb

    columns = list(dict.fromkeys(key for row in rows for key in row))
    data = [
        [
            json.dumps(v) if isinstance(v, (list, dict)) else v
            for v in (row.get(key) for key in columns)
        ]
        for row in rows
    ]
    # A column may hold numbers in some rows and None or text in others.
    return wandb.Table(columns=columns, data=data, allow_mixed_types=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else "no message"


def _wandb_offline_reason(base_url: str, timeout: float) -> str | None:
    """Why an online W&B run cannot start (no API key, the server does not answer within
    ``timeout`` seconds), or None. Checked up front: wandb.init would wait its whole
    ``init_timeout`` for an unreachable server, or prompt for a key on a terminal."""
    try:
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:  # another wandb layout: wandb.init's own errors are the fallback
        pass
    else:
        try:
            auth = authenticate_session(
                host=base_url, source="icep", prompt=False, update_session=False
            )
        except Exception as exc:  # a malformed key
            return f"the API key for {base_url} is not usable ({_first_line(exc)})"
        if auth is None:
            return f"no API key for {base_url} (run `wandb login` or set WANDB_API_KEY)"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(base_url, method="HEAD"), timeout=timeout
        ):
            pass
    except urllib.error.HTTPError:
        pass  # the server answered
    except (OSError, ValueError) as exc:  # refused, unreachable, timed out, a bad URL
        return f"{base_url} cannot be reached ({getattr(exc, 'reason', None) or exc})"
    return None
