"""CPU A/B of the masked weight: ``W * M.to(dtype)`` (before) against ``W * M`` (now, the
bool mask cast inside the multiply),
in the forward and backward of one BERT-base FFN layer (3072 x 768, 10% kept), fp32, 2
threads; both variants interleaved in one process, medians of 15 rounds of 10 calls.

    python benchmarks/masked_weight_ab.py
"""

from __future__ import annotations

import statistics
import time

import torch

from prune_plugin import masks


def before(weight: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return weight if gate is None else weight * gate.to(weight.dtype)


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3072, 768, generator=g, requires_grad=True)
    s = torch.randn(3072, 768, generator=g, requires_grad=True)
    m = torch.rand(3072, 768, generator=g) < 0.1
    x = torch.randn(8 * 128, 768, generator=g)
    now = masks.effective_weight

    def step() -> None:
        out = masks.masked_linear(x, w, None, m, s)
        out.sum().backward()

    times: dict[str, list[float]] = {"before": [], "now": []}
    for round_ in range(16):
        for name, fn in (("before", before), ("now", now))[:: 1 if round_ % 2 else -1]:
            masks.effective_weight = fn
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - t0) / 10)
    masks.effective_weight = now
    a, b = statistics.median(times["before"]), statistics.median(times["now"])
    print(f"masked linear fwd+bwd: before {1000 * a:.2f} ms, now {1000 * b:.2f} ms "
          f"({b / a:.3f}x)")


if __name__ == "__main__":
    main()
