import pytest

import torch

from prune_plugin.schedule import (controlled_lambda_factor, cubic_progress, cubic_schedule,
                                     lambda_at)

S = dict(warmup_steps=10, cooldown_steps=20, total_steps=100)


def v(t: int) -> float:
    return cubic_schedule(t, initial=1.0, final=0.1, **S)


def test_holds_initial_value_during_warmup():
    assert [v(t) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_starts_decay_at_end_of_warmup_continuously():
    assert v(10) == 1.0
    assert v(11) < 1.0


def test_matches_eq5_inside_the_pruning_window():
    for t in (10, 25, 50, 79):
        expected = 0.1 + 0.9 * (1 - (t - 10) / 70) ** 3
        assert v(t) == pytest.approx(expected, abs=1e-12)


def test_holds_final_value_during_cooldown_and_after():
    assert [v(t) for t in (80, 90, 100, 1000)] == [0.1] * 4
    assert v(79) > 0.1


def test_is_monotonic():
    values = [v(t) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_pruning_window_steps_at_warmup_end():
    kw = dict(warmup_steps=5, cooldown_steps=5, total_steps=10)
    assert cubic_schedule(4, initial=1.0, final=0.2, **kw) == 1.0
    assert cubic_schedule(5, initial=1.0, final=0.2, **kw) == 0.2


def test_threshold_rises_with_the_same_curve():
    tau = [cubic_schedule(t, initial=0.0, final=0.1, **S) for t in (0, 45, 100)]
    assert tau[0] == 0.0 and 0.0 < tau[1] < 0.1 and tau[2] == 0.1


def test_lambda_cubic_follows_threshold_ratio_and_constant_is_flat():
    for t in (0, 30, 60, 85):
        tau = cubic_schedule(t, initial=0.0, final=0.1, **S)
        assert lambda_at(t, final_lambda=400.0, schedule="cubic", **S) == pytest.approx(
            400.0 * tau / 0.1)
        assert lambda_at(t, final_lambda=125.0, schedule="constant", **S) == 125.0
    assert cubic_progress(0, **S) == 0.0 and cubic_progress(100, **S) == 1.0


def test_the_l0_controller_is_off_at_or_below_the_target_and_full_above_the_band():
    f = [controlled_lambda_factor(x, 0.2, 0.25) for x in (0.1, 0.2, 0.225, 0.25, 0.9)]
    assert f == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    t = controlled_lambda_factor(torch.tensor(0.225), 0.2, 0.25)  # device tensors stay tensors
    assert isinstance(t, torch.Tensor) and float(t) == pytest.approx(0.5)
