"""The auto-tuning stage inside one run (METHOD.md section 3.4): before the final run, search ICE's
hyperparameters with Optuna, each trial running the whole ICE loop from the unpruned model on a
seeded share of the data; then pick the parameters for the final run.

Objectives (all minimised): ``drop``, the accuracy drop in points on the trial's decision split,
and ``time``, the trial's pruning time (the cost phases). Selection: the fastest Pareto point
whose drop is within ``tune.tolerance`` points of the best drop (:func:`icep.tune.select_trial`).
The reported cost of a tuned run, in time and in counted work (:mod:`icep.compute`), is the search
plus the final run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

from icep.errors import ConfigError, IcepError
from icep.loggers import RunInfo, write_json
from icep.tune.search import run_search
from icep.tune.select import TrialResult, pareto_front, select_trial
from icep.tune.space import SearchSpace
from icep.tune.study import (
    StepReporter,
    build_pruner,
    build_sampler,
    check_decision_samples,
    check_pruner,
    count_states,
    for_every_rank,
    format_params,
    load_or_create_study,
    open_storage,
    pruner_enabled,
    quiet_optuna,
    record_run,
    storage_url,
    trial_rows,
    write_trials_csv,
)

log = logging.getLogger(__name__)

OBJECTIVES = ("drop", "time")
TUNABLE = ("thre", "fr", "base", "p", "beta", "delta")


@dataclasses.dataclass
class Tuning:
    """What the search hands to the final run."""

    pipeline_cfg: DictConfig  # cfg.pipeline with the chosen parameters
    result: dict[str, Any]  # tune_result.json

    def summary_fields(
        self, final_seconds: float, final_flops: int, final_wall: float
    ) -> dict[str, Any]:
        search = self.result["search_seconds"]  # the trials' wall-clock seconds
        search_flops = self.result["search_flops"]
        return {
            "tuning": {k: v for k, v in self.result.items() if k not in ("trials", "pareto_front")},
            "time_search_s": search,
            "time_final_s": final_seconds,
            "time_total_with_search_s": search + final_seconds,
            # The reference's reported total (auto_ice_time_total): from the search to the end.
            "time_wall_with_search_s": search + final_wall,
            "flops_search": search_flops,
            "flops_total_with_search": search_flops + final_flops,
        }


def check_tune(cfg: DictConfig) -> tuple[SearchSpace, list[str], Any, Any]:
    """Check what ``cfg.tune`` builds before any work starts (its plain values are rules of
    :data:`icep.config.RULES`); returns the space, the objectives, the sampler and the pruner.
    Each mistake is a ConfigError naming the key."""
    from icep.pipelines.ice import ICE

    tcfg = cfg.tune
    target = cfg.pipeline.get("_target_")
    if target is None or not issubclass(get_class(target), ICE):
        raise ConfigError(
            "tune",
            f"auto-tuning searches ICE's hyperparameters; pipeline={cfg.pipeline.name} has none "
            "to tune: use pipeline=ice (or ice_densenet, ice_wrn) or leave tune out",
        )
    space = SearchSpace(tcfg.space, key="tune.space")
    unknown = [k for k in space.distributions if k not in cfg.pipeline]
    if unknown:
        raise ConfigError(
            "tune.space",
            f"{', '.join(unknown)} is not a pipeline key; tunable: {', '.join(TUNABLE)}",
        )
    objectives = list(tcfg.objectives)
    if (
        not objectives
        or any(o not in OBJECTIVES for o in objectives)
        or len(set(objectives)) < len(objectives)
    ):
        raise ConfigError("tune.objectives", f"got {objectives}; use [drop], [time] or [drop,time]")
    sampler = build_sampler(tcfg.sampler, space, "tune.sampler")
    pruner = build_pruner(tcfg.pruner, "tune.pruner")
    check_pruner(pruner, len(objectives), "tune.pruner")
    return space, objectives, sampler, pruner


def tune_pipeline(
    cfg: DictConfig,
    model: torch.nn.Module,
    data: Any,
    trainer: Any,
    criterion: Any,
    out: Path,
) -> Tuning:
    """Run the search configured in ``cfg.tune`` and return the parameters for the final run."""
    from icep import distributed
    from icep.data import subsample

    tcfg = cfg.tune
    space, objectives, sampler, pruner = check_tune(cfg)
    quiet_optuna()
    url = storage_url(tcfg.storage, out / "tune.db")
    split = cfg.pipeline.decision_split
    small = subsample(data, tcfg.train_fraction, tcfg.eval_fraction, seed=cfg.seed)
    if not distributed.is_main():  # a data-parallel run: rank 0 drives the search
        return _follow_trials(cfg, model, small, trainer, criterion, out)
    study = load_or_create_study(
        open_storage(url),
        tcfg.study_name,
        ["minimize"] * len(objectives),
        sampler,
        pruner,
        metric_names=[{"drop": f"acc_drop_{split}", "time": "time_total_s"}[o] for o in objectives],
    )
    if study.trials and not isinstance(sampler, optuna.samplers.GridSampler):
        # A continued search must not draw its first points again: the sampler's seed moves on
        # by the trials the study holds. (A grid never repeats a point it has run.)
        seed = int(tcfg.get("seed", cfg.seed)) + len(study.trials)
        study.sampler = build_sampler(tcfg.sampler, space, "tune.sampler", seed=seed)
    n_trials = int(tcfg.n_trials)
    if isinstance(sampler, optuna.samplers.GridSampler) and n_trials > space.grid_size():
        log.info("tune: the grid has %d points; running %d trials", space.grid_size(), n_trials)
        n_trials = space.grid_size()
    if not study.trials:
        for point in tcfg.enqueue or []:
            study.enqueue_trial(OmegaConf.to_container(point, resolve=True))

    deciding = len((small.val if split == "val" else small.test).dataset)
    few = check_decision_samples(deciding, smallest_thre(cfg.pipeline, space), "tune: each trial")
    if few is not None:  # the embedded default with tune=tpe: 3 of digits' 144 val samples
        total = len((data.val if split == "val" else data.test).dataset)
        log.warning(
            "%s: raise tune.eval_fraction (%s of %d %s samples now)",
            few,
            tcfg.eval_fraction,
            total,
            split,
        )
    log.info(
        "tune: %s search, %d trials, objectives %s, pruner %s, on %d train / %d %s samples; "
        "study %r in %s",
        type(sampler).__name__,
        n_trials,
        objectives,
        type(pruner).__name__,
        len(small.train.dataset),
        len(small.val.dataset if cfg.pipeline.decision_split == "val" else small.test.dataset),
        cfg.pipeline.decision_split,
        tcfg.study_name,
        url,
    )

    # Every trial is a "trial" in W&B, whatever job type the final run has.
    trial_logger = OmegaConf.merge(
        cfg.logger, {"job_type": "trial"} if "job_type" in cfg.logger else {}
    )
    make_trial_logger = instantiate(trial_logger)

    def objective(trial: optuna.Trial) -> list[float]:
        params = space.suggest(trial)
        _tell_followers(("trial", params))  # the other ranks of a data-parallel run join in
        pipeline_cfg = trial_pipeline(cfg, params)
        logger = make_trial_logger(
            out / "trials" / f"{trial.number:04d}",
            RunInfo(
                config={
                    **OmegaConf.to_container(cfg, resolve=True),
                    "trial": trial.number,
                    "params": params,
                },
                group=cfg.name,
                job_type="trial",
                tags=[cfg.pipeline.name, cfg.model.name, cfg.dataset.name, "trial"],
                name=f"{cfg.pipeline.name}-trial{trial.number}",
            ),
        )
        head = {"trial": trial.number, "params": params}
        record_run(trial, out / "trials" / f"{trial.number:04d}")
        failed = True
        trial_trainer = dataclasses.replace(trainer)  # its own timer: this trial's time and work
        try:
            reporter = StepReporter(trial) if pruner_enabled(pruner) else None
            summary = run_trial(
                cfg, pipeline_cfg, model, small, trial_trainer, criterion, logger, reporter
            )
            logger.log_summary({**head, "status": "completed", **summary})
            failed = False
        except optuna.TrialPruned as exc:
            logger.log_summary({**head, "status": "pruned", "reason": str(exc)})
            raise
        except Exception as exc:
            logger.log_summary({**head, "status": "failed", "reason": str(exc)})
            raise
        except KeyboardInterrupt as exc:  # SIGTERM or Ctrl-C: the trial runs again on resume
            logger.log_summary({**head, "status": "interrupted", "reason": str(exc) or "SIGINT"})
            raise
        finally:
            # All the trial's work, whatever its end, is the search's cost (as its duration is).
            trial.set_user_attr("flops", trial_trainer.timer.work_total()["flops"])
            logger.close(failed=failed)
            del logger
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next
        split = summary["decision_split"]
        drop = summary[f"acc_drop_{split}"]
        seconds = summary["time_total_s"]
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("seconds", seconds)
        record_run(trial, None, summary)
        values = {"drop": drop, "time": seconds}
        return [values[o] for o in objectives]

    def write(trials: list[FrozenTrial], chosen: TrialResult | None) -> dict[str, Any]:
        rows = trial_rows(trials, objectives)
        write_trials_csv(out / "tune_trials.csv", rows)
        completed = _results(trials)
        result = {
            "sampler": type(sampler).__name__,
            "objectives": objectives,
            "study_name": tcfg.study_name,
            "storage": url,
            "n_trials": n_trials,
            **count_states(trials),
            "search_seconds": sum(r["duration_s"] or 0.0 for r in rows),
            "search_flops": sum(t.user_attrs.get("flops", 0) for t in trials),
            "tolerance": tcfg.tolerance,
            "train_samples": len(small.train.dataset),
            "eval_samples": len((small.val or small.test).dataset),
            "chosen": dataclasses.asdict(chosen) if chosen else None,
            "params": dict(chosen.params) if chosen else None,
            "pareto_front": [dataclasses.asdict(t) for t in pareto_front(completed)],
            "trials": rows,
        }
        write_json(out / "tune_result.json", result)
        return result

    started = time.perf_counter()
    try:
        trials = run_search(
            study,
            objective,
            n_trials,
            max_failure_rate=tcfg.max_failure_rate,
            on_trial=lambda _: write(study.get_trials(deepcopy=False), None),
        )
        completed = _results(trials)
        if not completed:
            write(trials, None)
            raise IcepError(
                f"tune: none of the {len(trials)} trials completed (see "
                f"{out / 'tune_trials.csv'}); loosen the pruner (tune.pruner) or check the "
                "failures' reasons"
            )
        chosen = select_trial(completed, tcfg.tolerance, tcfg.get("select", "tolerance"))
        result = write(trials, chosen)
    except Exception:  # (a signal stops every rank by itself)
        _tell_followers(("failed", None), quietly=True)
        raise
    _tell_followers(("chosen", (dict(chosen.params), result)))
    log.info(
        "tune: %d trials in %.1fs (%d complete, %d pruned, %d failed); chose trial %d: %s "
        "(drop %.2f points, %.1fs)",
        len(trials),
        time.perf_counter() - started,
        result["complete"],
        result["pruned"],
        result["fail"],
        chosen.number,
        format_params(chosen.params),
        chosen.drop,
        chosen.seconds,
    )
    return Tuning(OmegaConf.merge(cfg.pipeline, chosen.params), result)


def trial_pipeline(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """The pipeline a trial runs: the run's with the trial's ``params``, and (unless
    ``tune.extra_epochs``) no epochs beyond one a unit, as the reference's trials."""
    from icep.config import validate

    pipeline_cfg = OmegaConf.merge(cfg.pipeline, params)
    if not cfg.tune.get("extra_epochs", False):
        if "final_finetune_epochs" in pipeline_cfg:
            pipeline_cfg.final_finetune_epochs = 0
        if "unit_epochs" in pipeline_cfg:
            pipeline_cfg.unit_epochs = None
    validate(OmegaConf.create({"pipeline": pipeline_cfg}))  # a bad point fails the trial
    return pipeline_cfg


def run_trial(
    cfg: DictConfig,
    pipeline_cfg: DictConfig,
    model: torch.nn.Module,
    small: Any,
    trainer: Any,
    criterion: Any,
    logger: Any,
    reporter: StepReporter | None,
) -> dict[str, Any]:
    """One trial's pruning run on a copy of the unpruned model, on the search's ``small`` data;
    its summary. ``reporter`` (rank 0's in a data-parallel run) may stop it after a step, on
    every rank."""
    from icep.pipelines import PruningRun
    from icep.pruning.budget import meet as meet_budget
    from icep.seeding import seed_everything

    pipeline = instantiate(pipeline_cfg)
    run = PruningRun(
        copy.deepcopy(model),
        small,
        trainer,
        criterion,
        logger,
        ignored_layers=cfg.model.get("ignored_layers", ()),
        ties=cfg.get("ties", "stable"),
        round_to=getattr(pipeline, "round_to", 1),  # a pipeline of your own may not say
    )
    meet_budget(pipeline, run, cfg.get("latency"))  # a trial prunes to the run's too
    hook = for_every_rank(reporter)
    if hook is not None:
        run.on_step.append(hook)
    seed_everything(cfg.seed, small)
    return pipeline(run)


def _tell_followers(message: tuple[str, Any], quietly: bool = False) -> None:
    """Send the other ranks of a data-parallel run what rank 0's search does next; ``quietly``:
    on the way out of a failure, which a failed send must not hide."""
    from icep import distributed

    if not distributed.active():
        return
    import torch.distributed as dist

    try:
        dist.broadcast_object_list([message], src=0)
    except Exception:
        if not quietly:
            raise


def _follow_trials(
    cfg: DictConfig, model: torch.nn.Module, small: Any, trainer: Any, criterion: Any, out: Path
) -> Tuning:
    """A rank other than 0 of a data-parallel run: run each trial rank 0's search starts, with
    it, until it says which parameters it chose (or that it failed)."""
    import torch.distributed as dist

    from icep import distributed
    from icep.loggers import SilentLogger

    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        what, value = box[0]
        if what == "failed":
            raise distributed.PeerFailed("rank 0's search failed")
        if what == "chosen":
            params, result = value
            return Tuning(OmegaConf.merge(cfg.pipeline, params), result)
        trial_trainer = dataclasses.replace(trainer)
        try:
            pipeline_cfg = trial_pipeline(cfg, value)
            run_trial(
                cfg, pipeline_cfg, model, small, trial_trainer, criterion, SilentLogger(out), None
            )
        except (Exception, optuna.TrialPruned):
            pass  # rank 0's trial ended the same way: its search records it and goes on
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def smallest_thre(pipeline_cfg: DictConfig, space: SearchSpace) -> float | None:
    """The smallest fine-tuning threshold a search tries (the pipeline's own when it is not
    searched); None for a pipeline without one, or with the trigger off."""
    if not pipeline_cfg.get("trigger", True):
        return None
    dist = space.distributions.get("thre")
    if dist is None:
        thre = pipeline_cfg.get("thre")
        return None if thre is None else float(thre)
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return min(float(c) for c in dist.choices)
    return float(dist.low)


def _results(trials: list[FrozenTrial]) -> list[TrialResult]:
    return [
        TrialResult(t.number, t.user_attrs["drop"], t.user_attrs["seconds"], dict(t.params))
        for t in trials
        if t.state == TrialState.COMPLETE and "drop" in t.user_attrs
    ]
