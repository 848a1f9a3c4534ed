"""Step time and peak memory of hard movement pruning vs dense fine-tuning and peers.

    python benchmarks/step_overhead.py --models minilm bert-base --repeats 5

Per model, one process holds every variant; each repeat runs every variant in turn (interleaved)
for ``--steps`` steps, and the figures are medians over repeats. A step is forward, backward,
AdamW step (and whatever the variant adds). Peak memory: each variant alone in a fresh
subprocess, peak RSS over a few steps (Linux ru_maxrss). Selection: exact Top-v on BERT-base's
72 encoder weights (85M scores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from common import batch_for, build_model, encoder_linears, median_time  # noqa: E402

from prune_plugin import PruningOptimizer, PruningPolicy  # noqa: E402

KEEP = 0.10
VARIANTS = ["dense", "movement-local", "movement-global", "sort-every-forward", "torch-prune"]


ADAMW: dict = {}  # extra AdamW arguments, from --adamw


def make_variant(name: str, model_name: str):
    """(model, step function) of one variant."""
    model = build_model(model_name)
    model.train()
    modules = [m for _, m in encoder_linears(model)]
    refresh = None
    if name == "torch-prune":
        baselines.attach_torch_prune(modules, 1 - KEEP)
        refresh = lambda: baselines.refresh_torch_prune(modules, 1 - KEEP)  # noqa: E731
    params = list(model.parameters())
    if name == "sort-every-forward":
        scores = baselines.attach_sort_every_forward(modules, KEEP)
        opt = torch.optim.AdamW([{"params": params}, {"params": scores, "lr": 1e-2,
                                                      "weight_decay": 0.0}], lr=3e-5, **ADAMW)
    else:
        opt = torch.optim.AdamW(params, lr=3e-5, **ADAMW)
    if name.startswith("movement"):
        policy = PruningPolicy(method="movement", scope=name.split("-")[1], targets=[r"\.encoder\."],
                               initial_remaining=KEEP, final_remaining=KEEP, total_steps=10**6)
        opt = PruningOptimizer(opt, policy, model=model)
    batch = batch_for(model_name)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if refresh is not None:
            refresh()

    return model, step


def time_steps(model_names: list[str], repeats: int, steps: int) -> dict:
    results = {}
    for model_name in model_names:
        runs = {v: make_variant(v, model_name) for v in VARIANTS}
        for _, step in runs.values():  # warm-up: allocator, first Adam state, first selection
            step()
            step()
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                samples[v].append(median_time(runs[v][1], steps))
        med = {v: sorted(s)[len(s) // 2] for v, s in samples.items()}
        results[model_name] = {
            "step_s": med, "ratio_vs_dense": {v: med[v] / med["dense"] for v in VARIANTS},
            "samples_s": samples}
        print(model_name, json.dumps({v: round(med[v] / med["dense"], 3) for v in VARIANTS}),
              {v: round(t, 3) for v, t in med.items()}, flush=True)
        del runs
    return results


def peak_memory(model_name: str, variant: str, adamw: str) -> int:
    """Peak RSS (bytes) of a fresh process running ``variant`` for 3 steps."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, variant,
                          "--adamw", adamw], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def vm_hwm() -> int:
    """This process image's peak RSS. (ru_maxrss survives exec, so a child would report its
    parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def selection_times(repeats: int) -> dict:
    model = build_model("bert-base")
    result = {}
    for scope in ("local", "global"):
        policy = PruningPolicy(method="movement", scope=scope, targets=[r"\.encoder\."],
                               initial_remaining=KEEP, final_remaining=KEEP, total_steps=10)
        opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for s in opt.pruner.scores:
                s.copy_(torch.randn(s.shape, generator=g))
        n = sum(s.numel() for s in opt.pruner.scores)
        update = opt.pruner.refresh
        t_normal = median_time(update, repeats)
        with torch.no_grad():  # after the first Adam steps, scores sit at +-lr and tie
            for s in opt.pruner.scores:
                s.copy_(torch.randint(-1, 2, s.shape, generator=g).float() * 1e-2)
        t_tied = median_time(update, repeats)
        flat = torch.cat([s.detach().reshape(-1) for s in opt.pruner.scores])
        rank = n - round(KEEP * n) + 1
        t_kth = median_time(lambda f=flat, r=rank: torch.kthvalue(f, r), 3)
        result[scope] = {"scores": n, "topv_s": t_normal, "topv_tied_s": t_tied}
        result["full_kthvalue_s"] = t_kth
        print("selection", scope, n, round(t_normal, 3), round(t_tied, 3),
              "kthvalue", round(t_kth, 3), flush=True)
        from prune_plugin import detach
        detach(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per repeat")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/out/step_overhead.json")
    parser.add_argument("--adamw", choices=["default", "fused"], default="fused",
                        help="torch.optim.AdamW implementation for every variant")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.adamw == "fused":
        ADAMW["fused"] = True
    if args.memory_child:
        _, step = make_variant(args.memory_child[1], args.memory_child[0])
        for _ in range(3):
            step()
        print(vm_hwm())
        return
    t0 = time.time()
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__,
               "adamw": args.adamw,
               "keep": KEEP, "repeats": args.repeats, "steps_per_repeat": args.steps,
               "timing": time_steps(args.models, args.repeats, args.steps)}
    results["selection"] = selection_times(args.repeats)
    if not args.skip_memory:
        mem = {}
        for model_name in args.models:
            mem[model_name] = {v: peak_memory(model_name, v, args.adamw) for v in VARIANTS}
            print("peak RSS MiB", model_name,
                  {v: round(b / 2**20) for v, b in mem[model_name].items()}, flush=True)
        results["peak_rss_bytes"] = mem
    results["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
