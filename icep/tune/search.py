"""The ask-and-tell loop of a search: run trials until the study holds ``n_trials`` finished ones,
recording each trial that raises as FAIL with its reason instead of stopping, and each trial the
pruner stops as PRUNED. A study that already holds trials (from its storage) is continued."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from icep.errors import IcepError
from icep.tune.study import REASON, fail_stale_trials, finished, log_trial, tell

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
    """Ask and tell until ``study`` has ``n_trials`` finished trials; returns all its trials.

    The search stops with an :class:`IcepError` once more than ``max_failure_rate`` of
    ``n_trials`` have failed: so many failures point at the setup, not at unlucky parameters.
    """
    stale = fail_stale_trials(study)
    done = len(finished(study))
    if done:
        log.info(
            "tune: continuing study %r: %d of %d trials finished%s",
            study.study_name,
            done,
            n_trials,
            f", {stale} interrupted trial(s) marked failed" if stale else "",
        )
    while len(finished(study)) < n_trials:
        trial = study.ask()
        try:
            values = objective(trial)
        except optuna.TrialPruned as exc:
            frozen = tell(
                study, trial, TrialState.PRUNED, reason=str(exc) or "stopped by the pruner"
            )
        except Exception as exc:  # noqa: BLE001 - any error fails this trial, not the search
            frozen = tell(study, trial, TrialState.FAIL, reason=one_line(exc))
            log.debug("trial %d failed", trial.number, exc_info=True)
        else:
            frozen = tell(study, trial, TrialState.COMPLETE, values=list(values))
        log_trial(frozen, len(finished(study)), n_trials, prefix="tune")
        if on_trial is not None:
            on_trial(frozen)
        failures = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if len(failures) > max_failure_rate * n_trials:
            first = failures[0]
            raise IcepError(
                f"{key}: search stopped, {len(failures)} trials failed, more than "
                f"{key}.max_failure_rate={max_failure_rate} of {n_trials}; first failure, "
                f"trial {first.number}: {first.user_attrs.get(REASON, 'no reason recorded')}"
            )
    return study.get_trials(deepcopy=False)
