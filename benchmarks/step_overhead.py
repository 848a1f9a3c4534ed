"""Step time and peak memory of pruning vs dense fine-tuning and peers, on CPU or GPU.

    python benchmarks/step_overhead.py --models minilm bert-base --repeats 5      # CPU
    python benchmarks/step_overhead.py --device cuda --models bert-base           # one GPU

Per model, one process holds every variant; each repeat runs every variant in turn (interleaved,
order reversed every other repeat) for ``--steps`` steps, and the figures are medians over
repeats; "paired" is the median of each repeat's own ratio to dense (steadier where the
machine's speed drifts: ``--steps 1 --repeats 16``). A step is forward, backward, AdamW step
(fused) and whatever the variant adds, masks refreshed after every step. 10% of the encoder's
Linear weights kept.

- CPU: MiniLM batch 16 x 128, BERT-base batch 8 x 128, fp32; peak memory of each variant alone
  in a fresh process (peak RSS).
- CUDA: BERT-base batch 32 x 128 under bf16 autocast; memory per variant = what it keeps
  between steps + its step's transient peak (the CUDA allocator's counters).
- Selection alone: exact Top-v of BERT-base's 72 encoder weights (85M scores) through the
  pruner, against one ``torch.kthvalue`` (CPU) or ``torch.topk`` / ``torch.sort`` (GPU) of
  them all.

Variants: dense; the plugin's methods (``--variants``: on CPU by default movement local and
global, on GPU every method); the original code's approach (full sort of every layer's scores
in every forward) and ``torch.nn.utils.prune`` re-applied every step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402
from common import batch_for, build_model, encoder_linears, median_time  # noqa: E402

from prune_plugin import PruningOptimizer, PruningPolicy, detach  # noqa: E402

KEEP = 0.10
#: The plugin's variants: policy fields (all at 10% kept from the start).
POLICIES = {
    "magnitude-local": dict(method="magnitude"),
    "movement-local": dict(method="movement", scope="local"),
    "movement-global": dict(method="movement", scope="global"),
    "soft_movement": dict(method="soft_movement", final_lambda=10.0, initial_threshold=0.1),
    "l0": dict(method="l0", final_lambda=1.0),
    "movement-hybrid": dict(method="movement", structure="hybrid"),  # heads and neurons
}
PEERS = ["sort-every-forward", "torch-prune"]
DEFAULT_VARIANTS = {"cpu": ["movement-local", "movement-global"], "cuda": list(POLICIES)}
BATCH = {"cpu": {"minilm": 16, "bert-base": 8}, "cuda": {"minilm": 32, "bert-base": 32}}


def policy_for(name: str) -> PruningPolicy:
    fields = dict(POLICIES[name], targets=[r"\.encoder\."], total_steps=10**6)
    if fields["method"] in ("magnitude", "movement"):
        fields.update(initial_remaining=KEEP, final_remaining=KEEP)
    return PruningPolicy(**fields)


def make_variant(name: str, model_name: str, device: str):
    """(model, step function) of one variant."""
    model = build_model(model_name).to(device)
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
                                                      "weight_decay": 0.0}], lr=3e-5, fused=True)
    else:
        opt = torch.optim.AdamW(params, lr=3e-5, fused=True)
    if name in POLICIES:
        opt = PruningOptimizer(opt, policy_for(name), model=model)
    batch = {k: v.to(device)
             for k, v in batch_for(model_name, batch=BATCH[device][model_name]).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" \
        else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if refresh is not None:
            refresh()

    return model, step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model_names: list[str], variants: list[str], repeats: int, steps: int,
               device: str) -> tuple[dict, dict]:
    results, memory = {}, {}
    for model_name in model_names:
        runs, mem = {}, {}
        for v in variants:  # built one by one: on a GPU, each one's memory is measured alone
            _sync(device)
            before = torch.cuda.memory_allocated() if device == "cuda" else 0
            runs[v] = make_variant(v, model_name, device)
            for _ in range(2):  # warm-up: allocator, first Adam state, first selection
                runs[v][1]()
            if device == "cuda":
                _sync(device)
                kept = torch.cuda.memory_allocated() - before
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                runs[v][1]()
                _sync(device)
                mem[v] = {"kept_MiB": kept / 2**20,
                          "peak_MiB": (kept + torch.cuda.max_memory_allocated() - base) / 2**20}
        samples: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(repeats):
            for v in variants if r % 2 == 0 else variants[::-1]:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    runs[v][1]()
                _sync(device)
                samples[v].append((time.perf_counter() - t0) / steps)
        med = {v: sorted(s)[len(s) // 2] for v, s in samples.items()}
        # each repeat's own ratio: a machine whose speed drifts between repeats moves both
        # sides of it alike
        paired = {v: statistics.median(a / d for a, d in zip(samples[v], samples["dense"]))
                  for v in variants}
        results[model_name] = {
            "step_s": med, "ratio_vs_dense": {v: med[v] / med["dense"] for v in variants},
            "paired_ratio_vs_dense": paired, "samples_s": samples}
        print(model_name, json.dumps({v: round(med[v] / med["dense"], 3) for v in variants}),
              {v: round(t, 4) for v, t in med.items()}, flush=True)
        print(model_name, "paired", json.dumps({v: round(r, 3) for v, r in paired.items()}),
              flush=True)
        if mem:
            memory[model_name] = mem
            print("memory MiB", model_name, {v: round(m["peak_MiB"]) for v, m in mem.items()},
                  flush=True)
        del runs
        if device == "cuda":
            torch.cuda.empty_cache()
    return results, memory


def peak_rss(model_name: str, variant: str) -> int:
    """Peak RSS (bytes) of a fresh process running ``variant`` for 3 steps on the CPU."""
    out = subprocess.run([sys.executable, __file__, "--memory-child", model_name, variant],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def vm_hwm() -> int:
    """This process image's peak RSS. (ru_maxrss survives exec, so a child would report its
    parent's peak.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def selection_times(repeats: int, device: str) -> dict:
    model = build_model("bert-base").to(device)
    result: dict = {}

    def timed(fn, n=repeats) -> float:
        def run() -> None:
            fn()
            _sync(device)
        return median_time(run, n)

    for scope in ("local", "global"):
        policy = policy_for(f"movement-{scope}")
        opt = PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), policy, model=model)
        pruner = opt.pruner
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for s in pruner.scores:
                s.copy_(torch.randn(s.shape, generator=g, device=device))
        n = sum(s.numel() for s in pruner.scores)
        pruner.refresh()
        t_normal = timed(pruner.refresh)
        with torch.no_grad():  # after the first Adam steps, scores sit at +-lr and tie
            for s in pruner.scores:
                s.copy_(torch.randint(-1, 2, s.shape, generator=g, device=device).float() * 1e-2)
        t_tied = timed(pruner.refresh)
        result[scope] = {"scores": n, "topv_s": t_normal, "topv_tied_s": t_tied}
        flat = torch.cat([s.detach().reshape(-1) for s in pruner.scores]).normal_()
        k = round(KEEP * n)
        if device == "cuda":
            result["torch_topk_s"] = timed(lambda flat=flat, k=k: torch.topk(flat, k, sorted=False))
            result["torch_sort_s"] = timed(lambda flat=flat: torch.sort(flat))
        else:
            result["full_kthvalue_s"] = median_time(
                lambda flat=flat, n=n, k=k: torch.kthvalue(flat, n - k + 1), 3)
        print("selection", scope, n, round(t_normal, 4), round(t_tied, 4), flush=True)
        detach(model)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", default=None,
                        help="default: minilm bert-base on CPU, bert-base on CUDA")
    parser.add_argument("--variants", nargs="+", choices=list(POLICIES), default=None,
                        help="the plugin's variants (dense and the peers always run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per variant per repeat (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--no-peers", action="store_true", help="time dense and the plugin only")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device
    if device == "cpu":
        torch.set_num_threads(2)
    if args.memory_child:
        _, step = make_variant(args.memory_child[1], args.memory_child[0], "cpu")
        for _ in range(3):
            step()
        print(vm_hwm())
        return
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    models = args.models or (["minilm", "bert-base"] if device == "cpu" else ["bert-base"])
    variants = ["dense", *(args.variants or DEFAULT_VARIANTS[device]),
                *([] if args.no_peers else PEERS)]
    steps = args.steps or (2 if device == "cpu" else 10)
    t0 = time.time()
    timing, memory = time_steps(models, variants, args.repeats, steps, device)
    results = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
               "keep": KEEP, "repeats": args.repeats, "steps_per_repeat": steps,
               "timing": timing}
    if not args.skip_selection:
        results["selection"] = selection_times(args.repeats, device)
    if device == "cuda":
        results["memory_MiB"] = memory
    elif not args.skip_memory:
        rss = {m: {v: peak_rss(m, v) for v in variants} for m in models}
        for m, per in rss.items():
            print("peak RSS MiB", m, {v: round(b / 2**20) for v, b in per.items()}, flush=True)
        results["peak_rss_bytes"] = rss
    results["wall_s"] = time.time() - t0
    out = Path(args.out or f"benchmarks/out/step_overhead.{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
