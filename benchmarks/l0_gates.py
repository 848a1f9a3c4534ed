"""Why L0 at a requested 3% collapsed from the |W| prior at log-alpha scale 2.197 (issue 13).

    python benchmarks/l0_gates.py                          # the gates at the Top-v's edge
    python benchmarks/l0_gates.py --runs DIR [DIR ...]     # + kept-set overlap of finished runs

L0's score gradient is dL/dW' * W * d gate / dS, and the hard-concrete gate is clamped at 1 for
large log-alpha: a weight whose sampled gates are almost always 1 gets almost no task gradient.
For all-MiniLM-L6-v2's encoder, this prints where a global Top-v at 10% and 3% cuts |W| / mean
|W| (of its layer), the log-alpha there for a prior scale of 2.197 (the paper's mean) and of 1,
the share of sampled gates clamped at 1 there and the expected d gate / dS (Monte Carlo over
the noise, with the package's own gate function); then how much one forward's sampled gates
change the pretrained weights before any pruning (the warm-up), for each log-alpha start: the
scale-1 prior perturbs them twice as much as 2.197, yet L0 fails to learn STS-B during the
warm-up with either (RESULTS.md). ``--runs``: for run folders of the seeds
comparison (``model/`` exported), the share of each run's kept weights that the |W| prior's
global Top-v also keeps.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from prune_plugin.integrations.job import resolve_model
from prune_plugin.masks import hard_concrete_gate, l0_noise
from prune_plugin.policy import PruningPolicy

#: The paper's L0 (the policy's defaults): hard-concrete b, l, r, and the constant log-alpha
#: 2.197 that was the |W| prior's scale before issue 13.
PAPER_L0 = PruningPolicy(method="l0", total_steps=1)
#: The package's sampled gate with those b, l, r.
sampled_gate = partial(hard_concrete_gate, beta=PAPER_L0.l0_beta, left=PAPER_L0.l0_left,
                       right=PAPER_L0.l0_right)


def pretrained() -> dict[str, torch.Tensor]:
    folder = Path(resolve_model("minilm"))
    weights = load_file(next(folder.glob("*.safetensors")))
    return {k: w for k, w in weights.items()
            if k.startswith("encoder") and k.endswith("weight") and w.dim() == 2}


def gate_stats(log_alpha: float, samples: int = 200_000) -> tuple[float, float]:
    """(share of sampled gates clamped at 1, E[d gate / dS]) at one log-alpha."""
    scores = torch.full((samples,), log_alpha, requires_grad=True)
    noise = l0_noise(scores.shape, scores.device, torch.Generator().manual_seed(0))
    gate = sampled_gate(scores, noise=noise)
    (grad,) = torch.autograd.grad(gate.sum(), scores)
    return float((gate >= 1.0).float().mean()), float(grad.mean())


def start_perturbation(weights: dict[str, torch.Tensor],
                       log_alpha: dict[str, torch.Tensor]) -> tuple[float, float]:
    """What one forward's sampled gates do to the pretrained encoder before any pruning (the
    warm-up, v = 1): ||W (1 - gate)|| / ||W|| over all layers, and the share of gates at 0."""
    generator = torch.Generator().manual_seed(0)
    change = total = zero = count = 0.0
    for k, w in weights.items():
        gate = sampled_gate(log_alpha[k], generator=generator)
        change += float((w * (1 - gate)).pow(2).sum())
        total += float(w.pow(2).sum())
        zero, count = zero + float((gate == 0).sum()), count + w.numel()
    return (change / total) ** 0.5, zero / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", nargs="*", default=[], type=Path)
    args = parser.parse_args()
    weights = pretrained()
    prior = {k: w.abs() / w.abs().mean() for k, w in weights.items()}
    flat = torch.cat([p.flatten() for p in prior.values()])
    print("| remaining | edge \\|W\\|/mean | prior scale | log-alpha at the edge | "
          "gates clamped at 1 | E[d gate / dS] |\n|---|---|---|---|---|---|")
    for v in (0.10, 0.03):
        edge = float(torch.topk(flat, round(v * flat.numel())).values[-1])
        for scale in (PAPER_L0.score_init_value, 1.0):
            clamped, dgate = gate_stats(edge * scale)
            print(f"| {v:.0%} | {edge:.2f} | {scale:g} | {edge * scale:.2f} | {clamped:.1%} | "
                  f"{dgate:.4f} |")
    print("\n| log-alpha at the start | sampled gates perturb W by (rel. Frobenius) | "
          "sampled gates at 0 |\n|---|---|---|")
    for label, start in (("\\|W\\|/mean x 1 (default with final_remaining)", prior),
                         (f"\\|W\\|/mean x {PAPER_L0.score_init_value:g}",
                          {k: PAPER_L0.score_init_value * p for k, p in prior.items()}),
                         (f"constant {PAPER_L0.score_init_value:g} (the paper)",
                          {k: torch.full_like(p, PAPER_L0.score_init_value)
                           for k, p in prior.items()})):
        change, zero = start_perturbation(weights, start)
        print(f"| {label} | {change:.3f} | {zero:.1%} |")
    for run in args.runs:
        model = load_file(run / "model" / "model.safetensors")
        kept = {k: model["bert." + k] != 0 for k in prior}
        n = sum(int(m.sum()) for m in kept.values())
        edge = float(torch.topk(flat, n).values[-1])
        same = sum(int((m & (prior[k] >= edge)).sum()) for k, m in kept.items())
        print(f"{run.name}: {n} kept, {same / n:.1%} of them in the |W| prior's global Top-v")


if __name__ == "__main__":
    main()
