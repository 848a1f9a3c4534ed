"""Attach, detach and finalize: the one place that changes a model.

How a Linear computes ``x (W * M)^T + b`` without replacing its class:

- a **forward pre-hook** decides the gate of the coming forward: the cached 1-byte Top-v or
  threshold mask, or (L0, training) a fresh hard-concrete sample;
- an **instance-level** ``forward`` (``module.forward``, as accelerate's hooks do) computes with
  it through one fused autograd function (:func:`prune_plugin.masks.masked_linear`).

Why this shape: ``type(module) is nn.Linear`` still holds, ``weight`` stays the same Parameter
under the same key (no ``weight_orig``, no ``parametrizations.*``), so optimizers, Hugging
Face loaders and state dicts keep working. Scores are real Parameters registered on the
Linear itself (``<module>.pruning_scores``), so DeepSpeed ZeRO-3, which gathers a module's own
parameters around its forward and backward, shards and gathers them with the weight; the
hooks read nothing but the module's own tensors. Hooks registered after an engine's own
gather hooks run after them and see full tensors.

``detach`` is the exact inverse of ``attach``; ``finalize`` bakes ``W * M`` into ``weight``
and then detaches: a plain model with no hooks, no extra attributes, no extra keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prune_plugin.errors import AttachError
from prune_plugin.masks import (hard_concrete_gate, l0_eval_gate, logit, masked_linear,
                                threshold_mask)
from prune_plugin.policy import PruningPolicy
from prune_plugin.schedule import cubic_schedule
from prune_plugin.selection import (SelectionHint, TopVThreshold, mask_from_threshold,
                                    topv_count, topv_masks, topv_thresholds)
from prune_plugin.targeting import find_targets

#: Name of the score Parameter registered on each pruned Linear.
SCORES_NAME = "pruning_scores"
_ATTACHMENT_ATTR = "_prune_plugin_attachment"
_UNSET = object()


class PrunedLayer:
    """The pruning state of one Linear: its current mask and how it computes with it."""

    def __init__(self, name: str, module: nn.Linear, policy: PruningPolicy) -> None:
        self.name = name
        self.module = module
        self.policy = policy
        self.mask: Tensor | None = None  # bool, same shape as the weight; None: all kept
        # Sharded scores (ZeRO-3): no full mask is kept between forwards; each forward rebuilds
        # it from the gathered scores and this threshold.
        self.threshold: TopVThreshold | None = None
        self._mask_buffer: Tensor | None = None
        self._gate: Any = _UNSET  # prepared by the pre-hook for the next forward
        self._handle: RemovableHandle | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def scores(self) -> nn.Parameter | None:
        return self.module._parameters.get(SCORES_NAME)

    @property
    def numel(self) -> int:
        w = self.module.weight
        return getattr(w, "ds_numel", w.numel())

    def importance(self) -> Tensor:
        """What Top-v ranks: the learned scores, or |W| for magnitude pruning."""
        scores = self.scores
        return scores.detach() if scores is not None else self.weight.detach().abs()

    def mask_buffer(self) -> Tensor:
        """A reused bool buffer of the weight's shape (no per-step allocation)."""
        w = self.weight
        if self._mask_buffer is None or self._mask_buffer.device != w.device \
                or self._mask_buffer.shape != w.shape:
            self._mask_buffer = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        return self._mask_buffer

    def set_mask(self, mask: Tensor | None) -> None:
        if mask is not None and mask is not self._mask_buffer:
            self.mask_buffer().copy_(mask)
            mask = self._mask_buffer
        self.mask = mask
        self.threshold = None

    def set_threshold(self, threshold: TopVThreshold | None) -> None:
        """Sharded mode: the mask is ``importance > value`` plus the first ``ties_kept`` ties,
        rebuilt in each forward; None: all kept."""
        self.mask = self._mask_buffer = None
        self.threshold = threshold

    def gate(self, training: bool) -> Tensor | None:
        """The multiplier of W for a forward: bool mask, continuous L0 gate, or None (all)."""
        p = self.policy
        if p.method == "l0":
            scores = self.scores
            if training:
                return hard_concrete_gate(scores, beta=p.l0_beta, left=p.l0_left,
                                          right=p.l0_right)
            return l0_eval_gate(scores, left=p.l0_left, right=p.l0_right)
        if self.threshold is not None:
            return mask_from_threshold(self.importance(), self.threshold)
        if self.mask is not None and self.mask.device != self.weight.device:
            self.set_mask(self.mask.to(self.weight.device))  # the model was moved
        return self.mask

    def kept(self) -> int:
        """Number of weights the forward keeps (L0: gates above 0 at evaluation)."""
        with torch.no_grad():
            gate = self.gate(training=False)
        return self.numel if gate is None else int(torch.count_nonzero(gate))

    # -- the module's computation -----------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._gate = self.gate(module.training)

    def forward(self, input: Tensor) -> Tensor:
        gate, self._gate = self._gate, _UNSET
        if gate is _UNSET:  # forward called directly, bypassing the hooks
            gate = self.gate(self.module.training)
        m = self.module
        if self.policy.method == "l0":
            return F.linear(input, m.weight * gate, m.bias)
        scores = self.scores
        if gate is None and scores is None:
            return F.linear(input, m.weight, m.bias)
        if not torch.is_grad_enabled():
            return F.linear(input, m.weight if gate is None else m.weight * gate, m.bias)
        return masked_linear(input, m.weight, m.bias, gate, scores)

    # -- install / uninstall -----------------------------------------------------------------------

    def install(self, scores: Tensor | None) -> None:
        m = self.module
        if scores is not None:
            if not isinstance(scores, nn.Parameter):
                scores = nn.Parameter(scores, requires_grad=True)
            m.register_parameter(SCORES_NAME, scores)
        self._handle = m.register_forward_pre_hook(self._pre_hook)
        m.forward = self.forward  # instance attribute; the class is untouched

    def reinstall_hook(self) -> None:
        """Register the pre-hook again, after the hooks added since (an engine's gather hooks,
        which must run first so that the gate sees full tensors)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = self.module.register_forward_pre_hook(self._pre_hook)

    def uninstall(self) -> None:
        m = self.module
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if m.__dict__.get("forward") == self.forward:
            del m.forward
        if SCORES_NAME in m._parameters:
            del m._parameters[SCORES_NAME]
        self.mask = self._mask_buffer = None
        self.threshold = None
        self._gate = _UNSET


@dataclass(frozen=True)
class Sharding:
    """How to reach this rank's share of sharded scores (set by a ZeRO-3 integration).

    ``local_importance(layer)`` returns this rank's flat shard of the layer's importance (its
    real elements only); ``all_reduce`` sums a small tensor in place across ranks.
    """

    local_importance: Callable[[PrunedLayer], Tensor]
    all_reduce: Callable[[Tensor], None]


class Attachment:
    """Everything attached to one model: its pruned layers and their masks."""

    def __init__(self, model: nn.Module, policy: PruningPolicy, layers: list[PrunedLayer]) -> None:
        self.model = model
        self.policy = policy
        self.layers = layers
        self.closed = False
        self.current_target: float | None = None  # remaining fraction (Top-v) or tau (soft)
        self._hints: dict[str, SelectionHint | None] = {}  # warm starts for Top-v, per selection
        self._on_close: list[Callable[[], None]] = []
        self.sharding: Sharding | None = None

    def __repr__(self) -> str:
        return f"Attachment(method={self.policy.method!r}, layers={len(self.layers)})"

    @property
    def scores(self) -> list[nn.Parameter]:
        return [layer.scores for layer in self.layers if layer.scores is not None]

    def named_layers(self) -> dict[str, PrunedLayer]:
        return {layer.name: layer for layer in self.layers}

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def update_masks(self, step: int) -> None:
        """Recompute every mask for the forwards after ``step`` optimizer steps."""
        p = self.policy
        sched = dict(warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                     total_steps=p.total_steps)
        with torch.no_grad():
            if p.method == "soft_movement":
                tau = cubic_schedule(step, initial=p.initial_threshold,
                                     final=p.final_threshold, **sched)
                for layer in self.layers:
                    if self.sharding is not None:  # S > logit(tau): a threshold with no ties
                        layer.set_threshold(None if tau <= 0.0 else TopVThreshold(
                            logit(tau), 0, 0))
                    else:
                        layer.set_mask(threshold_mask(layer.scores, tau,
                                                      out=layer.mask_buffer()))
                self.current_target = tau
            elif p.uses_topv:
                v = cubic_schedule(step, initial=p.initial_remaining, final=p.final_remaining,
                                   **sched)
                self.current_target = v
                self._update_topv(v)

    def _update_topv(self, remaining: float) -> None:
        if remaining >= 1.0:
            for layer in self.layers:
                layer.set_mask(None)
            return
        groups = [[layer] for layer in self.layers] if self.policy.scope == "local" \
            else [self.layers]
        if self.sharding is not None:
            self._update_topv_sharded(remaining, groups)
            return
        for group in groups:
            key = group[0].name if len(group) == 1 else "*"
            k = topv_count(remaining, sum(layer.numel for layer in group))
            masks, _, self._hints[key] = topv_masks(
                [layer.importance() for layer in group], k,
                out=[layer.mask_buffer() for layer in group], hint=self._hints.get(key))
            for layer, mask in zip(group, masks):
                layer.set_mask(mask)

    def _update_topv_sharded(self, remaining: float, groups: list[list[PrunedLayer]]) -> None:
        index = {id(layer): i for i, layer in enumerate(self.layers)}
        totals = [sum(layer.numel for layer in group) for group in groups]  # over all ranks
        thresholds = topv_thresholds(
            [self.sharding.local_importance(layer) for layer in self.layers],
            [[index[id(layer)] for layer in group] for group in groups],
            [topv_count(remaining, n) for n in totals], self.sharding.all_reduce, totals=totals)
        for layer, threshold in zip(self.layers, thresholds):
            layer.set_threshold(threshold)

    def kept_counts(self) -> list[int]:
        """Weights each layer's forward keeps. With sharded scores each rank counts its shard
        and one all-reduce adds them up (a collective: call it on every rank)."""
        if self.sharding is None:
            return [layer.kept() for layer in self.layers]
        local = []
        with torch.no_grad():
            for layer in self.layers:
                imp = self.sharding.local_importance(layer)
                if self.policy.method == "l0":
                    gate = l0_eval_gate(imp, left=self.policy.l0_left, right=self.policy.l0_right)
                    local.append(int(torch.count_nonzero(gate)))
                elif layer.threshold is None:
                    local.append(imp.numel())
                else:
                    local.append(int(torch.count_nonzero(imp > layer.threshold.value)))
        counts = torch.tensor(local, dtype=torch.int64)
        self.sharding.all_reduce(counts)
        return [int(c) + (layer.threshold.ties_kept if layer.threshold is not None else 0)
                for c, layer in zip(counts.tolist(), self.layers)]

    def close(self) -> None:
        for layer in self.layers:
            layer.uninstall()
        if self.model.__dict__.get(_ATTACHMENT_ATTR) is self:
            del self.model.__dict__[_ATTACHMENT_ATTR]
        self.closed = True
        for callback in self._on_close:
            callback()


def get_attachment(model: nn.Module) -> Attachment | None:
    """The live attachment of ``model`` (the object passed to ``attach``), or None."""
    return model.__dict__.get(_ATTACHMENT_ATTR)


def _init_scores(policy: PruningPolicy, weight: Tensor) -> Tensor:
    w = weight.detach()
    kind, value = policy.score_init, policy.score_init_value
    if kind == "constant":
        return torch.full_like(w, value)
    if kind == "uniform":
        return torch.empty_like(w).uniform_(-value, value)
    if kind == "kaiming":
        s = torch.empty_like(w)
        nn.init.kaiming_uniform_(s, a=math.sqrt(5))
        return s
    return w.abs().clone()  # magnitude


def _check_attachable(model: nn.Module, targets: list[tuple[str, nn.Linear]]) -> None:
    if get_attachment(model) is not None:
        raise AttachError("this model is already attached to a pruning policy. Fix: call "
                          "prune_plugin.detach(model) first, or reuse the existing optimizer.")
    for name, m in targets:
        if SCORES_NAME in m._parameters or "forward" in m.__dict__:
            raise AttachError(f"module {name!r} already has pruning scores or a replaced "
                              "forward (attached through another root module?). Fix: detach "
                              "it first.")
        w = m.weight
        if not isinstance(w, nn.Parameter) or not w.dtype.is_floating_point:
            raise AttachError(f"module {name!r} has a {w.dtype} weight; pruning needs floating "
                              "point weights (quantized or integer weights cannot carry "
                              "scores). Fix: exclude it, or attach before quantizing.")


def attach(model: nn.Module, policy: PruningPolicy, *,
           score_factory: Callable[[PrunedLayer], Tensor] | None = None,
           sharding: Sharding | None = None) -> Attachment:
    """Attach ``policy`` to ``model``: scores, hooks and masks on every targeted Linear.

    All or nothing: on any error the model is left exactly as it was. Most users never call
    this directly: ``PruningOptimizer(optimizer, policy, model=model)`` does. Integrations
    whose weights are already sharded pass ``score_factory`` (builds one layer's scores) and
    ``sharding``.
    """
    if not isinstance(policy, PruningPolicy):
        raise TypeError(f"policy must be a PruningPolicy, got {type(policy).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = find_targets(model, policy.targets, policy.exclude)
    _check_attachable(model, targets)
    layers = [PrunedLayer(name, m, policy) for name, m in targets]
    attachment = Attachment(model, policy, layers)
    attachment.sharding = sharding
    make = score_factory or (lambda layer: _init_scores(policy, layer.weight))
    try:
        for layer in layers:
            layer.install(make(layer) if policy.has_scores else None)
        model.__dict__[_ATTACHMENT_ATTR] = attachment
        attachment.update_masks(0)
    except BaseException:
        attachment.close()
        raise
    return attachment


def _require_attachment(model: nn.Module, action: str) -> Attachment:
    attachment = get_attachment(model)
    if attachment is None:
        raise AttachError(f"cannot {action}: this model has no pruning attached (pass the same "
                          "root module that was given to PruningOptimizer).")
    return attachment


def detach(model: nn.Module) -> nn.Module:
    """Remove scores, masks and hooks; the model is bit-exactly what it was before attaching."""
    _require_attachment(model, "detach").close()
    return model


def finalize(model: nn.Module) -> nn.Module:
    """Bake ``W * M`` into each pruned ``weight`` (in place) and detach: a plain model.

    L0 uses its deterministic evaluation gate. Returns the model for chaining.
    """
    attachment = _require_attachment(model, "finalize")
    with torch.no_grad():
        for layer in attachment.layers:
            gate = layer.gate(training=False)
            if gate is not None:
                layer.weight.mul_(gate.to(layer.weight.dtype))
    attachment.close()
    return model
