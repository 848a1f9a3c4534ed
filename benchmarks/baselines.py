"""Peers re-implemented for side-by-side timing.

- ``SortEveryForward``: the original research code's approach (``emmental`` MaskedLinear with
  ``TopKBinarizer``): every forward of every layer sorts all of its scores to build the mask.
- ``torch_prune_l1``: ``torch.nn.utils.prune.l1_unstructured`` with its mask recomputed after
  each optimizer step (weights live in ``weight_orig``; the mask is a buffer).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune


class _TopKBinarizer(torch.autograd.Function):
    """The original code's TopKBinarizer: full sort; straight-through backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep: float) -> torch.Tensor:
        mask = scores.clone()
        _, idx = scores.flatten().sort(descending=True)
        j = int(keep * scores.numel())
        flat = mask.flatten()
        flat[idx[j:]] = 0
        flat[idx[:j]] = 1
        return mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def attach_sort_every_forward(modules: list[nn.Linear], keep: float) -> list[nn.Parameter]:
    scores = []
    for m in modules:
        m.mask_scores = nn.Parameter(torch.zeros_like(m.weight))
        scores.append(m.mask_scores)

        def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            mask = _TopKBinarizer.apply(self.mask_scores, keep)
            return F.linear(x, self.weight * mask, self.bias)

        m.forward = types.MethodType(forward, m)
    return scores


def attach_torch_prune(modules: list[nn.Linear], amount: float) -> None:
    for m in modules:
        prune.l1_unstructured(m, "weight", amount=amount)


def refresh_torch_prune(modules: list[nn.Linear], amount: float) -> None:
    method = prune.L1Unstructured(amount)
    with torch.no_grad():
        for m in modules:
            m.weight_mask.copy_(method.compute_mask(m.weight_orig, torch.ones_like(m.weight_mask)))
