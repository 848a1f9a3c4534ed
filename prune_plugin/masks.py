"""Pure mask functions and the masked linear products, with their gradients.

- ``effective_weight``: W * gate, the one place that multiplies a weight by its mask or gate.
- ``masked_linear``: y = x (W * M)^T + b as one autograd function. With scores it is the
  straight-through estimator of hard and soft movement pruning (Eq. 2): dL/dS = dL/dW' * W,
  dL/dW = dL/dW' * M. The mask is 1 byte per weight; W * M is rebuilt in backward instead of
  being saved (under autocast its low-precision cast is kept, as autocast keeps the cast
  weight of a dense linear), so masking adds no weight-sized tensor to what autograd keeps.
- ``l0_linear``: the same for L0 regularization, with the hard-concrete gate sampled from
  16-bit noise that is the only thing saved (2 bytes per weight); the gate and W * gate are
  rebuilt in backward.
- ``threshold_mask``: soft movement, M = sigmoid(S) > tau (the original code's
  ``sigmoied_threshold``), computed as S > logit(tau) to save a pass.
- ``hard_concrete_gate`` / ``l0_eval_gate``: L0 regularization (Louizos et al.; Eq. 3).
- ``sigmoid_penalty`` / ``expected_l0`` and their gradients: the regularizers of soft
  movement and L0.

Nothing here reads a tensor back to the host, so every function runs on an accelerator
without synchronising with it.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor


def effective_weight(weight: Tensor, gate: Tensor | None) -> Tensor:
    """W' = W * gate (a bool mask or a continuous L0 gate); W itself when ``gate`` is None.
    A bool mask multiplies as it is, cast inside the one kernel (``W * M.to(dtype)`` was a
    cast pass, then the multiply); the values are bitwise the same."""
    if gate is None:
        return weight
    if gate.dtype == torch.bool:
        return weight * as_factor(gate)
    return weight * gate.to(weight.dtype)


_SCRATCH = threading.local()


def _cpu_factor(mask: Tensor | None, weight: Tensor) -> Tensor | None:
    """The CPU's multiplier for a weight-sized product with the mask: the mask as 0 / 1 in the
    weight's dtype, in a buffer kept per thread for this shape (None elsewhere, or for a mask
    that only broadcasts to the weight). The CPU multiplies by a bool or uint8 mask through a
    float copy of it in a fresh tensor, and a fresh weight-sized tensor costs a page fault per
    4 KiB at its first touch (a 9 MB BERT FFN weight: ~6 ms, ten times the product). The copy
    reads the mask as uint8: from bool it takes 3x as long, for the same 0 / 1."""
    if mask is None or mask.shape != weight.shape or not _cpu_kernels(weight):
        return None
    return _scratch("factor", weight).copy_(as_factor(mask))


def _cpu_product(weight: Tensor, factor: Tensor) -> Tensor:
    """W * M from :func:`_cpu_factor`'s M, for the one product it is made for, into a buffer
    kept per thread (the same values as ``weight * mask``)."""
    return torch.mul(weight, factor, out=_scratch("product", weight))


def _scratch(name: str, like: Tensor) -> Tensor:
    buffers: dict[tuple, Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (name, like.shape, like.dtype)
    out = buffers.get(key)
    if out is None:
        out = buffers[key] = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return out


def _cpu_kernels(t: Tensor) -> bool:
    """Whether ``t`` runs the CPU's eager kernels: a real CPU tensor, outside a compiled
    region (fake tensors, as in the step-cost count, stand for an accelerator's)."""
    return t.device.type == "cpu" and not isinstance(t, FakeTensor) \
        and not torch.compiler.is_compiling()


def as_factor(mask: Tensor) -> Tensor:
    """A bool mask as a multiplier: its bytes seen as uint8 0 / 1, the same products (the CPU
    multiplies by uint8 2-3x faster than by bool, which it first converts to float)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _autocast_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype autocast computes this linear in, when it differs from the weight's."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype != weight.dtype else None


class _MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scores: Tensor | None,
                mask: Tensor | None) -> Tensor:
        low = _autocast_dtype(x, weight)
        # autocast: W * M cast once, and kept for the input gradient as autocast keeps the
        # cast weight of a dense linear; x too, kept cast for the weight gradient
        factor = _cpu_factor(mask, weight) if low is None else None
        masked = _cpu_product(weight, factor) if factor is not None else \
            _gated_weight(weight, mask, low)
        ctx.x_dtype = x.dtype
        x = x if low is None else x.to(low)
        out = F.linear(x, masked, bias)
        ctx.save_for_backward(x, weight, mask, masked if low is not None else None)
        ctx.has_bias = bias is not None
        ctx.scores_shape = None if scores is None else scores.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, mask, low = ctx.saved_tensors
        need_x, need_w, need_b, need_s, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_s = None
        g2 = _tokens(grad_out)
        # the CPU: the mask as floats, reused, where a weight-sized product takes it
        factor = _cpu_factor(mask, weight) if need_w or (need_x and low is None) else None
        if need_x:
            if low is not None:
                masked = low
            elif factor is not None:
                masked = _cpu_product(weight, factor)
            else:
                masked = effective_weight(weight, mask)
            grad_x = _input_grad(g2, masked, grad_out.shape).to(ctx.x_dtype)
        if need_w or need_s:
            grad_masked = _weight_grad(g2, x).to(weight.dtype)  # dL/dW' with W' = W * M
            if need_s and need_w and mask is not None:
                grad_s = masked_grads_(grad_masked, weight, mask if factor is None else factor,
                                       _summed_dim(ctx.scores_shape, weight.shape))
                grad_w = grad_masked
            elif need_s:
                grad_s = grad_masked * weight if need_w else grad_masked.mul_(weight)
                grad_w = grad_masked if need_w else None  # (no mask: all kept)
            else:
                grad_w = grad_masked if mask is None else grad_masked.mul_(
                    as_factor(mask) if factor is None else factor)
            if grad_s is not None and ctx.scores_shape != grad_s.shape:  # one score per unit:
                grad_s = grad_s.sum_to_size(ctx.scores_shape)  # summed over the unit
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_s, None


def _summed_dim(scores: torch.Size | None, weight: torch.Size) -> int | None:
    """The one dimension scores of shape ``scores`` broadcast along the weight (a score per
    row: 1; per column: 0), if that is how they cover it."""
    if scores is None or len(scores) != 2:
        return None
    along = [d for d in (0, 1) if scores[d] == 1 and weight[d] != 1]
    return along[0] if len(along) == 1 and scores[1 - along[0]] == weight[1 - along[0]] \
        else None


def _tokens(grad_out: Tensor) -> Tensor:
    """dL/dy as tokens x outputs, for the backward's products and the bias (a copy, made once,
    where it is not contiguous: a product with it would be a batched one)."""
    return grad_out.reshape(-1, grad_out.shape[-1])


def _input_grad(g2: Tensor, weight: Tensor, shape: torch.Size) -> Tensor:
    """dL/dx of y = x W'^T, ``g2`` from :func:`_tokens`, in the shape of x's tokens."""
    return (g2 @ weight.to(g2.dtype)).view(*shape[:-1], weight.shape[-1])


def _weight_grad(g2: Tensor, x: Tensor) -> Tensor:
    """dL/dW' of y = x W'^T: the sum over tokens of dL/dy^T x (``g2`` from :func:`_tokens`)."""
    return g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)


def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None,
                  scores: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight * mask, bias)``; ``mask`` is bool or None (all kept), the weight's
    shape or broadcastable to it (one entry per row or column: structured pruning).

    With ``scores``, the scores get the straight-through gradient ``dL/dW' * W`` (Eq. 2), the
    forward not depending on their values: the mask was chosen from them beforehand. Scores
    broadcastable to the weight (one per row or column) get it summed over what they cover.
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


# -- L0 regularization (hard-concrete gates) ---------------------------------------------------

#: u in [U_EPS, 1 - U_EPS], as in the original code's clamp of its uniform noise.
U_EPS = 1e-4


def l0_noise(shape: tuple[int, ...], device: torch.device,
             generator: torch.Generator | None = None) -> Tensor:
    """16-bit uniform noise for one sampled L0 gate (2 bytes per weight, saved for backward)."""
    return torch.randint(-32768, 32768, shape, dtype=torch.int16, device=device,
                         generator=generator)


def noise_to_uniform(noise: Tensor, dtype: torch.dtype) -> Tensor:
    """u ~ U(0, 1) from :func:`l0_noise`: 65,536 levels, clamped to [U_EPS, 1 - U_EPS]."""
    u = (noise.to(dtype) + 32768.5) / 65536.0
    return u.clamp_(U_EPS, 1.0 - U_EPS)


#: log u - log(1 - u) of each of :func:`l0_noise`'s 65,536 levels, by device and dtype, with the
#: fake mode it was made in (the cost benchmark's, or None): made once, then looked up.
_LEVEL_LOGITS: dict[tuple[torch.device, torch.dtype], tuple[object, Tensor]] = {}


def noise_logits(noise: Tensor, dtype: torch.dtype) -> Tensor:
    """The logistic noise log u - log(1 - u) for the u of :func:`noise_to_uniform`, looked up
    by level in a table computed by those same ops (so the same bits): one gather in place of
    eight elementwise passes in every L0 forward and backward. While compiling, the formula
    itself (the compiler fuses it)."""
    if torch.compiler.is_compiling():
        return _logistic(noise_to_uniform(noise, dtype))
    key, mode = (noise.device, dtype), detect_fake_mode(noise)
    cached = _LEVEL_LOGITS.get(key)
    if cached is None or cached[0] is not mode:
        levels = torch.arange(65536, dtype=torch.int32, device=noise.device)
        levels = torch.where(levels < 32768, levels, levels - 65536).to(torch.int16)
        cached = _LEVEL_LOGITS[key] = (mode, _logistic(noise_to_uniform(levels, dtype)))
    return cached[1][noise.int()]  # (a negative level indexes from the end: its place)


def _logistic(u: Tensor) -> Tensor:
    return torch.log(u) - torch.log1p(-u)


def _l0_stretch(s: Tensor, left: float, right: float) -> Tensor:
    return (s * (right - left) + left).clamp_(0.0, 1.0)


def hard_concrete_gate(scores: Tensor, *, beta: float, left: float, right: float,
                       noise: Tensor | None = None,
                       generator: torch.Generator | None = None,
                       through_top: bool = False) -> Tensor:
    """Training-time L0 gate, sampled per forward:
    u ~ U(0, 1); s = sigmoid((log u - log(1 - u) + S) / b); M = min(1, relu((r - l) s + l)).
    Differentiable in ``scores`` (gives Eq. 3's gradient through autograd). ``noise`` (from
    :func:`l0_noise`) fixes u; by default it is drawn here. ``through_top``: the gradient
    passes the clamp at 1 as if unclamped (straight-through; the value is the same)."""
    if noise is None:
        noise = l0_noise(scores.shape, scores.device, generator)
    stretched = _concrete(scores, noise, beta) * (right - left) + left
    if through_top:
        stretched = stretched.clamp(min=0.0)
        return stretched - (stretched - 1.0).clamp(min=0.0).detach()
    return stretched.clamp(0.0, 1.0)


def _concrete(scores: Tensor, noise: Tensor, beta: float) -> Tensor:
    """sigmoid((log u - log(1 - u) + S) / b), in float32 at least (bf16 cannot hold u)."""
    logistic = noise_logits(noise, torch.promote_types(scores.dtype, torch.float32))
    return torch.sigmoid((logistic + scores) / beta)


def l0_eval_gate(scores: Tensor, *, left: float, right: float) -> Tensor:
    """Deterministic L0 gate at evaluation: min(1, relu((r - l) sigmoid(S) + l))."""
    return _l0_stretch(torch.sigmoid(scores), left, right)


class _L0Linear(torch.autograd.Function):
    """y = x (W * gate(S, u))^T + b with the hard-concrete gate; saves the 16-bit noise (and
    under autocast W * gate cast once, as for the masked linear)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, scores: Tensor,
                noise: Tensor, mask: Tensor | None, beta: float, left: float,
                right: float, floor: float | None, through_top: bool, open_: bool) -> Tensor:
        with torch.no_grad():
            low = _autocast_dtype(x, weight)  # cast once, and kept for the input gradient
            ctx.x_dtype = x.dtype
            x = x if low is None else x.to(low)  # and x, kept cast for the weight gradient
            if open_:  # the value is 1 (times the mask); the scores learn from the sample
                gated = _gated_weight(weight, mask, low)
            else:
                gated = l0_gated_weight(weight, scores.detach(), noise, mask, beta, left, right,
                                        floor, weight.dtype if low is None else low)
            out = F.linear(x, gated, bias)
        ctx.save_for_backward(x, weight, scores, noise, mask, gated if low is not None else None)
        ctx.has_bias = bias is not None
        ctx.params = (beta, left, right, floor, through_top, open_)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, scores, noise, mask, low = ctx.saved_tensors
        beta, left, right, floor, through_top, open_ = ctx.params
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_s = None
        g2 = _tokens(grad_out)
        grad_gated = _weight_grad(g2, x).to(weight.dtype) if need_w or need_s else None
        one = open_ and mask is None  # the gate is 1: W' = W, dL/dW = dL/dW'
        need_gated = need_x and low is None and not one
        if need_gated or need_s or (need_w and not one):
            gated, grad_s = l0_grads_(  # (dL/dW in place of grad_gated)
                grad_gated, weight, scores.detach(), noise, mask, beta, left, right, floor,
                through_top, open_, need_gated, need_w and not one, need_s)
        if need_x:
            w = low if low is not None else weight if one else gated
            grad_x = _input_grad(g2, w, grad_out.shape).to(ctx.x_dtype)
        grad_w = grad_gated if need_w else None
        grad_s = grad_s if need_s else None
        if need_b and ctx.has_bias:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, grad_s, None, None, None, None, None, None, None, None


def l0_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scores: Tensor, noise: Tensor,
              *, beta: float, left: float, right: float, mask: Tensor | None = None,
              floor: float | None = None, through_top: bool = False,
              open_gates: bool = False) -> Tensor:
    """``F.linear(x, weight * hard_concrete_gate(max(scores, floor), noise) * mask, bias)``,
    differentiable in x, weight, bias and scores (Eq. 3; through the floor straight-through,
    and through the clamp at 1 with ``through_top``), keeping only ``noise`` (and the 1-byte
    ``mask``, if any) for backward. ``open_gates``: the gate's value is 1 (the product is
    ``F.linear(x, weight * mask, bias)``) while the scores get the sampled gate's gradient,
    straight-through."""
    return _L0Linear.apply(x, weight, bias, scores, noise, mask, beta, left, right, floor,
                           through_top, open_gates)


def floor_scores(scores: Tensor, floor: float | None) -> Tensor:
    """max(scores, floor) (no gradient through the floor); ``floor`` None: the scores."""
    return scores if floor is None else scores.clamp_min(floor)


def floored(scores: Tensor, floor: float | None) -> Tensor:
    """max(scores, floor) in the forward, the identity in the backward (straight-through), so
    a score held up by the floor still learns; ``floor`` None: the scores."""
    if floor is None:
        return scores
    return scores + (scores.clamp_min(floor) - scores).detach()


# -- one op per elementwise pass ---------------------------------------------------------------
# The elementwise work beside a pruned layer's two matmuls, each a function of its inputs and
# one custom op: on CUDA one compiled kernel (torch.compile: one pass over the weight where
# eager runs a chain of them), elsewhere the eager ops, bit for bit those of before. The
# dispatcher, a user's torch.compile and the step-cost count see one op. Outputs are
# contiguous (as the fake, shape-only versions say).

#: Whether CUDA runs these functions compiled (False: their eager ops, e.g. to compare).
COMPILE_ON_CUDA = True
_COMPILED: dict[str, Any] = {}


def _compiles(t: Tensor) -> bool:
    return COMPILE_ON_CUDA and t.is_cuda


def _compiler_errors() -> tuple[type[BaseException], ...]:
    """What a compiled call raises when compiling, not the computation, failed: dynamo's
    errors (an inductor failure is one) and the recompile limit that ``fullgraph`` turns into
    an error (a model with many dtypes or layouts can reach it at any step)."""
    from torch._dynamo import exc
    return tuple(getattr(exc, name) for name in ("TorchDynamoException",
                                                 "FailOnRecompileLimitHit") if hasattr(exc, name))


def _run(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, compiled where its tensors are on CUDA. Where compiling fails (no
    Triton for this GPU, a recompile past dynamo's limit) the eager ops run, said once, for
    this and every later call."""
    if not _compiles(next(a for a in args if isinstance(a, Tensor))):
        return fn(*args)
    compiled: Any = _COMPILED.get(fn.__name__)
    if compiled is fn:  # compiling failed before
        return fn(*args)
    # the first call falls back on any failure (a missing compiler may raise anything);
    # later ones on the compiler's own errors
    caught = Exception if compiled is None else _compiler_errors()
    try:
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        out = compiled(*args)
    except caught as error:
        out = fn(*args)  # an error of the computation itself (seen while tracing) raises here
        warnings.warn(f"prune_plugin: compiling {fn.__name__} failed ({type(error).__name__}: "
                      f"{error}); its eager ops run instead, a few more passes a step. Set "
                      "prune_plugin.masks.COMPILE_ON_CUDA = False to skip compiling.",
                      RuntimeWarning, stacklevel=2)
        _COMPILED[fn.__name__] = fn
        return out
    _COMPILED[fn.__name__] = compiled
    return out


def _gated_weight(weight: Tensor, gate: Tensor | None, low: torch.dtype | None) -> Tensor:
    """W * gate, cast to ``low`` (autocast's dtype, if any) in the same pass."""
    if gate is None:
        return weight if low is None else weight.to(low)
    return effective_weight(weight, gate) if low is None else masked_weight(weight, gate, low)


def _masked_weight(weight: Tensor, gate: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return out.copy_(effective_weight(weight, gate))  # (the cast is the copy)


@torch.library.custom_op("prune_plugin::masked_weight", mutates_args=())
def masked_weight(weight: Tensor, gate: Tensor, dtype: torch.dtype) -> Tensor:
    """``(W * gate).to(dtype)`` in one pass: the masked linear's weight under autocast."""
    return _run(_masked_weight, weight, gate, dtype)


@masked_weight.register_fake
def _(weight: Tensor, gate: Tensor, dtype: torch.dtype) -> Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


def _masked_grads(grad: Tensor, weight: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    product = grad * weight
    grad_s = product.contiguous() if dim is None else product.sum(dim, keepdim=True)
    grad.mul_(as_factor(mask))
    return grad_s


@torch.library.custom_op("prune_plugin::masked_grads_", mutates_args=("grad",))
def masked_grads_(grad: Tensor, weight: Tensor, mask: Tensor, dim: int | None = None
                  ) -> Tensor:
    """The scores' gradient ``dL/dW' * W`` (Eq. 2), returned, and the weight's ``dL/dW' * M``
    in place of ``grad`` = dL/dW' (no new weight-sized buffer), in one pass over it. ``mask``:
    bool, or (the CPU) the mask as 0 / 1 floats. ``dim``: the scores' gradient summed over it
    (one score per row or column: structured pruning), never written whole."""
    return _run(_masked_grads, grad, weight, mask, dim)


@masked_grads_.register_fake
def _(grad: Tensor, weight: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    shape = list(grad.shape)
    if dim is not None:
        shape[dim] = 1
    return grad.new_empty(shape)


def _l0_gated_weight(weight: Tensor, scores: Tensor, noise: Tensor, mask: Tensor | None,
                     beta: float, left: float, right: float, floor: float | None,
                     dtype: torch.dtype) -> Tensor:
    gate = hard_concrete_gate(floor_scores(scores, floor), beta=beta, left=left, right=right,
                              noise=noise)
    if mask is not None:
        gate.mul_(as_factor(mask))
    if dtype == weight.dtype:
        return effective_weight(weight, gate).contiguous()
    return _masked_weight(weight, gate, dtype)


@torch.library.custom_op("prune_plugin::l0_gated_weight", mutates_args=())
def l0_gated_weight(weight: Tensor, scores: Tensor, noise: Tensor, mask: Tensor | None,
                    beta: float, left: float, right: float, floor: float | None,
                    dtype: torch.dtype) -> Tensor:
    """``(W * hard_concrete_gate(max(S, floor), u) * M).to(dtype)`` in one pass."""
    return _run(_l0_gated_weight, weight, scores, noise, mask, beta, left, right, floor, dtype)


@l0_gated_weight.register_fake
def _(weight: Tensor, scores: Tensor, noise: Tensor, mask: Tensor | None, beta: float,
      left: float, right: float, floor: float | None, dtype: torch.dtype) -> Tensor:
    return weight.new_empty(weight.shape, dtype=dtype)


def _l0_grads(grad: Tensor | None, weight: Tensor, scores: Tensor, noise: Tensor,
              mask: Tensor | None, beta: float, left: float, right: float, floor: float | None,
              through_top: bool, open_: bool, need_gated: bool, need_w: bool, need_s: bool
              ) -> tuple[Tensor, Tensor]:
    def none() -> Tensor:  # an output not asked for (each its own: outputs may not alias)
        return weight.new_empty(0)
    # (a floored score gets the gradient at the floor: straight-through, so it can rise)
    s = _concrete(floor_scores(scores, floor), noise, beta)
    stretched = s * (right - left) + left
    if open_:
        gate = mask
    else:
        gate = stretched.clamp(0.0, 1.0)
        if mask is not None:
            gate.mul_(as_factor(mask))
    gated = effective_weight(weight, gate).contiguous() if need_gated else none()
    grad_s = none()
    if grad is not None and need_s:  # d gate / dS = (r - l) s (1 - s) / b inside the clamp
        inside = stretched > 0.0 if through_top else (stretched > 0.0) & (stretched < 1.0)
        if mask is not None:
            inside &= mask
        dgate = s.mul_(1.0 - s).mul_((right - left) / beta).mul_(as_factor(inside))
        grad_s = (grad * weight).mul_(dgate).to(scores.dtype).contiguous()
    if grad is not None and need_w and gate is not None:  # (the bare mask in an open warm-up)
        grad.mul_(as_factor(gate) if gate.dtype == torch.bool else gate.to(grad.dtype))
    return gated, grad_s


@torch.library.custom_op("prune_plugin::l0_grads_", mutates_args=("grad",))
def l0_grads_(grad: Tensor | None, weight: Tensor, scores: Tensor, noise: Tensor,
              mask: Tensor | None, beta: float, left: float, right: float, floor: float | None,
              through_top: bool, open_: bool, need_gated: bool, need_w: bool, need_s: bool
              ) -> tuple[Tensor, Tensor]:
    """L0's backward beside its matmuls, in one pass: the gate rebuilt from the noise;
    returned (each only if asked, else empty) ``W * gate`` and ``dL/dS = dL/dW' * W * d gate
    / dS`` (Eq. 3); with ``need_w``, ``grad`` = dL/dW' becomes ``dL/dW = dL/dW' * gate`` in
    place."""
    return _run(_l0_grads, grad, weight, scores, noise, mask, beta, left, right, floor,
                through_top, open_, need_gated, need_w, need_s)


@l0_grads_.register_fake
def _(grad: Tensor | None, weight: Tensor, scores: Tensor, noise: Tensor, mask: Tensor | None,
      beta: float, left: float, right: float, floor: float | None, through_top: bool,
      open_: bool, need_gated: bool, need_w: bool, need_s: bool) -> tuple[Tensor, Tensor]:
    def full(asked: bool, dtype: torch.dtype) -> Tensor:
        return weight.new_empty(weight.shape if asked else (0,), dtype=dtype)
    return full(need_gated, weight.dtype), full(grad is not None and need_s, scores.dtype)


# -- regularizers ------------------------------------------------------------------------------
# The per-score penalties R(S), summed over scores; the optimizer adds lambda / N * dR/dS. Both
# are sums of sigmoid(S - shift): soft movement's (shift 0) and L0's expected open gates.

def sigmoid_penalty(scores: Tensor) -> Tensor:
    """Soft movement's R(S) = sum sigmoid(S) (the paper's Sec. 4, lambda * sum sigmoid(S))."""
    return torch.sigmoid(scores).sum()


def sigmoid_penalty_grad(scores: Tensor) -> Tensor:
    """d/dS of :func:`sigmoid_penalty`, per score: sigmoid(S) (1 - sigmoid(S))."""
    return _sigmoid_slope(scores)


def l0_shift(*, beta: float, left: float, right: float) -> float:
    """The shift of L0's gate logits: P(gate open) = sigmoid(S - b log(-l / r))."""
    return beta * math.log(-left / right)


def expected_l0(scores: Tensor, *, beta: float, left: float, right: float) -> Tensor:
    """L0's R(S): the expected number of open gates, sum sigmoid(S - b log(-l / r))."""
    return torch.sigmoid(scores - l0_shift(beta=beta, left=left, right=right)).sum()


def expected_l0_grad(scores: Tensor, *, beta: float, left: float, right: float) -> Tensor:
    """d/dS of :func:`expected_l0`, per score."""
    return _sigmoid_slope(scores - l0_shift(beta=beta, left=left, right=right))


def _sigmoid_slope(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s.mul_(1.0 - s)


def _add_sigmoid_slope(grad: Tensor, scores: Tensor, scale: Tensor, factor: Tensor | None,
                       shift: float) -> None:
    slope = _sigmoid_slope(scores - shift if shift else scores).mul_(scale)
    grad.add_(slope if factor is None else slope.mul_(factor))


@torch.library.custom_op("prune_plugin::add_sigmoid_slope_", mutates_args=("grad",))
def add_sigmoid_slope_(grad: Tensor, scores: Tensor, scale: Tensor, factor: Tensor | None,
                       shift: float) -> None:
    """``grad += scale * factor * d/dS sigmoid(S - shift)`` in one pass (``scale`` and
    ``factor``: 0-d tensors, so that a compiled kernel serves every step's lambda): a penalty's
    gradient added to the scores' (a multi-tensor version takes five passes)."""
    _run(_add_sigmoid_slope, grad, scores, scale, factor, shift)


@add_sigmoid_slope_.register_fake
def _(grad: Tensor, scores: Tensor, scale: Tensor, factor: Tensor | None, shift: float) -> None:
    return None
