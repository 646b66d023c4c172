"""The search loop: Optuna's ``study.optimize`` runs trials until the study holds ``n_trials``
finished ones, recording each trial that raises as FAIL with its reason instead of stopping, and
each trial the pruner stops as PRUNED. A study that already holds trials (from its storage) is
continued."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial

from icep.errors import IcepError
from icep.tune.study import (
    INTERRUPTED,
    REASON,
    fail_stale_trials,
    failures,
    finished,
    log_trial,
    retry_interrupted,
)

log = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial], Sequence[float]]


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``, the reason stored with a failed trial."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_search(
    study: optuna.Study,
    objective: Objective,
    n_trials: int,
    *,
    max_failure_rate: float,
    key: str = "tune",
    on_trial: Callable[[FrozenTrial], None] | None = None,
) -> list[FrozenTrial]:
    """Run trials until ``study`` has ``n_trials`` finished ones; returns all its trials.

    The search stops with an :class:`IcepError` once more than ``max_failure_rate`` of
    ``n_trials`` have failed: so many failures point at the setup, not at unlucky parameters.
    An interrupt (Ctrl-C) fails the running trial and ends the search; a rerun continues it.
    """
    fail_stale_trials(study)  # a killed search's last trial: interrupted, like a signalled one
    retried = retry_interrupted(study)
    done = len(finished(study))
    if done:
        log.info(
            "tune: continuing study %r: %d of %d trials finished%s",
            study.study_name,
            done,
            n_trials,
            f", {retried} interrupted trial(s) run again" if retried else "",
        )
    if done >= n_trials:  # optimize() would run one trial before any callback could stop it
        return study.get_trials(deepcopy=False)

    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        log_trial(trial, len(finished(study)), n_trials, prefix="tune")
        if on_trial is not None:
            on_trial(trial)

    def stop_on_failures(study: optuna.Study, trial: FrozenTrial) -> None:
        failed = failures(study)  # an interrupted trial is no failure of its parameters
        if len(failed) > max_failure_rate * n_trials:
            first = failed[0]
            raise IcepError(
                f"{key}: search stopped, {len(failed)} trials failed, more than "
                f"{key}.max_failure_rate={max_failure_rate} of {n_trials}; first failure, "
                f"trial {first.number}: {first.user_attrs.get(REASON, 'no reason recorded')}"
            )

    study.optimize(
        recording_reasons(objective),
        catch=(Exception,),
        callbacks=[report, stop_on_failures, stop_after(n_trials)],
    )
    return study.get_trials(deepcopy=False)


def stop_after(n_trials: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    """A callback stopping the search once ``n_trials`` trials count (:func:`finished`)."""

    def stop(study: optuna.Study, trial: FrozenTrial) -> None:
        if len(finished(study)) >= n_trials:
            study.stop()

    return stop


def recording_reasons(objective: Objective) -> Objective:
    """``objective``, storing why a trial ended early as its ``reason`` user attribute (Optuna
    records the state but not the reason); the exception still goes on to Optuna."""

    def run(trial: optuna.Trial) -> Sequence[float]:
        try:
            return objective(trial)
        except optuna.TrialPruned as exc:
            trial.set_user_attr(REASON, str(exc) or "stopped by the pruner")
            raise
        except Exception as exc:
            trial.set_user_attr(REASON, one_line(exc))  # Optuna logs the traceback
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (icep.interrupts.Interrupted)
            trial.set_user_attr(REASON, f"interrupted: {exc or 'SIGINT'}")
            trial.set_user_attr(INTERRUPTED, True)
            raise

    return run
