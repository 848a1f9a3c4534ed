"""Fine-pruning runs on several gloo ranks (DDP, FSDP2), and the same run in one process.

Each case trains a tiny BERT for a few steps on a global batch split across the ranks (one
process: the whole batch), then writes what every rank ends with: the finalized state dict
(``W * M`` baked in, gathered under FSDP2), the kept counts and the step. Spawned by
``tests/test_distributed.py`` through ``torch.multiprocessing``; every case of one spawn runs
in one process group, so the ranks start once.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

STEPS = 8
GLOBAL_BATCH = 8


def policy_of(case: dict[str, Any]):
    from prune_plugin import PruningPolicy

    fields: dict[str, Any] = {"method": case.get("method", "movement"), "warmup_steps": 1,
                              "cooldown_steps": 2, "total_steps": STEPS}
    method = fields["method"]
    if method in ("magnitude", "movement"):
        fields.update(final_remaining=0.25, scope=case.get("scope", "local"))
    elif method == "soft_movement":
        fields.update(final_threshold=0.49, final_lambda=0.01, score_lr=0.1)  # some of each
    elif method == "l0":  # a requested fraction: exact counts, comparable across setups
        fields.update(final_remaining=0.25, score_lr=0.1)
    fields.update(case.get("policy", {}))
    return PruningPolicy(**fields)


def build_model(kind: str = "bert") -> nn.Module:
    """A tiny BERT whose FFN has an odd width (51): FSDP2 shards it unevenly (26 + 25 rows);
    4 heads, of which structured pruning at 25% keeps one per block. ``gpt2``: a tiny GPT-2
    (transformers' Conv1D layers, stored [in, out], the fused c_attn)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                          n_inner=52, n_positions=64, resid_pdrop=0.0,
                                          embd_pdrop=0.0, attn_pdrop=0.0))
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=51, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def batch(step: int, rank: int, world: int, micro: int = 0, micros: int = 1,
          kind: str = "bert") -> dict[str, torch.Tensor]:
    """This rank's share of step ``step``'s global batch (micro-batch ``micro`` of ``micros``)."""
    g = torch.Generator().manual_seed(1000 + step)
    full = {"input_ids": torch.randint(0, 100, (GLOBAL_BATCH, 12), generator=g),
            "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)}
    if kind == "gpt2":  # a language model's labels: its inputs
        full["labels"] = full["input_ids"]
    per = GLOBAL_BATCH // (world * micros)
    start = (rank * micros + micro) * per
    return {k: v[start:start + per] for k, v in full.items()}


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    blocks = model.transformer.h if hasattr(model, "transformer") else model.bert.encoder.layer
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def run_case(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Train one case; returns what this rank holds at the end (or the error it raised)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from prune_plugin import (PruningOptimizer, attach, finalized_state_dict, get_pruner,
                              sparsity_report)

    setup, policy = case["setup"], policy_of(case)
    kind = case.get("model", "bert")
    model = build_model(kind)
    torch.manual_seed(1 + rank)  # ranks draw different random numbers, as real ones do
    wrapped: nn.Module = model
    micros = case.get("micros", 1)
    try:
        if setup == "ddp-attach-first":
            attach(model, policy)
            wrapped = DDP(model)
        elif setup in ("ddp-wrap-first", "ddp-inner-given"):
            wrapped = DDP(model)
        elif setup == "fsdp-attach-first":
            attach(model, policy)
            shard(model)
        elif setup == "fsdp-shard-first":
            shard(model)
        given = model if setup == "ddp-inner-given" else wrapped
        optimizer = PruningOptimizer(torch.optim.AdamW(wrapped.parameters(), lr=1e-3), policy,
                                     model=given)
        torch.manual_seed(7)  # the same stream on every rank and in one process: L0's noise
        for step in range(STEPS):
            for micro in range(micros):
                last = micro == micros - 1
                sync = wrapped.no_sync() if isinstance(wrapped, DDP) and not last \
                    else _nothing()
                with sync:
                    loss = wrapped(**batch(step, rank, world, micro, micros, kind)).loss / micros
                    loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():  # an evaluation: FSDP2 keeps the root's parameters whole after
            wrapped.eval()(**batch(0, rank, world, kind=kind))
        pruner, report = get_pruner(model), sparsity_report(model)
        return {"state": finalized_state_dict(model), "step": pruner.step_count,
                "kept": [layer.kept for layer in report.layers],
                "total": [layer.total for layer in report.layers],
                "sharding": pruner.sharding.name}
    except Exception as err:  # the cases that expect a refusal read it
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def run_resume(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """FSDP2 through ``torch.distributed.checkpoint``: train half the steps, save the sharded
    model and optimizer state, rebuild everything, load, train the rest; and the run without
    a break. Returns both finalized models."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from prune_plugin import PruningOptimizer, finalized_state_dict, get_pruner

    policy = policy_of(case)

    def build() -> tuple[nn.Module, Any]:
        model = build_model()
        shard(model)
        return model, PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                                       model=model)

    def train(model: nn.Module, optimizer: Any, steps: range) -> None:
        for step in steps:
            model(**batch(step, rank, world)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    try:
        model, optimizer = build()
        train(model, optimizer, range(STEPS))
        whole = finalized_state_dict(model)
        model, optimizer = build()
        train(model, optimizer, range(STEPS // 2))
        # the wrapped optimizer's state; the pruning state travels in the model's
        model_state, optim_state = get_state_dict(model, optimizer.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=case["dir"])
        model, optimizer = build()
        model_state, optim_state = get_state_dict(model, optimizer.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=case["dir"])
        set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        loaded_step = get_pruner(model).step_count
        train(model, optimizer, range(STEPS // 2, STEPS))
        return {"whole": whole, "resumed": finalized_state_dict(model),
                "loaded_step": loaded_step, "step": get_pruner(model).step_count}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def run_reshard(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """``fsdp-save``: train half the steps under FSDP2 and save a sharded checkpoint;
    ``fsdp-load``: load it (at whatever world size this spawn has). Both return the finalized
    model and the step at that point."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from prune_plugin import PruningOptimizer, finalized_state_dict, get_pruner

    try:
        model = build_model()
        shard(model)
        optimizer = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                                     policy_of(case), model=model)
        if case["setup"] == "fsdp-save":
            for step in range(STEPS // 2):
                model(**batch(step, rank, world)).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        model_state, optim_state = get_state_dict(model, optimizer.optimizer)
        state = {"model": model_state, "optim": optim_state}
        if case["setup"] == "fsdp-save":
            dcp.save(state, checkpoint_id=case["dir"])
        else:
            dcp.load(state, checkpoint_id=case["dir"])
            set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        return {"state": finalized_state_dict(model), "step": get_pruner(model).step_count}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}


def run_shrink(case: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Structured pruning under FSDP2 (or in one process), then the shrunk model: the full
    state dict (scores, unit masks, step) loaded into an unsharded copy with the same policy,
    and ``finalize(shrink=True)`` there. Returns the shrunk model's logits and shapes."""
    from prune_plugin import PruningOptimizer, attach, finalize

    policy = policy_of(case)
    model = build_model()
    if world > 1:
        shard(model)
    optimizer = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                                 model=model)
    for step in range(STEPS):
        model(**batch(step, rank, world)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        model = build_model()
        attach(model, policy)
        model.load_state_dict(full)
    finalize(model, shrink=True)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch(0, 0, 1)["input_ids"]).logits
    return {"logits": logits, "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def ranks(rank: int, world: int, port: int, cases: list[dict[str, Any]], out: str) -> None:
    """One spawned rank: every case in turn, results to ``out/<case>.<rank>.pt``."""
    import torch.distributed as dist

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            run = {"fsdp-resume": run_resume, "fsdp-shrink": run_shrink,
                   "fsdp-save": run_reshard, "fsdp-load": run_reshard}.get(case["setup"],
                                                                           run_case)
            result = run(case, rank, world)
            torch.save(result, Path(out) / f"{case['name']}.{rank}.pt")
            del result
            gc.collect()  # the case's DDP reducer (kept by cycles) goes while the group lives
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is saved: skip interpreter finalization, where gloo work still referenced
    # by torch objects can abort the process ("terminate called without an active
    # exception", pytorch#179291) and fail a run that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
