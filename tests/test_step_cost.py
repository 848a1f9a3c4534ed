"""The step's cost is counted (benchmarks/step_cost.py: aten ops and bytes of one training step
under FakeTensorMode) and bounded here: the counts are deterministic, so a change that adds a
pass or a kernel per layer to any method's step fails this test. The bounds are today's
counts on the tiny model (torch 2.13) plus 3%; lower them when a change cuts the cost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_cost  # noqa: E402

#: variant -> (ops, bytes) of one step of the tiny BERT at batch 4 x 16 (see the module doc).
BOUNDS = {
    "dense": (272, 4_155_204),
    "magnitude": (345, 5_257_864),
    "movement": (344, 5_782_296),
    "movement-global": (327, 5_654_182),
    "soft_movement": (318, 5_335_516),
    "l0": (318, 5_433_820),
    "movement-hybrid": (344, 4_371_664),
}
MARGIN = 1.03


@pytest.mark.parametrize("variant", list(BOUNDS))
def test_a_training_step_costs_no_more_ops_or_bytes_than_today(variant):
    ops = step_cost.count_step("tiny", step_cost.VARIANTS[variant], batch=4, seq=16).ops
    count, nbytes = len(ops), sum(b for _, b, _ in ops)
    bound_ops, bound_bytes = BOUNDS[variant]
    assert count <= bound_ops * MARGIN, f"{count} ops (bound {bound_ops})"
    assert nbytes <= bound_bytes * MARGIN, f"{nbytes} bytes (bound {bound_bytes})"
    if variant != "dense":  # the count sees the pruning: more than dense, never less
        assert count > BOUNDS["dense"][0] and nbytes > BOUNDS["dense"][1]


def test_the_counter_sees_a_pass_added_to_the_step(monkeypatch):
    """A deliberate extra pass over every pruned layer's weight gradient is counted: one more
    op and one more weight-sized read and write per pruned layer."""
    from prune_plugin import masks

    def count() -> tuple[int, int]:
        ops = step_cost.count_step("tiny", step_cost.VARIANTS["movement"], batch=4, seq=16).ops
        return len(ops), sum(b for _, b, _ in ops)

    base_ops, base_bytes = count()
    original = masks._weight_grad
    monkeypatch.setattr(masks, "_weight_grad", lambda g, x: original(g, x) * 1.0)
    ops, nbytes = count()
    assert ops >= base_ops + 12 and nbytes > base_bytes  # 12 pruned layers


#: Bytes a method keeps per pruned weight between steps (fp32 scores and their two AdamW
#: moments, 12; the bool mask, 1), and what its step's peak adds to that (L0's 16-bit noise).
STATE_PER_WEIGHT = {"magnitude": (1, 0), "movement": (13, 0), "movement-global": (13, 0),
                    "soft_movement": (13, 0), "l0": (12, 2)}


@pytest.mark.parametrize("variant", list(STATE_PER_WEIGHT))
def test_a_step_holds_the_methods_state_and_nothing_more_than_dense(variant):
    """The device path's memory, counted under FakeTensorMode: between steps a method keeps
    exactly its state beyond dense (a buffer cached per layer or a leaked gradient would show),
    and at the step's peak nothing more than that state and its own noise."""
    from prune_plugin.targeting import find_targets

    dense = step_cost.count_step("tiny", None, batch=4, seq=16)
    step = step_cost.count_step("tiny", step_cost.VARIANTS[variant], batch=4, seq=16)
    policy = step_cost.policy_for(step_cost.VARIANTS[variant])
    n = sum(m.weight.numel() for _, m in find_targets(step_cost.build("tiny"), policy))
    kept, transient = STATE_PER_WEIGHT[variant]
    scalars = 1024  # the step counters and 0-d tensors of the schedule
    assert kept * n <= step.kept - dense.kept <= kept * n + scalars
    assert step.peak - dense.peak <= (kept + transient) * n + scalars


def test_structured_scores_keep_a_few_bytes_per_unit_not_per_weight():
    dense = step_cost.count_step("tiny", None, batch=4, seq=16)
    step = step_cost.count_step("tiny", step_cost.VARIANTS["movement-hybrid"], batch=4, seq=16)
    assert 0 < step.kept - dense.kept < 4096 and step.peak - dense.peak < 4096
