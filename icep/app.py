"""The ``python -m icep`` entry point: compose the config, check it, run one pipeline, report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from icep import distributed
from icep.cli_errors import describe_error, exit_with, one_line
from icep.config import (
    build,
    parse_budget,
    pipeline_label,
    run_name,
    run_tags,
    user_cache,
    uses_ratio,
    validate,
)
from icep.console import format_table, scalars
from icep.errors import IcepError
from icep.interrupts import Interrupted, stop_on_signals
from icep.locks import locked
from icep.resume import (
    CHECKPOINT,
    LOCK,
    fingerprint,
    folder_taken,
    mark_job,
    put_back_earlier_files,
    resume_from,
    save_run_config,
)
from icep.seeding import seed_everything

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """One run in the Hydra output folder, which no other run may use meanwhile; returns the
    summary."""
    if not cfg.paths.cache or cfg.paths.cache == "/icep":  # ICEP_CACHE= or XDG_CACHE_HOME= (set,
        cfg.paths.cache = str(user_cache())  # but empty) mean unset, not the current folder or /
        log.warning("ICEP_CACHE or XDG_CACHE_HOME is set but empty: caching in %s", cfg.paths.cache)
    validate(cfg)  # every key, before the data and the models: a typo fails fast
    if cfg.get("dry_run"):
        return distributed.on_main(lambda: dry_run(cfg)) or {"status": "dry_run"}
    out = Path(HydraConfig.get().runtime.output_dir)
    if not distributed.is_main():  # rank 0 holds the folder for the run
        return _run(cfg, out)
    refusal = "wait for it to end, or choose another hydra.run.dir"
    with locked(out / LOCK, f"the run folder {out}", wait=False, refusal=refusal):
        return _run(cfg, out)


def _run(cfg: DictConfig, out: Path) -> dict[str, Any]:
    # Imports here keep `python -m icep --help` and config errors fast.
    from icep.data import data_from_config
    from icep.dense import arch_spec, dense_model, model_meta
    from icep.latency import latency_fields
    from icep.loggers import RunInfo, SilentLogger
    from icep.pipelines import PruningRun
    from icep.provenance import run_git, run_versions
    from icep.pruning.budget import meet as meet_budget
    from icep.serialization import save_model
    from icep.train import Trainer

    dense_only = "_target_" not in cfg.pipeline  # pipeline=dense: train the unpruned model only
    pipeline = None if dense_only else build(cfg, "pipeline")
    criterion = build(cfg, "criterion")
    make_logger = build(cfg, "logger")
    config = OmegaConf.to_container(cfg, resolve=True)
    # Rank 0 of a data-parallel run reads the folder and sends every rank its checkpoint.
    checkpoint = distributed.from_main(lambda: _take_folder(cfg, out, config))
    if checkpoint == "completed":
        summary = distributed.from_main(lambda: _completed(out))
        return summary
    folder_taken()
    seed_everything(cfg.seed)
    trainer = Trainer.from_config(cfg.trainer)
    # Rank 0 first: a download, an archive to unpack or images to decode are done once.
    data = distributed.on_main(lambda: data_from_config(cfg, trainer.device))
    if data is None:
        data = data_from_config(cfg, trainer.device)
    if not dense_only:
        # Before any training: a model icep cannot prune is refused in one line.
        distributed.on_main(lambda: log.info(check_model(cfg, data).table().splitlines()[0]))
    info = RunInfo(
        config=config,
        group=cfg.name,
        job_type="final" if cfg.get("tune") is not None else pipeline_label(cfg.pipeline),
        tags=run_tags(cfg, criterion.name),
        name=run_name(cfg, criterion.name),
        resume=checkpoint is not None,
    )
    logger = make_logger(out, info) if distributed.is_main() else SilentLogger(out, info)
    if cfg.resume and checkpoint is None:
        logger.rewrite_steps([])  # starting afresh: no rows from the attempt before
    head = {
        "pipeline": pipeline_label(cfg.pipeline),
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "criterion": criterion.name,
        "seed": cfg.seed,
        "device": str(trainer.device),
        "ranks": distributed.world().size,
        "versions": run_versions(),
        "git": run_git(Path(HydraConfig.get().runtime.cwd)),
    }
    failed, pruning = True, None
    try:
        model, origin = dense_model(
            cfg, data, trainer, on_epoch=lambda row: logger.log_epoch(row, "dense")
        )
        if dense_only:
            summary = {
                **head,
                "status": "completed",
                "acc_val": trainer.evaluate(model, data.val) if data.val is not None else None,
                "acc_test": trainer.evaluate(model, data.test),
                **origin,
            }
        else:
            pipeline_cfg, tuning = cfg.pipeline, None
            latency_before = measured_latency(cfg, model, data, trainer, "before pruning")
            if cfg.get("tune") is not None:
                from icep.tune.stage import tune_pipeline

                tuning = tune_pipeline(cfg, model, data, trainer, criterion, out)
                pipeline_cfg, pipeline = tuning.pipeline_cfg, instantiate(tuning.pipeline_cfg)
            pruning = PruningRun(
                model,
                data,
                trainer,
                criterion,
                logger,
                checkpoint=out / CHECKPOINT,
                config=fingerprint(config),
                ignored_layers=cfg.model.get("ignored_layers", ()),
                ties=cfg.get("ties", "stable"),
                step_data=step_data(pipeline_cfg, data, cfg.seed),
                round_to=getattr(pipeline, "round_to", 1),  # a pipeline of your own may not say
            )
            # pipeline.target={macs: ...}; a resumed run goes on with the solution it had
            solved = checkpoint["state"].get("budget") if checkpoint is not None else None
            budget = meet_budget(pipeline, pruning, cfg.get("latency"), solved)
            if cfg.optuna.trial is not None:  # rank 0 reports; its trial's verdict holds for all
                from icep.tune.study import for_every_rank

                reporter = distributed.on_main(lambda: _sweep_reporter(cfg))
                pruning.on_step.append(for_every_rank(reporter))
            # The pruning run must not depend on whether dense training ran or came from a cache.
            seed_everything(cfg.seed, data)
            if checkpoint is not None:
                pruning.restore(checkpoint)
            summary = {
                **head,
                "status": "completed",
                "ratio": pipeline.ratio if uses_ratio(pipeline_cfg) else None,
                **pipeline(pruning),
            }
            summary.update(
                latency_fields(
                    latency_before, measured_latency(cfg, model, data, trainer, "pruned")
                )
            )
            if budget is not None:
                if budget["kind"] == "latency":  # the pruned model's own measurement
                    what = 1 / summary[f"inference_speedup_b{budget['batch']}"]
                else:
                    what = summary[f"{budget['kind']}_ratio"]
                summary["budget"] = {**budget, "reached": what, "met": what <= budget["share"]}
            summary["dense"] = origin
            if tuning is not None:
                summary.update(
                    tuning.summary_fields(
                        summary["time_total_s"], summary["flops_total"], summary["time_wall_s"]
                    )
                )
        in_model = scalars(summary)
        summary["model_path"] = str(out / "model.pt")
        summary["output_dir"] = str(out)

        def write() -> None:
            save_model(
                model,
                arch_spec(cfg, data),
                out / "model.pt",
                **model_meta(cfg, data),
                summary=in_model,
            )
            logger.log_summary(summary)
            (out / CHECKPOINT).unlink(missing_ok=True)  # model.pt and summary.json replace it

        distributed.on_main(write)
        failed = False
    except Interrupted as exc:
        done = len(pruning.rows) if pruning is not None else 0
        peer = distributed.peer_failure()  # torchrun stops the others when a rank failed
        if peer is not None:
            logger.log_summary({**head, "status": "failed", "reason": peer, "steps": done})
        else:
            logger.log_summary({**head, "status": "interrupted", "reason": exc.name, "steps": done})
        exc.steps = done
        raise
    except Exception as exc:
        status = "pruned" if type(exc).__name__ == "TrialPruned" else "failed"
        reason = one_line(exc)
        if distributed.active() and status == "failed":  # a rank failed: its line says why
            reason = distributed.peer_failure() or reason
        logger.log_summary({**head, "status": status, "reason": reason})
        raise
    finally:
        logger.close(failed=failed)
    if distributed.is_main():
        print(format_table(summary), flush=True)
    return summary


def _take_folder(cfg: DictConfig, out: Path, config: dict[str, Any]) -> Any:
    """Make the run folder this run's: the checkpoint to continue from (None: start afresh),
    or "completed" when it holds a finished run. Refuses a folder holding another run."""
    checkpoint = resume_from(
        cfg, out, fingerprint(config), overrides=list(HydraConfig.get().overrides.task)
    )
    if checkpoint == "completed":
        return checkpoint
    if cfg.get("tune") is not None:  # a study that cannot be opened fails before any training
        from icep.tune.study import open_storage, storage_url

        open_storage(storage_url(cfg.tune.storage, out / "tune.db"))
    folder_taken()
    save_run_config(out, fingerprint(config))
    mark_job(out)
    return checkpoint


def _completed(out: Path) -> dict[str, Any]:
    put_back_earlier_files()  # the folder is the finished run's, as it was
    summary = json.loads((out / "summary.json").read_text())
    print(f"icep: {out} holds a completed run; nothing to resume", flush=True)
    return summary


def measured_latency(
    cfg: DictConfig, model: Any, data: Any, trainer: Any, what: str
) -> dict[int, float]:
    """:func:`latency`, measured on rank 0 of a data-parallel run for every rank."""
    return distributed.from_main(lambda: latency(cfg, model, data, trainer, what))


def latency(cfg: DictConfig, model: Any, data: Any, trainer: Any, what: str) -> dict[int, float]:
    """The model's measured latency per batch size (``latency:``, icep.latency), logged."""
    from icep.latency import measure_latency

    sizes = list(cfg.latency.batch_sizes) if cfg.get("latency") is not None else []
    budget = parse_budget(cfg.pipeline.get("target"))
    if budget is not None and budget.kind == "latency" and budget.batch not in sizes:
        sizes.append(budget.batch)  # what the budget is judged by
    if not sizes:
        return {}
    found = measure_latency(
        model,
        data.input_shape,
        trainer,
        sizes,
        min_run_time=cfg.latency.min_run_time,
        warmup=cfg.latency.warmup,
    )
    log.info(
        "latency %s on %s: %s",
        what,
        trainer.device,
        ", ".join(f"batch {size} {ms:.3g} ms" for size, ms in found.items()),
    )
    return found


def check_model(cfg: DictConfig, data: Any) -> Any:
    """The pre-flight check of the configured model on the dataset's inputs (icep.preflight):
    its :class:`~icep.preflight.Preflight` report, or a one-line refusal."""
    from icep.dense import build_model
    from icep.preflight import preflight

    ratio = cfg.pipeline.ratio if uses_ratio(cfg.pipeline) else 0.5
    report = preflight(
        build_model(cfg, data, weights=False),  # no download for a check
        data.input_shape,
        data.num_classes,
        name=cfg.model.name,
        ignored=cfg.model.get("ignored_layers", ()),
        ratio=ratio,
        seconds=cfg.model.get("preflight_seconds", 60),
    )
    return report


def step_data(pipeline_cfg: DictConfig, data: Any, seed: int) -> Any:
    """The seeded share of the data a pipeline's steps use (``pipeline.step_train_fraction``
    and ``step_eval_fraction``; the reference's DenseNet run: 2% of each), or None: all of it."""
    train = pipeline_cfg.get("step_train_fraction")
    evaluate = pipeline_cfg.get("step_eval_fraction")
    if train is None and evaluate is None:
        return None
    from icep.data import subsample

    return subsample(
        data, 1.0 if train is None else train, 1.0 if evaluate is None else evaluate, seed
    )


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """``--dry-run``: the pre-flight check and the unit table; no training, no run folder."""
    from icep.data import data_from_config

    seed_everything(cfg.seed)
    report = check_model(cfg, data_from_config(cfg, "cpu"))
    print(report.table(), flush=True)
    return {"status": "dry_run", "units": len(report.units)}


def _sweep_reporter(cfg: DictConfig):
    """Report to the Optuna trial that hydra/sweeper=icep_optuna made for this job."""
    from icep.tune.study import StepReporter, attach_trial

    if cfg.optuna.storage is None or cfg.optuna.study_name is None:
        raise IcepError(
            "optuna.trial is set but optuna.storage or optuna.study_name is not; the sweeper sets "
            "all three (hydra/sweeper=icep_optuna), leave them null otherwise"
        )
    return StepReporter(attach_trial(cfg.optuna.storage, cfg.optuna.study_name, cfg.optuna.trial))


def interrupted_line(exc: Interrupted) -> str:
    """The one line a run stopped by a signal ends with: where it stopped, how to go on."""
    hydra_cfg = HydraConfig.get()
    steps = getattr(exc, "steps", None)
    done = f" after {steps} pruning step{'s' if steps > 1 else ''}" if steps else ""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        again = f"the same command with resume=true hydra.sweep.dir={hydra_cfg.sweep.dir}"
    else:
        again = f"resume=true hydra.run.dir={hydra_cfg.runtime.output_dir}"
    return f"icep: {exc}{done}; {again} continues from the last checkpoint"


# Set by main() unless the user asked for Hydra's full tracebacks (HYDRA_FULL_ERROR).
_describe_errors = False


@hydra.main(version_base="1.3", config_path="pkg://icep.conf", config_name="config")
def _app(cfg: DictConfig) -> dict[str, Any] | None:
    """Returns the summary: a sweeper reads its objectives from it (hydra.sweeper.objectives)."""
    joined_here = not distributed.active()  # a Slurm task's job; torchrun's ranks joined in main
    try:
        distributed.start()
        _quiet_other_ranks()
        with stop_on_signals():
            summary = run(cfg)
        if joined_here:
            distributed.finish()
        return summary
    except Interrupted as exc:  # the run stops, and a sweep with it
        if distributed.is_main():
            put_back_earlier_files()
            if distributed.peer_failure() is None:  # (torchrun stops the others of a failed rank)
                print(interrupted_line(exc), file=sys.stderr, flush=True)
        exc.said = True
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # through the launcher: the sweeper records the job interrupted, and stops
        sys.exit(exc.exit_code)
    except Exception as exc:
        if distributed.is_main():
            put_back_earlier_files()  # a refused or failed start leaves an earlier run as it was
        if distributed.active():
            _rank_failed(exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the job fails, the sweep goes on
        # Here rather than in main(): an error leaving the job makes Hydra print a line first.
        message = describe_error(exc) if _describe_errors else None
        if message is None and isinstance(exc, IcepError):
            message = str(exc)
        if message is None:
            raise
        exit_with(message)
    return None


def _quiet_other_ranks() -> None:
    """The ranks other than 0 of a data-parallel run log errors only, to the console: rank 0's
    icep.log and output are the run's."""
    if distributed.is_main():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.ERROR)


def _rank_failed(exc: Exception) -> None:
    """A rank of a data-parallel run failed: tell the others, and end it with the run's one line
    when this is its first failure, quietly otherwise. In a multirun every rank's error goes back
    to the launcher (rank 0's is the job's; a Slurm job's other tasks must end in a result too)."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    peer = distributed.peer_failure()
    if isinstance(exc, distributed.PeerFailed) or (peer is not None and _lost_contact(exc)):
        if multirun:
            raise exc
        sys.exit(1)
    message = describe_error(exc) if _describe_errors else None
    if message is None and isinstance(exc, IcepError):
        message = str(exc)
    if message is None and _lost_contact(exc):
        message = (
            f"lost contact with another rank of the run ({one_line(exc)}); it was killed or "
            "its machine went away: see its output, then resume=true continues the run"
        )
    first = distributed.report_failure(message or one_line(exc))
    if multirun:
        raise exc
    if not first:
        sys.exit(1)
    if message is None:
        raise exc  # a bug: its traceback
    where = "" if distributed.is_main() else f"rank {distributed.world().rank}: "
    distributed.tell_launcher(f"icep: error: {where}{message}")
    exit_with(where + message)


def _lost_contact(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset", "Broken pipe")
    )


def main() -> None:
    """Run the Hydra app; errors the user can fix end as one line and exit code 2."""
    global _describe_errors
    scratch = None
    if "--dry-run" in sys.argv:  # the pre-flight only, in a scratch folder that goes afterwards
        sys.argv.remove("--dry-run")
        scratch = tempfile.mkdtemp(prefix="icep-dry-run-")
        sys.argv += ["dry_run=true", "hydra.output_subdir=null", f"hydra.run.dir={scratch}"]
    own_errors = "HYDRA_FULL_ERROR" not in os.environ
    if own_errors:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's printer
        _describe_errors = True
    from icep.sweeps import closing_lines, forget_sweeps

    try:
        _join_ranks()
        with stop_on_signals():  # from the start: composing the config, a sweeper between jobs
            _app()
    except Interrupted as exc:  # before the run began or after it ended, or a sweep stopped
        forget_sweeps()  # the line that ends it says how to go on
        if not getattr(exc, "said", False) and distributed.is_main():
            print(f"icep: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # raised by other code than icep's signal handlers
        forget_sweeps()
        if distributed.is_main():
            print("icep: interrupted by SIGINT", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as exc:
        message = describe_error(exc) if own_errors else None
        if message is None:
            raise
        if distributed.is_main():
            _say(closing_lines())  # where a failed multirun's runs are; the error line stays last
        exit_with(message)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if distributed.is_main():
        _say(closing_lines())  # a multirun that ended: where its runs, report and logs are
    distributed.finish()


def _join_ranks() -> None:
    """Under torchrun: join the other ranks before Hydra makes the run folder, so that every rank
    composes the same one (``${now:...}`` is rank 0's time); the other ranks write no .hydra/."""
    if distributed.launched().size == 1:
        return
    from datetime import datetime

    import hydra.core.utils

    distributed.start()
    stamp = distributed.from_main(datetime.now)

    class _RankZeroClock(datetime):
        @classmethod
        def now(cls, tz=None):  # the `now` resolver Hydra registers reads this module's datetime
            return stamp

    hydra.core.utils.datetime = _RankZeroClock
    if not distributed.is_main():
        sys.argv.append("hydra.output_subdir=null")


def _say(lines: list[str]) -> None:
    for line in lines:
        print(line, flush=True)
