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
    ops = step_cost.count_step("tiny", step_cost.VARIANTS[variant], batch=4, seq=16)
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
        ops = step_cost.count_step("tiny", step_cost.VARIANTS["movement"], batch=4, seq=16)
        return len(ops), sum(b for _, b, _ in ops)

    base_ops, base_bytes = count()
    original = masks._weight_grad
    monkeypatch.setattr(masks, "_weight_grad", lambda g, x: original(g, x) * 1.0)
    ops, nbytes = count()
    assert ops >= base_ops + 12 and nbytes > base_bytes  # 12 pruned layers
