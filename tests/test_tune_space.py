"""The search-space grammar (hydra-optuna-sweeper's) and the selection rule of the tuning stage."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from icep.errors import ConfigError
from icep.tune import SearchSpace, TrialResult, pareto_front, parse_distribution, select_trial
from icep.tune.select import reference_score

# The paper's ResNet grid (METHOD.md 3.4): 2 * 2 * 2 * 3 * 3 * 3 = 216 points.
PAPER_GRID = {
    "thre": "choice(0.5, 1.5)",
    "fr": "choice(0.3, 0.9)",
    "base": "choice(0.001, 0.005)",
    "p": "choice(0.1, 0.15, 0.2)",
    "beta": "choice(40, 50, 60)",
    "delta": "choice(0.0006, 0.0007, 0.0008)",
}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("choice(0.5, 1.5)", CategoricalDistribution([0.5, 1.5])),
        ("range(40, 61, 10)", CategoricalDistribution([40, 50, 60])),
        ("interval(0.3, 0.9)", FloatDistribution(0.3, 0.9)),
        ("int(interval(40, 60))", IntDistribution(40, 60)),
        ("tag(log, interval(0.001, 0.005))", FloatDistribution(0.001, 0.005, log=True)),
        ("0.7", CategoricalDistribution([0.7])),
    ],
)
def test_grammar(expression, expected):
    assert parse_distribution("x", expression) == expected


@pytest.mark.parametrize("bad", ["interval(0.9, 0.3)", "choice(", "range(5, 1, 1)"])
def test_bad_expressions_name_the_parameter(bad):
    with pytest.raises(ConfigError, match="^thre: "):
        parse_distribution("thre", bad)


def test_paper_grid_has_216_points_and_needs_finite_sets():
    space = SearchSpace(PAPER_GRID)
    assert space.grid_size() == 216
    assert space.grid()["beta"] == [40, 50, 60]
    with pytest.raises(ConfigError, match="fr: a grid search needs a finite set"):
        SearchSpace({**PAPER_GRID, "fr": "interval(0.3, 0.9)"}).grid()


def test_suggest_draws_inside_the_space():
    space = SearchSpace(
        {
            "fr": "interval(0.3, 0.9)",
            "beta": "int(interval(40, 60))",
            "base": "tag(log, interval(0.001, 0.005))",
            "thre": "choice(0.5, 1.5)",
        }
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        point = space.suggest(study.ask())
        assert 0.3 <= point["fr"] <= 0.9 and 40 <= point["beta"] <= 60
        assert isinstance(point["beta"], int) and point["thre"] in (0.5, 1.5)
        assert 0.001 <= point["base"] <= 0.005


# (number, drop in points, seconds)
TRIALS = [
    TrialResult(n, d, s)
    for n, d, s in [
        (0, 0.8, 100.0),  # best drop, slowest
        (1, 1.0, 40.0),  # within 0.5 of the best, fast
        (2, 1.2, 30.0),  # within 0.5, fastest inside the tolerance
        (3, 3.0, 10.0),  # fastest of all, too lossy
        (4, 1.3, 50.0),  # dominated by 1 and 2
    ]
]


def test_pareto_front_fastest_first():
    assert [t.number for t in pareto_front(TRIALS)] == [3, 2, 1, 0]


def test_selection_picks_the_fastest_within_tolerance():
    assert select_trial(TRIALS, tolerance=0.5).number == 2
    assert select_trial(TRIALS, tolerance=0.25).number == 1
    assert select_trial(TRIALS, tolerance=5.0).number == 3


def test_selection_falls_back_to_the_smallest_drop():
    assert select_trial(TRIALS, tolerance=0.0).number == 0
    with pytest.raises(ValueError):
        select_trial([], tolerance=1.0)


def test_selection_does_not_reward_slower_runs():
    """The reference objective t/max(da,t) + da/max(da,t) = 1 + da/t prefers the slower of two
    runs with the same drop; the selection rule prefers the faster one."""
    same_drop = [TrialResult(0, 1.0, 50.0), TrialResult(1, 1.0, 500.0)]
    assert select_trial(same_drop, tolerance=0.0).number == 0
    # tune=paper reproduces the reference: it picks the slow one.
    assert select_trial(same_drop, 0.0, rule="reference").number == 1
    assert reference_score(same_drop[0]) == pytest.approx(1 + 1.0 / 50)
    # A drop larger than the time: t/da + 1.
    assert reference_score(TrialResult(2, 8.0, 2.0)) == pytest.approx(1.25)
