"""One rank of a transformers Trainer + DeepSpeed fine-pruning run (PruningTrainer, the policy
taken from the DeepSpeed config's entry); launched by tests/test_deepspeed.py with torchrun.
Rank 0 writes the logged remaining fractions and the finalized model's folder.

    torchrun --nproc_per_node 2 tests/hf_ds_worker.py --stage 3 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Batches(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 19, (n, 10), generator=g)
        self.labels = (self.ids[:, 0] > 11).long()  # learnable from the first token

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from models import tiny_hf_folder
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from prune_plugin.integrations.deepspeed import finalized_state_dict
    from prune_plugin.integrations.transformers import PruningTrainer

    out = Path(args.out)
    model_dir = out / "base"
    if int(os.environ["RANK"]) == 0:
        tiny_hf_folder(model_dir)
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "movement_pruning": {"method": "movement", "final_remaining": 0.3, "warmup_steps": 1,
                             "cooldown_steps": 2, "total_steps": args.steps},
    }
    training_args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=args.steps, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=2, save_strategy="no", report_to=[],
        deepspeed=ds_config, use_cpu=True, disable_tqdm=True, seed=0)
    import torch.distributed as dist
    dist.barrier()  # rank 0 wrote the model folder
    # With TrainingArguments(deepspeed=ZeRO-3) alive, from_pretrained builds under zero.Init.
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    zero_init = any(hasattr(p, "ds_id") for p in model.parameters())
    trainer = PruningTrainer(model=model, args=training_args, train_dataset=Batches(64),
                             pruning_policy=None)  # the policy comes from the config entry
    trainer.train()
    engine = trainer.model_wrapped
    state = finalized_state_dict(engine)
    if int(os.environ["RANK"]) == 0:
        logged = [e["remaining"] for e in trainer.state.log_history if "remaining" in e]
        model.save_pretrained(out / "final", state_dict=state)
        (out / "result.json").write_text(json.dumps({"remaining": logged,
                                                     "global_step": trainer.state.global_step,
                                                     "zero_init": zero_init}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
