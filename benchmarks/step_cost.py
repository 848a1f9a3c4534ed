"""What one training step costs, counted without a GPU: aten ops, bytes read and written,
matmul FLOPs and the memory it holds, for every method and structure against dense; and a
roofline estimate of the step's time on a named GPU.

    python benchmarks/step_cost.py                          # BERT-base and a Llama-style decoder
    python benchmarks/step_cost.py --models bert-base --gpu h200
    python benchmarks/step_cost.py --bandwidth 3.35e12 --flops 9.9e14 --kernel-floor 4e-6

The step runs under ``FakeTensorMode`` (no memory, no compute: BERT-base at batch 32 x 128 is
counted in seconds) with a ``TorchDispatchMode`` that records every aten op below autograd:
its name, the bytes of its tensor inputs and outputs (views and metadata ops skipped: they
move nothing; a gather counted as reading what it gives, not its whole table, a scatter as
writing where its index points, not its whole target), and its FLOPs
(torch's own flop registry). The step is the forward under bf16 autocast, the backward,
``optimizer.step()`` of a fused AdamW and ``zero_grad``, on the device path (the GPU's), masks
refreshed in that step; it is the third step (the first two build the optimizer state and the
masks).

Memory: the bytes of the tensor storages alive after each op (storages counted once however
many views share them, freed when their last tensor goes), from the model's construction on.
"kept" is what lives between steps (weights, optimizer state, scores, masks), "peak" the most
alive at any op of the step: what a caching allocator must hold at least, its rounding and
fragmentation aside.

The estimate sums, op by op, ``max(bytes / bandwidth, flops / peak, kernel floor)``: a lower
bound of a real step that ranks what costs what. The analytic minimum of a method beside dense
is what it must touch at least (per pruned weight: the mask read in the forward's pass, the
weight, the mask and the score gradient in the backward's pass, the scores' AdamW state, one
selection), printed next to the counted extra.
"""

from __future__ import annotations

import argparse
import json
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
RESULT_JSON = ROOT / "benchmarks" / "results" / "step_cost.json"

#: Named GPUs: (HBM bandwidth in practice B/s, dense bf16 FLOP/s in practice, kernel floor s).
GPUS = {"h200": (3.8e12, 7.0e14, 4e-6), "h100": (3.0e12, 6.0e14, 4e-6),
        "a100": (1.6e12, 2.5e14, 5e-6)}

#: Dense steps measured on a GPU (ms; RESULTS.md, issue 10's H200 run: 35-42 ms at batch 32 x
#: 128, bf16 autocast, fused AdamW): the estimated extra is added to these for a second ratio,
#: the estimate alone missing what it does not model (launch gaps, attention kernels' speed).
MEASURED_DENSE_MS = {("bert-base", "h200"): 35.0}

VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "magnitude": {"method": "magnitude"},
    "movement": {"method": "movement"},
    "movement-global": {"method": "movement", "scope": "global"},
    "soft_movement": {"method": "soft_movement", "initial_threshold": 0.3,
                      "final_threshold": 0.6, "final_lambda": 100.0},
    "l0": {"method": "l0", "final_lambda": 100.0},
    "movement-hybrid": {"method": "movement", "structure": "hybrid"},
}


class OpCounter(TorchDispatchMode):
    """Records (op name, bytes in + out, FLOPs) of every aten op that moves data."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.flop_registry = flop_registry
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _moves_nothing(func):
            return out
        tensors = [t for t in _flat((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in _flat(out) if isinstance(t, torch.Tensor)]
        returned = {id(t) for t in outs}
        outs += [t for t in _written(func, args, kwargs) if id(t) not in returned]
        nbytes = sum(t.numel() * t.element_size() for t in (*tensors, *outs))
        if func._overloadpacket in (aten.index, aten.gather):  # reads what it gives, not
            table, gathered = tensors[0], outs[0]  # its whole table
            nbytes -= max(0, table.numel() - gathered.numel()) * table.element_size()
        elif func._overloadpacket is aten.scatter_:  # in place: writes where index points
            target, index = tensors[0], tensors[1]  # none of the rest of self moves
            nbytes += (index.numel() - 2 * target.numel()) * target.element_size()
        flops = 0
        counter = self.flop_registry.get(func._overloadpacket)
        if counter is not None:  # called as torch's FlopCounterMode calls it
            flops = int(counter(*args, **kwargs, out_val=out))
        self.ops.append((str(func._overloadpacket), nbytes, flops))
        return out


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages alive after each op, and the most alive since ``reset``."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors on it]
        self.tensors: dict[int, weakref.ref] = {}
        self.live = self.peak = 0

    def reset(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in _flat(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, t: torch.Tensor) -> None:
        ref = self.tensors.get(id(t))
        if ref is not None and ref() is t:
            return  # (an in-place op's result: seen)
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [storage.nbytes(), 0]
            self.live += entry[0]
        entry[1] += 1
        # torch keeps a tensor's Python object as long as its C++ tensor lives (autograd's
        # saved tensors included), so the callback runs when the tensor is really gone
        tid = id(t)
        self.tensors[tid] = weakref.ref(t, lambda _, key=key, tid=tid: self._gone(key, tid))

    def _gone(self, key: int, tid: int) -> None:
        self.tensors.pop(tid, None)
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[key]


@dataclass
class StepCount:
    """One training step counted: its ops (name, bytes moved, FLOPs), the bytes alive between
    steps, and the most alive during the step."""

    ops: list[tuple[str, int, int]]
    kept: int
    peak: int


aten = torch.ops.aten
#: Ops that launch no kernel: aliases, views torch does not tag as such, bare allocations.
_FREE = (aten.detach, aten.alias, aten.lift_fresh, aten._unsafe_view, aten._reshape_alias,
         aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
         aten.new_empty_strided)


def _moves_nothing(func: Any) -> bool:
    """Views, aliases, allocations and metadata queries (``prim.device``): nothing moves. (The
    plugin's own ops, ``prune_plugin::*``, each one compiled kernel on a GPU, count.)"""
    return func.namespace not in ("aten", "prune_plugin") or func.is_view \
        or func._overloadpacket in _FREE


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op writes in place (its schema's mutable arguments: ``mul_``'s self,
    every list of ``_foreach_add_``), whether or not it returns them."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            written += [t for t in _flat(value) if isinstance(t, torch.Tensor)]
    return written


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    if isinstance(x, dict):
        return [y for item in x.values() for y in _flat(item)]
    return [x]


def build(name: str) -> nn.Module:
    import transformers as tf

    if name == "bert-base":
        return tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
    if name == "llama":  # a Llama-style decoder of ~110M (untied head), grouped kv heads
        return tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
            num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False))
    if name == "tiny":
        return tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=2))
    raise ValueError(name)


def batch_for(name: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    vocab = 100 if name == "tiny" else 30000
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids if name == "llama" else torch.randint(0, 2, (batch,))
    return {"input_ids": ids, "labels": labels}


def policy_for(variant: dict[str, Any] | None):
    from prune_plugin import PruningPolicy

    if variant is None:
        return None
    fields = {"total_steps": 1000, "warmup_steps": 0, "cooldown_steps": 0, **variant}
    if fields["method"] in ("magnitude", "movement"):
        fields.update(final_remaining=0.1)
    return PruningPolicy(**fields)


def count_step(name: str, variant: dict[str, Any] | None, *, batch: int, seq: int
               ) -> StepCount:
    """One training step (the third) of model ``name`` under ``variant``, counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from prune_plugin import PruningOptimizer
    from prune_plugin.pruner import Pruner

    previous = Pruner.device_path
    Pruner.device_path = True  # the GPU's path, forced on these CPU fake tensors
    try:
        memory, counter = LiveBytes(), OpCounter()
        with FakeTensorMode(allow_non_fake_inputs=True), memory:
            torch.manual_seed(0)
            model = build(name)
            base = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            policy = policy_for(variant)
            opt = base if policy is None else PruningOptimizer(base, policy, model=model)
            data = batch_for(name, batch, seq)
            for step in range(3):
                memory.reset()
                kept = memory.live
                with counter if step == 2 else _nothing():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = model(**data).loss
                    loss.backward()
                    del loss
                    opt.step()
                    opt.zero_grad()
    finally:
        Pruner.device_path = previous
    return StepCount(counter.ops, kept, memory.peak)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def minimum_extra_bytes(model: nn.Module, variant: dict[str, Any] | None) -> int:
    """What a method must touch beyond dense per step, at least (see the module docstring)."""
    if variant is None:
        return 0
    from prune_plugin.targeting import find_targets

    n = sum(m.weight.numel() for _, m in find_targets(model, policy_for(variant)))
    method = variant["method"]
    if variant.get("structure", "unstructured") != "unstructured":
        return n * 1  # the unit mask broadcast in the forward's pass; units are few
    mask_fwd, bwd = 1, 4 + 1 + 4  # the mask read; the weight, the mask, the score gradient
    adam = 7 * 4  # scores, gradient, two moments read; scores and moments written (fp32)
    select = 4 + 1  # the scores read, the mask written
    if method == "magnitude":
        return n * (mask_fwd + 1 + 4 + 1)  # mask in both passes; |W| read, mask written
    if method == "l0":
        return n * (2 + 2 + bwd + adam + 4)  # 16-bit noise written and read back
    return n * (mask_fwd + bwd + adam + select)


def summarize(step: StepCount, gpu: tuple[float, float, float]) -> dict:
    bandwidth, peak, floor = gpu
    ops = step.ops
    return {"ops": len(ops), "bytes": sum(b for _, b, _ in ops),
            "flops": sum(f for _, _, f in ops),
            "est_s": sum(max(b / bandwidth, f / peak, floor) for _, b, f in ops),
            "kept_MiB": step.kept / 2**20, "peak_MiB": step.peak / 2**20,
            "top": Counter(name for name, _, _ in ops).most_common(6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "llama"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    parser.add_argument("--bandwidth", type=float, help="B/s (overrides --gpu)")
    parser.add_argument("--flops", type=float, help="FLOP/s (overrides --gpu)")
    parser.add_argument("--kernel-floor", type=float, help="seconds per kernel (overrides)")
    parser.add_argument("--measured-dense-ms", type=float,
                        help="a dense step measured on this GPU, ms (default: MEASURED_DENSE_MS)")
    parser.add_argument("--json", type=Path, default=RESULT_JSON)
    args = parser.parse_args()
    bw, peak, floor = GPUS[args.gpu]
    gpu = (args.bandwidth or bw, args.flops or peak, args.kernel_floor or floor)
    rows = []
    for name in args.models:
        with torch.device("meta"):
            shapes = build(name)
        dense = None
        measured = args.measured_dense_ms or MEASURED_DENSE_MS.get((name, args.gpu))
        for variant_name in args.variants:
            variant = VARIANTS[variant_name]
            s = summarize(count_step(name, variant, batch=args.batch, seq=args.seq), gpu)
            dense = dense or s
            row = {"model": name, "variant": variant_name, **s,
                   "extra_ops": s["ops"] - dense["ops"], "extra_gb": (s["bytes"] - dense[
                       "bytes"]) / 1e9, "min_extra_gb": minimum_extra_bytes(shapes, variant) / 1e9,
                   "est_ratio": s["est_s"] / dense["est_s"],
                   "peak_vs_dense": s["peak_MiB"] / dense["peak_MiB"]}
            vs_measured = ""
            if measured:  # the estimated extra on the measured dense step
                row["est_ratio_vs_measured"] = 1 + (s["est_s"] - dense["est_s"]) * 1e3 / measured
                vs_measured = f", {row['est_ratio_vs_measured']:.3f}x on {measured:g} ms"
            rows.append(row)
            print(f"{name:9} {variant_name:16} ops {s['ops']:6d} ({row['extra_ops']:+6d})  "
                  f"{s['bytes'] / 1e9:7.2f} GB ({row['extra_gb']:+6.2f}, min "
                  f"{row['min_extra_gb']:+5.2f})  {s['flops'] / 1e12:6.2f} TFLOP  "
                  f"est {1000 * s['est_s']:6.2f} ms ({row['est_ratio']:.3f}x{vs_measured})  "
                  f"kept {s['kept_MiB']:5.0f} MiB, peak {s['peak_MiB']:5.0f} MiB "
                  f"({row['peak_vs_dense'] - 1:+.1%})", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"gpu": gpu, "batch": args.batch, "seq": args.seq,
                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
