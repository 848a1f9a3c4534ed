"""Why L0 does not learn STS-B during its warm-up (issue 13): probes, one run each.

    python benchmarks/l0_warmup_probe.py --variant median    # deterministic gates in warm-up
    python benchmarks/l0_warmup_probe.py --variant open      # no gates in warm-up

The run is the STS-B seeds cell that failed (``paper_comparison.py --variant seeds --task stsb
--steps 500 --warmup 0.4 --group-by-length --methods l0 --targets 0.10``, seed 42: Pearson
0.036, training loss 2.27 at step 200 where dense has 1.26). L0 samples a hard-concrete gate
per weight in every training forward from step 0, so during the warm-up, before anything is
pruned, the encoder sees its weights multiplied by fresh noise each step. The probes change
only the warm-up's training forwards (patched here, not policy options):

- ``median``: the gate at u = 1/2 (no noise, still differentiable in the scores, so they learn
  as before);
- ``open``: no gate at all (the plain weights; the scores learn nothing until pruning starts).

After the warm-up both sample gates as L0 does. If either learns STS-B where the default does
not, the warm-up's noise is the cause. Rows (with the training loss every 50 steps) go to
``benchmarks/results/l0_warmup_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from prune_plugin import hooks
from prune_plugin.hooks import PrunedLayer
from prune_plugin.integrations.job import load_job, run_job

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_comparison import SEEDED_LR, TASKS, torch_threads  # noqa: E402

#: The failing STS-B cell's budget (its run name: l0-10-s42 in the seeds comparison's folder).
STEPS, WARMUP, COOLDOWN = 500, 200, 100


def patch(variant: str) -> None:
    """Change L0's training forwards during the warm-up (step < warmup_steps) only."""
    forward, sample_noise = PrunedLayer.forward, hooks.l0_noise
    in_warmup = False

    def noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
        if in_warmup:  # 0 is u = 1/2 in l0_noise's 16-bit code: the median gate
            return torch.zeros(shape, dtype=torch.int16, device=device)
        return sample_noise(shape, device)

    def patched_forward(self: PrunedLayer, input: torch.Tensor) -> torch.Tensor:
        nonlocal in_warmup
        in_warmup = self.module.training and self.pruner.step_count < WARMUP
        if in_warmup and variant == "open":
            return F.linear(input, self.module.weight, self.module.bias)
        return forward(self, input)

    PrunedLayer.forward = patched_forward  # type: ignore[method-assign]
    hooks.l0_noise = noise  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["median", "open"], required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="benchmarks/out/l0_warmup_probe")
    args = parser.parse_args()
    patch(args.variant)
    losses: list[tuple[int, float]] = []
    log = transformers.Trainer.log

    def record(self: transformers.Trainer, logs: dict, *a: object, **k: object) -> None:
        if "loss" in logs:
            losses.append((self.state.global_step, round(float(logs["loss"]), 3)))
        log(self, logs, *a, **k)

    transformers.Trainer.log = record  # type: ignore[method-assign]
    name = f"l0-10-{args.variant}-s{args.seed}"
    spec = {"model": "minilm", "data": TASKS["stsb"]["data"],
            "training": {"max_steps": STEPS, "batch_size": 32, "max_length": 64,
                         "learning_rate": SEEDED_LR, "warmup_ratio": 0.1,
                         "group_by_length": True,
                         "logging_steps": 50, "seed": args.seed},
            "pruning": {"method": "l0", "final_remaining": 0.10, "warmup_steps": WARMUP,
                        "cooldown_steps": COOLDOWN},
            "output_dir": str(Path(args.out) / name)}
    t0 = time.time()
    metrics = run_job(load_job(data=spec), overwrite=True, progress=False)
    row = {"run": name, "variant": args.variant, "seed": args.seed,
           "pearson": metrics["eval"]["pearson"], "remaining": metrics["remaining"],
           "loss_every_50": losses, "wall_s": round(time.time() - t0, 1),
           "threads": torch_threads()}
    out = Path(__file__).with_name("results") / "l0_warmup_probe.jsonl"
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
