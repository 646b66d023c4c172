"""The ``python -m icep`` entry point: compose the config, check it, run one pipeline, report."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from icep.compute import format_flops
from icep.config import pipeline_label, pruned_share, uses_ratio
from icep.errors import IcepError
from icep.seeding import seed_everything

log = logging.getLogger("icep")


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run in the Hydra output folder; returns the summary."""
    # Imports here keep `python -m icep --help` and config errors fast.
    from icep.config import validate
    from icep.data import data_from_config
    from icep.dense import arch_spec, dense_model
    from icep.loggers import RunLogger
    from icep.pipelines import PIPELINES, PruningRun, check_pipeline
    from icep.pruning import build_criterion
    from icep.serialization import save_model
    from icep.train import Trainer

    validate(cfg)
    if cfg.get("tune") is not None:
        from icep.tune.stage import check_tune

        check_tune(cfg)  # before the data and the dense model, so a typo fails fast
    if cfg.pipeline.name not in PIPELINES and cfg.pipeline.name != "dense":
        raise IcepError(
            f"pipeline.name: unknown pipeline '{cfg.pipeline.name}'; choose one of: dense, {', '.join(PIPELINES)}"
        )
    if cfg.pipeline.name != "dense":
        check_pipeline(cfg.pipeline)  # its own keys, before the data and the dense model
    out = Path(HydraConfig.get().runtime.output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = _resume_from(
        cfg, out, _fingerprint(config), overrides=list(HydraConfig.get().overrides.task)
    )
    if checkpoint == "completed":
        summary = json.loads((out / "summary.json").read_text())
        print(f"icep: {out} holds a completed run; nothing to resume", flush=True)
        return summary
    _mark_job(out)
    seed_everything(cfg.seed)
    trainer = Trainer.from_config(cfg.trainer)
    criterion = build_criterion(
        cfg.criterion.name, **{k: v for k, v in cfg.criterion.items() if k != "name"}
    )
    data = data_from_config(cfg, trainer.device)
    logger = RunLogger(
        out,
        cfg.logger,
        config=config,
        group=cfg.name,
        job_type="final" if cfg.get("tune") is not None else pipeline_label(cfg.pipeline),
        tags=_run_tags(cfg),
        name=_run_name(cfg),
        resume=checkpoint is not None,
    )
    if cfg.resume and checkpoint is None:
        logger.rewrite_steps([])  # starting afresh: no rows from the attempt before
    head = {
        "pipeline": pipeline_label(cfg.pipeline),
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "criterion": cfg.criterion.name,
        "seed": cfg.seed,
        "device": str(trainer.device),
    }
    failed = True
    try:
        model, origin = dense_model(cfg, data, trainer)
        if cfg.pipeline.name == "dense":
            summary = {
                **head,
                "status": "completed",
                "acc_val": trainer.evaluate(model, data.val),
                "acc_test": trainer.evaluate(model, data.test),
                **origin,
            }
        else:
            pipeline_cfg, tuning = cfg.pipeline, None
            if cfg.get("tune") is not None:
                from icep.tune.stage import tune_pipeline

                tuning = tune_pipeline(cfg, model, data, trainer, criterion, out)
                pipeline_cfg = tuning.pipeline_cfg
            pruning = PruningRun(
                model,
                data,
                trainer,
                criterion,
                logger,
                checkpoint=out / CHECKPOINT,
                config=_fingerprint(config),
            )
            if cfg.optuna.trial is not None:
                pruning.on_step.append(_sweep_reporter(cfg))
            # The pruning run must not depend on whether dense training ran or came from a cache.
            seed_everything(cfg.seed, data)
            if checkpoint is not None:
                pruning.restore(checkpoint)
            summary = {
                **head,
                "status": "completed",
                "ratio": pipeline_cfg.ratio if uses_ratio(pipeline_cfg) else None,
                **PIPELINES[cfg.pipeline.name](pruning, pipeline_cfg),
                "dense": origin,
            }
            if tuning is not None:
                summary.update(
                    tuning.summary_fields(summary["time_total_s"], summary["flops_total"])
                )
        save_model(model, arch_spec(cfg, data), out / "model.pt", summary=_scalars(summary))
        summary["model_path"] = str(out / "model.pt")
        summary["output_dir"] = str(out)
        logger.log_summary(summary)
        (out / CHECKPOINT).unlink(missing_ok=True)  # model.pt and summary.json replace it
        failed = False
    except Exception as exc:
        status = "pruned" if type(exc).__name__ == "TrialPruned" else "failed"
        logger.log_summary({**head, "status": status, "reason": _one_line(exc)})
        raise
    finally:
        logger.close(failed=failed)
    print(format_table(summary), flush=True)
    return summary


def _run_tags(cfg: DictConfig) -> list[str]:
    """W&B tags that tell runs of one experiment apart in filters and grouped views."""
    share = pruned_share(cfg.pipeline)
    return [
        pipeline_label(cfg.pipeline),
        cfg.model.name,
        cfg.dataset.name,
        cfg.criterion.name,
        *([f"ratio={share}"] if share is not None else []),
        f"seed={cfg.seed}",
    ]


def _run_name(cfg: DictConfig) -> str:
    """The W&B run name: pipeline, criterion, ratio and seed, e.g. ``ice-l1-r0.6-s0``."""
    share = pruned_share(cfg.pipeline)
    return "-".join(
        [
            pipeline_label(cfg.pipeline),
            cfg.criterion.name,
            *([f"r{share}"] if share is not None else []),
        ]
        + [f"s{cfg.seed}"]
    )


CHECKPOINT = "checkpoint.pt"
# Keys that do not change what a run computes: a resume may differ in them.
_RESUME_FREE = (
    "resume",
    "logger",
    "paths",
    "optuna",
    "trainer.progress",
    "trainer.num_workers",
    "trainer.prefetch_factor",
)


def _fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` flattened to dotted keys, without the keys a resume may change."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(config, "")
    return {
        k: v
        for k, v in flat.items()
        if not any(k == f or k.startswith(f + ".") for f in _RESUME_FREE)
    }


def _resume_from(
    cfg: DictConfig, out: Path, config: dict[str, Any], overrides: list[str] = ()
) -> dict[str, Any] | str | None:
    """The checkpoint to continue from, "completed" when the run folder holds a finished run, or
    None to start afresh. A folder that already holds a run is never overwritten.

    A key the checkpoint's config lacks was added to icep since it was written: unless the
    command line (``overrides``) sets it, it holds its default, which by icep's rule for new keys
    computes what the run did before, so it does not block the resume."""
    from icep.pipelines.base import CHECKPOINT_FORMAT

    path, summary = out / CHECKPOINT, out / "summary.json"
    requeued = path.is_file() and _requeued(out)
    if not (cfg.resume or requeued):
        if path.is_file() or summary.is_file():
            raise IcepError(
                f"{out} already holds a run ({'checkpoint.pt' if path.is_file() else 'summary.json'}"
                "); resume=true continues it, or choose another hydra.run.dir"
            )
        return None
    if not path.is_file():
        if summary.is_file() and json.loads(summary.read_text()).get("status") == "completed":
            return "completed"
        log.warning("resume: %s has no checkpoint yet; starting the run from the beginning", out)
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IcepError(
            f"resume: {path} cannot be read ({type(exc).__name__}); it is damaged: delete it to "
            "start the run again from the beginning"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise IcepError(f"resume: {path} is not an icep checkpoint ({CHECKPOINT_FORMAT})")
    saved = blob.get("config") or {}
    named = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    added = sorted(
        k
        for k in set(config) - set(saved)
        if not any(k == n or k.startswith(n + ".") for n in named)
    )
    if added:
        log.info("resume: keys new since the checkpoint, at their defaults: %s", ", ".join(added))
    differ = sorted(
        k for k in set(saved) | set(config) if k not in added and saved.get(k) != config.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}={saved.get(k)!r} there, {config.get(k)!r} now" for k in differ[:3])
        raise IcepError(
            f"resume: {out} holds a run of another config ({shown}"
            f"{', ...' if len(differ) > 3 else ''}); resume it with the same overrides, or start "
            "a new run folder"
        )
    for stale in out.glob(f".{CHECKPOINT}.*.tmp"):  # a write the kill interrupted
        stale.unlink()
    log.info("resume: continuing %s after step %d", out, blob["steps"])
    return blob


JOB_MARK = ".icep-job"  # the scheduler job that wrote the run folder's checkpoint


def _scheduler_job() -> str | None:
    """The id of the Slurm or submitit job running this process, or None. A requeued job keeps
    its id (``scontrol requeue``; submitit's local executor restarts the same job)."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        return str(submitit.JobEnvironment().job_id)
    if os.environ.get("SLURM_JOB_ID"):
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array[0]}_{array[1]}" if all(array) else os.environ["SLURM_JOB_ID"]
    return None


def _requeued(out: Path) -> bool:
    """Whether this job is a requeue of the one that checkpointed in ``out``: Slurm says so
    (``SLURM_RESTART_COUNT`` > 0), or the folder's job mark names this job. A new job meeting
    an old checkpoint is no requeue: it needs resume=true."""
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return True
    job, mark = _scheduler_job(), out / JOB_MARK
    return job is not None and mark.is_file() and mark.read_text().strip() == job


def _mark_job(out: Path) -> None:
    """Note the scheduler job that runs in ``out``, so its requeue finds its checkpoint."""
    job = _scheduler_job()
    if job is not None:
        (out / JOB_MARK).write_text(job + "\n")


# Hydra writes .hydra/*.yaml into the run folder before icep starts: when that folder holds an
# earlier run, its files are kept here so that a start icep refuses can put them back.
_earlier_hydra_files: dict[Path, bytes] = {}


class KeepEarlierRun(Callback):
    """A Hydra callback (conf/config.yaml, hydra.callbacks) that snapshots the earlier run's
    .hydra/*.yaml when ``hydra.run.dir`` already holds a run."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out, sub = Path(str(config.hydra.run.dir)), config.hydra.output_subdir
        if sub is not None and ((out / CHECKPOINT).is_file() or (out / "summary.json").is_file()):
            _earlier_hydra_files.update({f: f.read_bytes() for f in (out / sub).glob("*.yaml")})


def _put_back_earlier_hydra_files() -> None:
    for path, data in _earlier_hydra_files.items():
        path.write_bytes(data)


def _sweep_reporter(cfg: DictConfig):
    """Report to the Optuna trial that hydra/sweeper=icep_optuna made for this job."""
    from icep.tune.study import StepReporter, attach_trial

    if cfg.optuna.storage is None or cfg.optuna.study_name is None:
        raise IcepError(
            "optuna.trial is set but optuna.storage or optuna.study_name is not; the sweeper sets "
            "all three (hydra/sweeper=icep_optuna), leave them null otherwise"
        )
    return StepReporter(attach_trial(cfg.optuna.storage, cfg.optuna.study_name, cfg.optuna.trial))


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _count(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(int(n))


def _share(s: dict[str, Any]) -> str:
    """How much the run pruned: a per-unit ratio, or a schedule's target and where it ended."""
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


def format_table(s: dict[str, Any]) -> str:
    """The closing report: accuracy, size, fine-tunes, time per phase, where the outputs are."""
    if s["pipeline"] == "dense":
        return (
            f"\nicep: dense {s['model']} on {s['dataset']} ({s['device']}): val {s['acc_val']:.2f}%, "
            f"test {s['acc_test']:.2f}%\nmodel: {s['model_path']}\n"
        )
    rows = [
        ("", "before", "after"),
        ("val accuracy (%)", f"{s['acc_original_val']:.2f}", f"{s['acc_final_val']:.2f}"),
        ("test accuracy (%)", f"{s['acc_original_test']:.2f}", f"{s['acc_final_test']:.2f}"),
        ("params", _count(s["params_before"]), _count(s["params_after"])),
        ("MACs", _count(s["macs_before"]), _count(s["macs_after"])),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        f"\nicep: {s['pipeline']} pruning of {s['model']} on {s['dataset']} "
        f"({_share(s)}, {s['device']})"
    ]
    lines += [f"  {a:<{width}}{b:>10}  {c:>10}" for a, b, c in rows]
    lines.append(f"  {'fine-tuned':<{width}}{s['finetunes']} of {s['steps']} steps")
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


# Set by main() unless the user asked for Hydra's full tracebacks (HYDRA_FULL_ERROR).
_describe_errors = False


@hydra.main(version_base="1.3", config_path="pkg://icep.conf", config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any] | None:
    """Returns the summary: a sweeper reads its objectives from it (hydra.sweeper.objectives)."""
    from icep.config import validate

    try:
        validate(cfg)  # before run() imports the heavy modules: a bad value fails at once
        return run(cfg)
    except Exception as exc:
        _put_back_earlier_hydra_files()  # a refused or failed start leaves an earlier run as it was
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the job fails, the sweep goes on
        # Here rather than in main(): an error leaving the job makes Hydra print a line first.
        message = describe_error(exc) if _describe_errors else None
        if message is None and isinstance(exc, IcepError):
            message = str(exc)
        if message is None:
            raise
        _exit_with(message)
    return None


def _exit_with(message: str) -> None:
    print(f"icep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (``raise ... from``), outermost first. Not
    the ones it was raised while handling: that would pass a bug off as the error it hit."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__
    return chain


# Errors of the file system the user can fix: permissions, a read-only or full disk, a file where
# a folder should be.
_FILE_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
}


def _describe_os_error(exc: BaseException, error: OSError) -> str:
    where = f"{error.strerror or error}: {error.filename}" if error.filename else str(error)
    frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
    if "run_job" in frames and "_app" not in frames:  # Hydra setting up the run folder
        return (
            f"cannot create the run folder ({where}); pick a writable folder with "
            "hydra.run.dir=... (hydra.sweep.dir=... with -m) or paths.outputs=..."
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{where}; free some space, or write elsewhere with paths.outputs=... / paths.cache=..."
        )
    return (
        f"{where}; fix its permissions, or use other folders: paths.outputs=..., paths.cache=... "
        "(or $ICEP_CACHE), dataset.root=..."
    )


def describe_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain = _chain(exc)
    for link in chain:  # e.g. a builder's ConfigError inside Hydra's InstantiationException
        if isinstance(link, IcepError):
            return str(link)
    for link in chain:
        if isinstance(link, torch.cuda.OutOfMemoryError):  # outside the trainer's loops
            what, *detail = (part.rstrip(".") for part in _one_line(link).split(". "))
            return (
                f"{what}{f' ({detail[0]})' if detail else ''}; lower trainer.batch_size and "
                "trainer.eval_batch_size, or free the GPU of other work"
            )
        if isinstance(link, OSError) and link.errno in _FILE_ERRNOS:
            return _describe_os_error(exc, link)
    for link in chain:  # the submitit launcher's sbatch call
        if (
            isinstance(link, subprocess.CalledProcessError)
            and Path(str(link.cmd[0])).name == "sbatch"
        ):
            said = _one_line(RuntimeError(link.stderr or link.output or f"exit {link.returncode}"))
            return (
                f"sbatch refused the sweep ({said}); check the hydra.launcher.* keys "
                "(partition, account, qos, gpus_per_node, mem_gb, timeout_min: "
                "conf/hydra/launcher/slurm.yaml)"
            )
    if isinstance(exc, ValueError) and str(exc).startswith("Only one of --run, --multirun"):
        return f"{exc}: print a multirun's config with --cfg job, without -m"
    if 'Could not detect "srun"' in str(exc):
        return (
            "hydra/launcher=slurm needs a Slurm cluster (no srun on PATH here); on one machine "
            "use hydra/launcher=local"
        )
    if isinstance(exc, MissingConfigException) and exc.options is not None and exc.missing_cfg_file:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        return f"{group}={name} is not an option; choose one of: {', '.join(exc.options)} (conf/{group}/)"
    cause = exc.__cause__
    if isinstance(exc, ConfigCompositionException) and isinstance(
        cause, (ConfigKeyError, ConfigAttributeError)
    ):
        key = cause.full_key or cause.key
        parent = cause.parent_node
        known = f"; keys there: {', '.join(map(str, parent.keys()))}" if parent is not None else ""
        return f"{key} is not a config key{known} (to add a new key use +{key}=...)"
    if "requires --multirun" in str(exc):
        (override,) = re.findall(r"'([^']*)'", str(exc))[:1] or ["KEY=EXPR"]
        key, _, expression = override.partition("=")
        if key.lstrip("+").startswith(("tune.space", "pipeline.grid", "pipeline.ranges")):
            return (
                f"{override}: quote the search expression so Hydra keeps it as text: "
                f"'{key}=\"{expression}\"'"
            )
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        text = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if cause is not None and str(cause).strip():
            text.append(str(cause).strip().splitlines()[0])
        return " ".join(text)
    return None


def main() -> None:
    """Run the Hydra app; errors the user can fix end as one line and exit code 2."""
    global _describe_errors
    own_errors = "HYDRA_FULL_ERROR" not in os.environ
    if own_errors:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
        _describe_errors = True
    try:
        _app()
    except Exception as exc:
        message = describe_error(exc) if own_errors else None
        if message is None:
            raise
        _exit_with(message)
