"""Step time of pruning against dense training on 2 gloo ranks, under DDP and FSDP2, and the
bytes the mask selection sends across ranks against gathering the scores.

    OMP_NUM_THREADS=1 python benchmarks/distributed_step.py --repeats 15

Each rank holds every variant at once (dense and pruned, per engine) and runs one step of each
in turn, so that the machine's load falls on all of them alike; the figure is the median over
the repeats of each variant's step, rank 0's clock (every step ends in a collective). Movement
pruning to 10% (masks refreshed every step, the warm-up over), all-MiniLM-L6-v2 (the real
weights), batch 8 x 128 per rank. DDP is built before the plugin (the plugin averages the
scores' gradients), and once after attaching (DDP averages them); FSDP2 shards each block and
the root before attaching (each forward gathers its layer's scores), and once after (FSDP2
gathers them with the block's weights). Prints one JSON line per engine. ``--memory`` runs
each variant alone in fresh processes instead and prints the largest rank's peak resident
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import batch_for, build_model  # noqa: E402

WORLD = 2
ENGINES = (("ddp", ("unstructured", "hybrid")), ("fsdp2", ("unstructured", "hybrid")))


def _variant(engine: str, pruned: bool, structure: str, attach_first: bool = False
             ) -> tuple[Any, Any, dict[str, int]]:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from prune_plugin import PruningOptimizer, PruningPolicy, get_pruner

    from prune_plugin import attach

    model = build_model("minilm")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    policy = PruningPolicy(method="movement", structure=structure or "unstructured",
                           final_remaining=0.1, initial_remaining=0.1, warmup_steps=0,
                           cooldown_steps=0, total_steps=10 ** 6)
    if attach_first:  # DDP then averages the scores in its own buckets
        attach(model, policy)
    if engine == "ddp":
        model = DistributedDataParallel(model)
    else:
        for block in model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
    base = torch.optim.AdamW(model.parameters(), lr=1e-5)
    sent = {"selection": 0, "score_grads": 0}
    if not pruned:
        return model, base, sent
    optimizer = PruningOptimizer(base, policy, model=model)
    pruner = get_pruner(model)
    sharding = pruner.sharding
    if sharding.shards:  # count what the selection sends: every all-reduce it makes
        reduce = sharding.all_reduce

        def counted(t: torch.Tensor) -> None:
            sent["selection"] += t.numel() * t.element_size()
            reduce(t)
        sharding.all_reduce = counted  # type: ignore[method-assign]
    if pruner._grad_sync is not None:  # DDP built first: the bucket of score gradients
        sent["score_grads_per_step"] = sum(s.numel() * s.element_size() for s in pruner.scores)
    sent["scores_bytes"] = sum(s.numel() * 4 for s in pruner.scores)  # fp32, whole model
    return model, optimizer, sent


def _rank(rank: int, port: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    results = []
    for engine, structures in ENGINES:
        variants = {"dense": _variant(engine, False, "")}
        for structure in structures:
            variants[f"movement-{structure}"] = _variant(engine, True, structure)
        variants["movement-unstructured-attached-first"] = _variant(engine, True,
                                                                    "unstructured", True)
        batch = batch_for("minilm", batch=8, seed=rank)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(repeats + 2):  # the first two warm up
            for name, (model, optimizer, _) in variants.items():
                dist.barrier()
                t0 = time.perf_counter()
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                dist.barrier()
                if repeat >= 2:
                    times[name].append(time.perf_counter() - t0)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        row: dict[str, Any] = {"engine": engine, "world": WORLD, "repeats": repeats,
                               "median_step_s": {k: round(v, 4) for k, v in medians.items()},
                               "ratio_to_dense": {k: round(v / medians["dense"], 3)
                                                  for k, v in medians.items() if k != "dense"}}
        for name, (_, _, sent) in variants.items():
            if name != "dense":
                steps = repeats + 2 + 1  # + the refresh at attach
                row[f"{name}_bytes"] = {
                    "selection_per_step": sent["selection"] // steps,
                    "gather_scores_per_step": sent.get("scores_bytes", 0) * (WORLD - 1) // WORLD,
                    "score_grad_all_reduce_per_step": sent.get("score_grads_per_step", 0)}
        results.append(row)
        del variants
    if rank == 0:
        Path(out).write_text("\n".join(json.dumps(r) for r in results) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _peak(rank: int, port: int, engine: str, name: str, out: str) -> None:
    """One variant alone in fresh processes: 3 steps, then each rank's peak resident memory."""
    import resource

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    structure = name.split("-", 1)[1] if name != "dense" else ""
    model, optimizer, _ = _variant(engine, name != "dense", structure)
    batch = batch_for("minilm", batch=8, seed=rank)
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({"engine": engine, "variant": name,
                                         "peak_rss_mib_max_rank": round(float(peak), 1)}))
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/out/distributed_step.jsonl")
    parser.add_argument("--memory", action="store_true",
                        help="instead: each variant alone, each rank's peak resident memory")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.memory:
        rows = []
        for engine, structures in ENGINES:
            for name in ["dense"] + [f"movement-{s}" for s in structures]:
                mp.start_processes(_peak, args=(_port(), engine, name, args.out), nprocs=WORLD,
                                   start_method="spawn")
                rows.append(Path(args.out).read_text())
        Path(args.out).write_text("\n".join(rows) + "\n")
    else:
        mp.start_processes(_rank, args=(_port(), args.repeats, args.out), nprocs=WORLD,
                           start_method="spawn")
    print(Path(args.out).read_text(), end="")


if __name__ == "__main__":
    main()
