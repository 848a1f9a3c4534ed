"""Where a CPU training step's time and memory go: forward, backward, optimizer step and
zero_grad, apart, for dense and pruning variants.

    python benchmarks/step_phases.py --model bert-base --variants movement-local --repeats 8
    python benchmarks/step_phases.py --memory --variants movement-local movement-local+backward

Time: medians of paired repeats (the first two are warm-up). ``--memory``: each variant alone
in a fresh process, the resident memory when each phase ends and the most within it (the
kernel's high-water mark, reset between phases), on the third step. glibc keeps freed blocks
below its mmap threshold, which it raises as large blocks are freed, so the default resident
peak follows the allocator's history; the children set ``MALLOC_MMAP_THRESHOLD_`` to 128 KiB,
so freed tensors leave and resident memory follows the live ones. ``+backward`` steps each
score tensor inside the backward, as soon as its gradient is accumulated (its own fused AdamW
from a post-accumulate-grad hook, the gradient then dropped: torch's optimizer-in-backward
pattern), a probe of what that design saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batch_for, build_model  # noqa: E402
from step_overhead import BATCH, POLICIES, policy_for  # noqa: E402

from prune_plugin import PruningOptimizer  # noqa: E402

PHASES = ("forward", "backward", "step", "zero_grad")
IN_BACKWARD = "+backward"


def build(model_name: str, name: str, batch: int | None = None
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    model = build_model(model_name).train()
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5, fused=True)
    if name != "dense":
        opt = PruningOptimizer(opt, policy_for(name.removesuffix(IN_BACKWARD)), model=model)
    if name.endswith(IN_BACKWARD):
        for scores in opt.pruner.scores:  # type: ignore[attr-defined]
            own = torch.optim.AdamW([scores], lr=1e-2, weight_decay=0.0, fused=True)

            def step(p: torch.Tensor, own: torch.optim.Optimizer = own) -> None:
                own.step()
                p.grad = None
            scores.register_post_accumulate_grad_hook(step)
    return model, opt, batch_for(model_name, batch=batch or BATCH["cpu"][model_name])


def _status(field: str) -> float:
    """A /proc/self/status field, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def memory_child(model_name: str, name: str, batch_size: str) -> None:
    model, opt, batch = build(model_name, name, int(batch_size) or None)
    for _ in range(3):  # the third step's figures are printed
        row = {"start": _status("VmRSS")}
        for phase in PHASES:
            Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark
            if phase == "forward":
                loss = model(**batch).loss
            elif phase == "backward":
                loss.backward()
                del loss
            elif phase == "step":
                opt.step()
            else:
                opt.zero_grad()
            row[f"{phase} peak"], row[f"after {phase}"] = _status("VmHWM"), _status("VmRSS")
    print(name, {k: f"{v:.0f}" for k, v in row.items()}, flush=True)


def memory(model_name: str, variants: list[str], batch: int | None) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for name in ["dense", *variants]:
        subprocess.run([sys.executable, __file__, "--memory-child", model_name, name,
                        str(batch or 0)], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bert-base", choices=list(BATCH["cpu"]))
    parser.add_argument("--variants", nargs="+", default=["movement-local"],
                        choices=[*POLICIES, *(v + IN_BACKWARD for v in POLICIES if v !=
                                              "magnitude-local")])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--memory", action="store_true", help="memory by phase, not time")
    parser.add_argument("--batch", type=int, help="default: step_overhead.py's CPU batch")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.memory:
        return memory(args.model, args.variants, args.batch)
    runs = {name: build(args.model, name, args.batch) for name in ["dense", *args.variants]}
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
