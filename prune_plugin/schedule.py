"""Pure schedules: the cubic sparsity schedule (Eq. 5) and the regularizer's lambda.

``step`` counts completed optimizer steps: the masks used by the forward passes of step
``t + 1`` are computed from ``remaining_at(t)``, as in the original code.
"""

from __future__ import annotations


def cubic_progress(step: int, *, warmup_steps: int, cooldown_steps: int, total_steps: int) -> float:
    """How far the cubic schedule has gone, in [0, 1].

    ``0`` during warm-up (``t < t_i``), ``1 - (1 - (t - t_i) / (T - t_i - t_f))**3`` while pruning,
    ``1`` during cool-down (``t >= T - t_f``). Eq. 5 of the paper prints ``t - t_i - t_f`` in the
    numerator; the original code (and continuity at both ends) uses ``t - t_i``, as here.
    """
    if step < warmup_steps:
        return 0.0
    span = total_steps - warmup_steps - cooldown_steps
    if step >= total_steps - cooldown_steps or span <= 0:
        return 1.0
    return 1.0 - (1.0 - (step - warmup_steps) / span) ** 3


def cubic_schedule(step: int, *, initial: float, final: float, warmup_steps: int,
                   cooldown_steps: int, total_steps: int) -> float:
    """Eq. 5: the value after ``step`` optimizer steps, from ``initial`` to ``final``.

    v(t) = v_i for t < t_i; v_f + (v_i - v_f)(1 - (t - t_i)/(T - t_i - t_f))^3 until T - t_f;
    v_f after. It drives the remaining fraction of Top-v methods (v_i down to v_f) and the
    soft-movement threshold (tau_i up to tau_f).
    """
    p = cubic_progress(step, warmup_steps=warmup_steps, cooldown_steps=cooldown_steps,
                       total_steps=total_steps)
    # progress p = 1 - (1 - x)^3 with x the linear fraction, so (1 - p) is Eq. 5's cube.
    return final + (initial - final) * (1.0 - p)


def lambda_at(step: int, *, final_lambda: float, schedule: str, warmup_steps: int,
              cooldown_steps: int, total_steps: int) -> float:
    """Regularizer weight: ``constant`` is final_lambda throughout (the original L0 runs);
    ``cubic`` rises with the threshold schedule, lambda_f * progress, which is the original
    code's ``final_lambda * threshold / final_threshold`` when the threshold starts at 0."""
    if schedule == "constant":
        return final_lambda
    return final_lambda * cubic_progress(step, warmup_steps=warmup_steps,
                                         cooldown_steps=cooldown_steps, total_steps=total_steps)


def controlled_lambda_factor(open_fraction, target: float, band: float):  # noqa: ANN001, ANN201
    """The share of lambda a requested-sparsity run applies (a proportional controller): 0
    while the open fraction (L0's open gates, soft movement's weights above the threshold) is
    at or below the schedule's remaining fraction ``target`` (the penalty would prune below
    the schedule), 1 from ``(1 + band) * target`` up, linear in between. ``open_fraction``
    may be a float or a device tensor (no read back)."""
    x = (open_fraction / target - 1.0) / band
    return x.clamp(0.0, 1.0) if hasattr(x, "clamp") else min(1.0, max(0.0, x))
