"""Pruning schedules (METHOD.md section 4): per-step shares that add up to the target."""

from __future__ import annotations

import pytest

from icep.pruning import uniform_widths
from icep.pruning.schedules import agp, constant, geometric, hybrid, one_shot


def increments(cumulative):
    """Each step's slice, as a share of the original count."""
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def step_ratios(cumulative):
    """Each step's share of what is left before it: ``(c_k - c_{k-1}) / (1 - c_{k-1})``."""
    return [(b - a) / (1 - a) for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


@pytest.mark.parametrize(
    "schedule, kwargs",
    [
        (one_shot, {}),
        (constant, {"steps": 7}),
        (geometric, {"steps": 10}),
        (hybrid, {"steps": 5, "one_shot_share": 0.2}),
        (agp, {"steps": 12}),
        (agp, {"steps": 12, "initial": 0.1}),
    ],
)
@pytest.mark.parametrize("target", [0.3, 0.7, 0.9, 0.99])
def test_every_schedule_reaches_its_target(schedule, kwargs, target):
    cumulative = schedule(target, **kwargs)
    assert sum(increments(cumulative)) == pytest.approx(target)
    assert cumulative[-1] == pytest.approx(target)
    assert all(b > a for a, b in zip([0.0, *cumulative], cumulative, strict=False))
    # Removing each step's share of what is left ends at the same place.
    left = 1.0
    for r in step_ratios(cumulative):
        assert 0 < r < 1
        left *= 1 - r
    assert 1 - left == pytest.approx(target)


def test_geometric_removes_the_same_share_of_what_remains():
    cumulative = geometric(0.9, 10)
    assert increments(cumulative)[0] == pytest.approx(0.2057, abs=5e-5)  # 1 - 0.1 ** 0.1
    assert step_ratios(cumulative) == pytest.approx([0.2057] * 10, abs=5e-5)


def test_constant_slices_are_equal_and_one_shot_is_one_step():
    assert increments(constant(0.6, 3)) == pytest.approx([0.2, 0.2, 0.2])
    assert one_shot(0.8) == [0.8]


def test_hybrid_starts_with_its_one_shot_slice_then_goes_geometric():
    cumulative = hybrid(0.9, 4, one_shot_share=0.5)
    assert len(cumulative) == 5 and cumulative[0] == 0.5
    rest = step_ratios(cumulative)[1:]
    assert rest == pytest.approx([rest[0]] * 4)  # the same share of what is left
    assert rest[0] == pytest.approx(1 - (0.1 / 0.5) ** (1 / 4))


def test_agp_is_cubic_fast_first_and_slow_at_the_end():
    cumulative = agp(0.8, 10)
    slices = increments(cumulative)
    assert slices == sorted(slices, reverse=True)
    assert cumulative[4] == pytest.approx(0.8 * (1 - 0.5**3))  # half way: 7/8 of the target


@pytest.mark.parametrize(
    "call, what",
    [
        (lambda: geometric(1.0, 10), "target"),
        (lambda: constant(0.5, 0), "steps"),
        (lambda: hybrid(0.5, 3, one_shot_share=0.6), "one_shot"),
        (lambda: agp(0.5, 3, initial=0.5), "initial"),
    ],
)
def test_impossible_schedules_are_refused(call, what):
    # The config's values are checked before a run (icep.config); this guards direct use.
    with pytest.raises(ValueError, match=f"^{what} "):
        call()


def test_uniform_widths_come_from_the_original_counts():
    original = {"a": 16, "b": 10, "c": 3}
    # 0.7 * 10 is 7.000000000000001 in binary: still 7 channels go, not 8.
    assert uniform_widths(original, 0.7) == {"a": 4, "b": 3, "c": 1}
    # The widths after a step depend only on its cumulative share, not on the steps before.
    for cumulative in (geometric(0.7, 4), constant(0.7, 3), one_shot(0.7)):
        assert uniform_widths(original, cumulative[-1]) == uniform_widths(original, 0.7)
    assert uniform_widths(original, 0.99) == {"a": 1, "b": 1, "c": 1}  # never empty


def test_uniform_widths_of_a_grouped_layer_keep_every_group_alike():
    # 32 groups of 4: ceil(0.3 * 4) = 2 positions go from each group, and every group keeps two.
    assert uniform_widths({"g": 128, "a": 10}, 0.3, groups={"g": 32}) == {"g": 64, "a": 7}
    assert uniform_widths({"g": 128}, 0.9, groups={"g": 32}) == {"g": 64}
