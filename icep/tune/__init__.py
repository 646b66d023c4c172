"""Auto-tuning of ICE's hyperparameters with Optuna (METHOD.md section 3.4).

``space`` reads a search space written in hydra-optuna-sweeper's grammar; ``select`` holds the
Pareto front and the rule that picks the final parameters. Both serve the in-run tuning stage and
icep's Hydra sweeper alike.
"""

from icep.tune.select import TrialResult, pareto_front, select_trial
from icep.tune.space import SearchSpace, parse_distribution

__all__ = ["SearchSpace", "TrialResult", "parse_distribution", "pareto_front", "select_trial"]
