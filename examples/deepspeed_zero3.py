"""Movement pruning under DeepSpeed ZeRO-3, from one entry of its JSON config: a complete
script that prunes a small BERT to 10% in a minute on CPU.

    deepspeed --num_gpus 2 examples/deepspeed_zero3.py            # 2 ranks (CPU: gloo)
    deepspeed --num_gpus 2 examples/deepspeed_zero3.py --out out/ds   # also save the model

Needs DeepSpeed (``pip install --no-build-isolation "deepspeed>=0.19,<0.20"``). On a
machine without GPUs DeepSpeed runs on its CPU accelerator with the gloo backend. The model is
a randomly initialised BERT of 4 layers and the data random tokens, so what it shows is the
mechanics: the schedule prunes to 10% within the run, the scores are sharded like the
weights, and the finalized model loads with stock transformers.
"""

from __future__ import annotations

import argparse
import os

import torch

CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "zero_optimization": {"stage": 3},
    "steps_per_print": 10**9,
    # the policy: every field as in a PruningPolicy (validated before anything is built)
    "movement_pruning": {"method": "movement", "scope": "global", "final_remaining": 0.10,
                         "warmup_steps": 10, "cooldown_steps": 20, "total_steps": 60},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="save the finalized model here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import deepspeed
    from transformers import BertConfig, BertForSequenceClassification

    from prune_plugin.integrations.deepspeed import (finalized_state_dict, initialize,
                                                     sparsity_report)

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(0)  # the same initial model on every rank
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, num_labels=2))
    engine, _, _, _ = initialize(model=model, config=CONFIG,
                                 optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    steps = CONFIG["movement_pruning"]["total_steps"]
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own share of the data
    for step in range(steps):
        batch = {"input_ids": torch.randint(0, 1000, (8, 32), generator=g),
                 "labels": torch.randint(0, 2, (8,), generator=g)}
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if rank == 0 and step % 10 == 9:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)
    report = sparsity_report(engine)  # a collective: every rank calls it
    state = finalized_state_dict(engine)  # W * M baked in, whole, on every rank
    if rank == 0:
        print(f"remaining: {100 * report.remaining:.2f}% of the pruned weights", flush=True)
        if args.out:
            model.save_pretrained(args.out, state_dict=state)
            print(f"saved {args.out}: loads with BertForSequenceClassification", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
