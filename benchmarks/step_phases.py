"""Where a CPU training step's time goes: forward, backward, optimizer step, zero_grad, timed
apart for dense and pruning variants (medians of paired repeats; the first two are warm-up).

    python benchmarks/step_phases.py --model bert-base --variants movement-local --repeats 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batch_for, build_model  # noqa: E402
from step_overhead import BATCH, POLICIES, policy_for  # noqa: E402

from prune_plugin import PruningOptimizer  # noqa: E402

PHASES = ("forward", "backward", "step", "zero_grad")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bert-base", choices=list(BATCH["cpu"]))
    parser.add_argument("--variants", nargs="+", default=["movement-local"],
                        choices=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    runs = {}
    for name in ["dense", *args.variants]:
        model = build_model(args.model).train()
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
        if name != "dense":
            opt = PruningOptimizer(opt, policy_for(name), model=model)
        runs[name] = (model, opt, batch_for(args.model, batch=BATCH["cpu"][args.model]))
    times: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PHASES} for v in runs}
    for r in range(args.repeats + 2):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            model, opt, batch = runs[name]
            t = [time.perf_counter()]
            loss = model(**batch).loss
            t.append(time.perf_counter())
            loss.backward()
            t.append(time.perf_counter())
            opt.step()
            t.append(time.perf_counter())
            opt.zero_grad()
            t.append(time.perf_counter())
            if r >= 2:
                for phase, a, b in zip(PHASES, t, t[1:]):
                    times[name][phase].append(b - a)
    for name, per in times.items():
        print(name, {p: f"{statistics.median(x):.3f} s" for p, x in per.items()}, flush=True)


if __name__ == "__main__":
    main()
