"""Pure mask functions and the masked linear product, with their gradients.

- ``masked_linear``: y = x (W * M)^T + b as one autograd function. With scores it is the
  straight-through estimator of hard and soft movement pruning (Eq. 2): dL/dS = dL/dW' * W,
  dL/dW = dL/dW' * M. The mask is 1 byte per weight and W * M is rebuilt in backward instead of
  being saved, so masking adds no weight-sized tensor to what autograd keeps.
- ``threshold_mask``: soft movement, M = sigmoid(S) > tau (the original code's
  ``sigmoied_threshold``), computed as S > logit(tau) to save a pass.
- ``hard_concrete_gate`` / ``l0_eval_gate``: L0 regularization (Louizos et al.; Eq. 3).
- ``regularizer_grad``: the gradient of the sigmoid (soft movement) or expected-L0 penalty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scores: Tensor | None,
                mask: Tensor | None) -> Tensor:
        masked = weight if mask is None else weight * mask
        out = F.linear(x, masked, bias)
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, need_b, need_s, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_s = None
        if need_x:
            masked = weight if mask is None else weight * mask
            grad_x = (grad_out @ masked.to(grad_out.dtype)).to(x.dtype)
        if need_w or need_s:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            grad_masked = (g2.t() @ x2).to(weight.dtype)  # dL/dW' with W' = W * M
            if need_s:
                grad_s = grad_masked * weight if need_w else grad_masked.mul_(weight)
            if need_w:
                grad_w = grad_masked if mask is None else grad_masked.mul_(mask)
        if need_b and ctx.has_bias:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, grad_s, None


def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                  scores: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight * mask, bias)``; ``mask`` is bool or None (all kept).

    With ``scores``, the scores get the straight-through gradient ``dL/dW' * W`` (Eq. 2), the
    forward not depending on their values: the mask was chosen from them beforehand.
    """
    return _MaskedLinear.apply(x, weight, bias, scores, mask)


def logit(p: float) -> float:
    """log(p / (1 - p)): sigmoid(S) > p exactly when S > logit(p)."""
    return math.log(p / (1.0 - p))


def threshold_mask(scores: Tensor, tau: float, out: Tensor | None = None) -> Tensor | None:
    """Soft movement mask ``sigmoid(S) > tau``; None (all kept) when ``tau`` is 0."""
    if tau <= 0.0:
        return None
    return torch.gt(scores, logit(tau), out=out)


def _l0_stretch(s: Tensor, left: float, right: float) -> Tensor:
    return (s * (right - left) + left).clamp_(0.0, 1.0)


def hard_concrete_gate(scores: Tensor, *, beta: float, left: float, right: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """Training-time L0 gate, sampled per forward:
    u ~ U(0, 1); s = sigmoid((log u - log(1 - u) + S) / b); M = min(1, relu((r - l) s + l)).
    Differentiable in ``scores`` (gives Eq. 3's gradient through autograd)."""
    u = torch.rand(scores.shape, generator=generator, device=scores.device,
                   dtype=scores.dtype).clamp_(1e-4, 1.0 - 1e-4)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + scores) / beta)
    return (s * (right - left) + left).clamp(0.0, 1.0)


def l0_eval_gate(scores: Tensor, *, left: float, right: float) -> Tensor:
    """Deterministic L0 gate at evaluation: min(1, relu((r - l) sigmoid(S) + l))."""
    return _l0_stretch(torch.sigmoid(scores), left, right)


def regularizer_grad(scores: Tensor, *, method: str, beta: float = 2.0 / 3.0,
                     left: float = -0.1, right: float = 1.1) -> Tensor:
    """d/dS of the per-element penalty, to be scaled by lambda / N (N: all targeted scores).

    soft_movement: R = sigmoid(S) (the paper's R(S) = lambda * sum sigmoid(S)).
    l0: the expected L0 norm, sigmoid(S - b log(-l / r)).
    """
    z = scores if method == "soft_movement" else scores - beta * math.log(-left / right)
    s = torch.sigmoid(z)
    return s.mul_(1.0 - s)


def regularizer_value(scores: Tensor, *, method: str, beta: float = 2.0 / 3.0,
                      left: float = -0.1, right: float = 1.1) -> Tensor:
    """sum over elements of the per-element penalty (for logging)."""
    z = scores if method == "soft_movement" else scores - beta * math.log(-left / right)
    return torch.sigmoid(z).sum()
