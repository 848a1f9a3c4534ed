"""One rank of a DeepSpeed fine-pruning run on a tiny BERT; launched by tests/test_deepspeed.py
with ``torchrun``. Every rank sees its slice of the same global batches, so runs on 1 and 2
ranks train on the same data. Rank 0 writes what the test compares to ``--out`` (torch.save).

    torchrun --nproc_per_node 2 tests/ds_worker.py --stage 3 --method movement --steps 6 \
        --out result.pt [--save-at 3 --ckpt DIR] [--resume DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--method", default="movement")
    parser.add_argument("--scope", default="local")
    parser.add_argument("--structure", default="unstructured")
    parser.add_argument("--target", type=float, default=None,
                        help="soft movement / L0: a requested remaining fraction")
    parser.add_argument("--control", default=None, help="soft movement's remaining_control")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--zero-init", action="store_true", help="build the model under zero.Init")
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--model", default="bert", help="bert, or gpt2 (Conv1D layers)")
    parser.add_argument("--onecycle", action="store_true",
                        help="a OneCycleLR with a scalar max_lr (it sets every group's lr)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import deepspeed
    from models import bert_batch, tiny_bert

    from prune_plugin.errors import PruningError
    from prune_plugin.optimizer import find_pruning_optimizer
    from prune_plugin.integrations.deepspeed import (DeepSpeedConfigError, finalized_state_dict,
                                                     initialize, sparsity_report)

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.manual_seed(0)
    micro = args.global_batch // (world * args.accumulation)
    policy = {"method": args.method, "warmup_steps": 1, "cooldown_steps": 1,
              "total_steps": args.steps}
    if args.method in ("magnitude", "movement"):
        policy.update(final_remaining=0.25, scope=args.scope)
    elif args.method == "soft_movement":
        policy.update(final_threshold=0.48, final_lambda=2000.0, score_lr=0.1)
    elif args.method == "l0":  # fast enough to close gates within a few steps
        policy.update(score_init_value=0.0, final_lambda=5000.0, score_lr=0.5)
    if args.structure != "unstructured":  # heads and FFN neurons of the BERT family
        policy.update(structure=args.structure)
    if args.target is not None:  # the requested-sparsity mode: a global Top-v of the scores
        policy.pop("final_threshold", None)
        policy.update(final_remaining=args.target)
        if args.control is not None:
            policy.update(remaining_control=args.control)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": args.accumulation,
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": args.bf16},
        "steps_per_print": 10 ** 9,
        "movement_pruning": policy,
    }
    if args.zero_init:  # weights sharded from birth: attach must gather layer by layer
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = TinyClassifier()
    elif args.model == "gpt2":
        from dist_worker import build_model

        model = build_model("gpt2")
    else:
        model = tiny_bert(seed=0)
    for m in model.modules():  # deterministic: no dropout
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    try:
        scheduler = (lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=2e-3, total_steps=args.steps + 1)) if args.onecycle else None
        engine, _, _, _ = initialize(model=model, config=config,
                                     optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                     lr_scheduler=scheduler)
    except (DeepSpeedConfigError, PruningError) as err:  # a refusal the test expects: report it, leave cleanly
        if rank == 0:
            torch.save({"error": str(err)}, args.out)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return
    wrapper = find_pruning_optimizer(engine.optimizer)
    pruner = wrapper.pruner
    start = 0
    if args.resume:
        engine.load_checkpoint(args.resume)
        start = engine.global_steps
    losses = []
    for step in range(start, args.steps):
        for micro_step in range(args.accumulation):
            batch = bert_batch(seed=step, batch=args.global_batch)
            if args.model == "gpt2":  # a language model: its inputs are its labels
                batch = {"input_ids": batch["input_ids"] % 100, "labels": batch["input_ids"] % 100}
            lo = (micro_step * world + rank) * micro
            inputs = {k: v[lo:lo + micro] for k, v in batch.items()}
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        if args.save_at is not None and step + 1 == args.save_at:
            engine.save_checkpoint(args.ckpt)
    report = sparsity_report(engine)
    mismatch = gathered_topv_mismatch(pruner) if args.structure == "unstructured" and (
        args.method in ("magnitude", "movement") or args.target is not None) else 0
    units = [(g.kind, int(g.mask.sum()), g.numel) for g in pruner.units]
    score_group = wrapper.score_group()
    lrs = {"score": score_group["lr"] if score_group else None,
           "weight": next(g["lr"] for g in wrapper.param_groups if "prune_plugin" not in g),
           "base": score_group.get("prune_plugin_base_lr") if score_group else None,
           "score_lr": getattr(pruner.policy, "score_lr", None)}  # (magnitude: none)
    state = finalized_state_dict(engine)
    if rank == 0:
        torch.save({"losses": losses, "kept": {x.name: x.kept for x in report.layers},
                    "total": report.total, "remaining": report.remaining, "state": state,
                    "step": pruner.step_count, "gathered_mismatch": mismatch, "units": units,
                    "global_steps": engine.global_steps, "lrs": lrs}, args.out)
    # Leave together: a rank exiting with gloo's threads still live aborts ("terminate called
    # without an active exception"), which failed a CI run once.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


class TinyClassifier(torch.nn.Module):
    """A torch-only classifier taking BERT-style batches (built under zero.Init)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 32)
        self.up = torch.nn.Linear(32, 96)
        self.down = torch.nn.Linear(96, 32)
        self.classifier = torch.nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        from types import SimpleNamespace

        h = self.embed(input_ids).mean(1)
        logits = self.classifier(self.down(torch.relu(self.up(h))))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.float(), labels))


def gathered_topv_mismatch(pruner) -> int:
    """Masks used by the forwards vs a Top-v on the gathered scores (the reference)."""
    import deepspeed

    from prune_plugin.methods import importance
    from prune_plugin.selection import topv_count, topv_mask_reference

    layers = pruner.layers
    params = [p for layer in layers for p in layer.module.parameters(recurse=False)
              if hasattr(p, "ds_id")]
    remaining = pruner.target
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        # the Top-v masks (for L0 with a requested fraction: those its gates are closed by)
        gates = [layer.current_mask() for layer in layers]
        # the grouping the policy asks for (L0 and soft movement at a requested fraction:
        # global), not the one the pruner under test chose
        scope = getattr(pruner.policy, "scope", "global")
        groups = [[i] for i in range(len(layers))] if scope == "local" \
            else [list(range(len(layers)))]
        mismatch = 0
        for group in groups:
            parts = [importance(layers[i]) for i in group]
            k = topv_count(remaining, sum(p.numel() for p in parts))
            for i, ref in zip(group, topv_mask_reference(parts, k)):
                gate = gates[i] if gates[i] is not None else torch.ones_like(ref)
                mismatch += int((gate.bool() != ref).sum())
    return mismatch


if __name__ == "__main__":
    main()
