"""Fine-pruning on several processes, with DDP or FSDP2: a complete script.

    torchrun --nproc_per_node 2 examples/scale_out.py --engine fsdp2     # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST \\
        examples/scale_out.py --engine fsdp2                             # on each node

Runs on CPUs (gloo) as it is, on GPUs (nccl) when they are there. A tiny BERT from a config,
random token batches: a minute on a laptop; swap in your model and loader. Each rank trains on
its share of the global batch; every rank ends with the same masks and weights.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import BertConfig, BertForSequenceClassification

from prune_plugin import PruningOptimizer, PruningPolicy, finalized_state_dict, sparsity_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["ddp", "fsdp2"], default="fsdp2")
    parser.add_argument("--method", default="movement")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", help="rank 0 saves the finalized state dict here (.pt)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    model = BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.to(device)
    if args.engine == "ddp":
        model = DistributedDataParallel(model)          # DDP first, then the plugin: fine
    else:
        for block in model.bert.encoder.layer:          # FSDP2: shard each block, then root
            fully_shard(block)
        fully_shard(model)

    policy = PruningPolicy(method=args.method, final_remaining=0.10, warmup_steps=4,
                           cooldown_steps=8, total_steps=args.steps)
    optimizer = PruningOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), policy,
                                 model=model)
    per_rank = args.global_batch // world
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)         # the global batch; this rank's share
        ids = torch.randint(0, 1000, (args.global_batch, 32), generator=g)
        labels = (ids[:, 0] % 2)                        # a learnable toy task
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = model(input_ids=ids[mine].to(device), labels=labels[mine].to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    report = sparsity_report(model)                     # a collective under FSDP2: every rank
    state = finalized_state_dict(model)                 # W * M baked in, whole, on every rank
    if rank == 0:
        print(f"{args.engine} x{world}: loss {loss.item():.3f}, "
              f"{report.remaining:.2%} of the pruned weights remain")
        if args.out:
            torch.save(state, args.out)                 # or save_pretrained(state_dict=state)
    dist.barrier()                                      # gloo: leave together
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
