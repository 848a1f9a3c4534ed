"""Exact Top-v over ZeRO-3-sharded scores: radix select vs gathering the scores.

    python benchmarks/sharded_topv.py [--repeats 5] [--scale 1.0]

Two gloo ranks on this machine, each holding its half (ZeRO-3's flat partition) of BERT-base's
72 encoder Linear score tensors (84.9M scores, fp32, Adam-like values). Per selection, median
of ``--repeats``:

- radix: ``topv_thresholds`` on the shards: a sampled bracket agreed by all-reduce, then a
  radix select over the in-bracket scores, one all-reduce of a 256-count histogram per digit
  and selection group (what the DeepSpeed integration runs after each step);
- gather: all-gather every layer's scores to every rank, then the single-process exact
  ``topv_masks`` on the whole tensors (what a ZeRO-3 integration without sharded selection
  would have to do).

Both give the same masks (checked here on every repeat); reported: seconds and bytes each
rank receives. Writes benchmarks/out/sharded_topv.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from pathlib import Path

import torch

from prune_plugin.selection import (mask_from_threshold, topv_count, topv_masks,
                                    topv_thresholds)

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # one BERT-base encoder layer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, repeats: int, scale: float, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    g = torch.Generator().manual_seed(0)
    shapes = [(max(1, int(a * scale)), b) for a, b in SHAPES] * 12
    full = [torch.randn(s, generator=g) * 0.01 for s in shapes]  # same on both ranks
    shards = []
    for t in full:
        size = -(-t.numel() // 2)
        shards.append(t.reshape(-1)[rank * size:(rank + 1) * size].clone())
    n = sum(t.numel() for t in full)
    results = {}
    for scope in ("global", "local"):
        groups = [list(range(len(full)))] if scope == "global" else [[i] for i in
                                                                      range(len(full))]
        ks = [topv_count(0.10, sum(full[i].numel() for i in grp)) for grp in groups]
        radix, gather = [], []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            th = topv_thresholds(shards, groups, ks, lambda t: dist.all_reduce(t))
            radix.append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            gathered = []
            for s, t in zip(shards, full):
                bufs = [torch.empty_like(s) for _ in range(2)]
                dist.all_gather(bufs, s)
                gathered.append(torch.cat(bufs)[:t.numel()].view(t.shape))
            masks: list = [None] * len(full)
            for grp, k in zip(groups, ks):
                got, _, _ = topv_masks([gathered[i] for i in grp], k)
                for i, m in zip(grp, got):
                    masks[i] = m
            gather.append(time.perf_counter() - t0)
            if rank == 0:  # the same masks either way
                assert all(torch.equal(mask_from_threshold(full[i], th[i]), masks[i])
                           for i in range(len(full)))
        received = 4 * (n - sum(s.numel() for s in shards))
        rounds = 4
        results[scope] = {"radix_s": statistics.median(radix),
                          "gather_s": statistics.median(gather),
                          # histograms, sizes and ties, bracket proposals and counts
                          "radix_bytes": (rounds * 256 + 5 + 2) * 8 * len(groups)
                          + 16 * len(full),
                          "gather_bytes": received}
    if rank == 0:
        queue.put({"scores": n, "ranks": 2, "repeats": repeats, **results})
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the layers (tests)")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=_rank, args=(r, port, args.repeats, args.scale, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    out = Path("benchmarks/out/sharded_topv.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['scores'] / 1e6:.1f}M scores on 2 ranks, median of {args.repeats}")
    print("| scope | radix select | gather + exact Top-v | speed-up | received per rank |")
    print("|---|---|---|---|---|")
    for scope in ("global", "local"):
        r = result[scope]
        print(f"| {scope} | {r['radix_s']:.3f} s | {r['gather_s']:.3f} s | "
              f"{r['gather_s'] / r['radix_s']:.2f}x | {r['radix_bytes'] / 2**10:.0f} KiB vs "
              f"{r['gather_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
