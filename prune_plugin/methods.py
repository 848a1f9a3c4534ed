"""One strategy object per pruning method of the paper: what it learns, how it masks.

Every per-method decision lives here, so the rest of the plugin asks a method object instead
of comparing method names:

- magnitude: no scores; the mask is the Top-v of abs(W), v on the cubic schedule (Eq. 5);
- movement: scores S, straight-through (Eq. 2); the Top-v of S on the cubic schedule;
- soft_movement: S, straight-through; sigmoid(S) > tau, tau on the cubic schedule; penalty
  lambda * mean sigmoid(S);
- l0: log-alpha S, through the gate; a hard-concrete gate sampled per forward; penalty
  lambda * mean E[L0].

With ``final_remaining`` (beyond the paper) soft movement keeps its threshold and a controller
scales lambda so the kept fraction follows v(t) (:class:`SoftMovementControlled`, or a global
Top-v of the scores, :class:`SoftMovementToTarget`), and L0 closes the gates outside a global
Top-v (:class:`L0ToTarget`).

A method is stateless: the masks it computes are written to the layers
(:class:`~prune_plugin.hooks.PrunedLayer`), the step count is the pruner's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from prune_plugin.distributed import whole_tensor
from prune_plugin.masks import (expected_l0_grad, floor_scores, floored, hard_concrete_gate,
                                l0_eval_gate, l0_noise, logit, sigmoid_penalty_grad,
                                threshold_mask)
from prune_plugin.policy import PruningPolicy
from prune_plugin.schedule import controlled_lambda_factor, cubic_schedule, lambda_at
from prune_plugin.selection import (TopVThreshold, mask_from_threshold, topv_count, topv_masks,
                                    topv_rows, topv_thresholds)

if TYPE_CHECKING:
    from prune_plugin.hooks import PrunedLayer
    from prune_plugin.pruner import Pruner
    from prune_plugin.structure import UnitGroup


class PruningMethod:
    """The behaviour shared by every method; subclasses override what differs."""

    name: ClassVar[str]
    #: Whether the method learns a score Parameter per weight.
    has_scores: ClassVar[bool] = True
    #: Whether the scores get the straight-through gradient dL/dW' * W (Eq. 2) from the forward.
    straight_through: ClassVar[bool] = False
    #: Whether training forwards sample a fresh gate instead of using the layer's mask.
    samples_gates: ClassVar[bool] = False
    #: What ``schedule_value`` is, as a name for logs (None: no schedule).
    schedule_name: ClassVar[str | None] = None

    def __init__(self, policy: PruningPolicy) -> None:
        self.policy = policy

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # -- scores -------------------------------------------------------------------------------

    def initial_scores(self, selectable: PrunedLayer | UnitGroup) -> Tensor | None:
        """The scores of a layer (one per weight) or of a unit group (one per unit) at attach
        time (``score_init``), or None for no scores."""
        if not self.has_scores:
            return None
        like = selectable.magnitudes().detach()
        kind, value = self.policy.score_init, self.policy.score_init_value
        if kind == "constant":
            scores = torch.full_like(like, value)
        elif kind == "uniform":
            scores = torch.empty_like(like).uniform_(-value, value)
        elif kind == "kaiming":
            scores = torch.empty_like(like)
            # the fan-in of the Linear's [out, in]: Conv1D stores [in, out]
            nn.init.kaiming_uniform_(scores.t() if getattr(selectable, "transposed", False)
                                     else scores, a=math.sqrt(5))
        else:
            # magnitude: |W| (or unit norms) normalised per layer, so that one scale fits every
            # layer and model (a layer's |W| is ~1e-2 while score updates are ~score_lr a step)
            scores = like.div_(like.mean().clamp_min(1e-12)).mul_(value)
        return scores.add_(self.policy.score_init_offset)

    # -- the schedule -------------------------------------------------------------------------

    def schedule_value(self, step: int) -> float | None:
        """What the schedule asks for after ``step`` steps: the remaining fraction (Top-v) or
        tau (soft movement); None when the method has no schedule."""
        return None

    def penalty_lambda(self, step: int) -> float:
        """lambda of the regularizer after ``step`` steps (0 for unregularized methods)."""
        return 0.0

    def penalty_grad(self, scores: Tensor) -> Tensor:
        """d R / d S per element, to be scaled by lambda / N."""
        raise NotImplementedError

    def penalty_factor(self, pruner: Pruner) -> Tensor | None:
        """A multiplier of the scheduled lambda measured from the current scores (a 0-dim
        tensor on their device), or None: lambda as scheduled."""
        return None

    def gate_floor(self, step: int) -> float | None:
        """L0: a floor under the log-alpha of the gates in use after ``step`` steps (None)."""
        return None

    def gates_open(self, step: int) -> bool:
        """L0: whether the training forwards after ``step`` steps use gates of value 1."""
        return False

    # -- masks --------------------------------------------------------------------------------

    def refresh(self, pruner: Pruner) -> None:
        """Recompute every layer's mask for the forwards after ``pruner.step_count`` steps."""

    def gate(self, layer: PrunedLayer) -> Tensor | None:
        """The deterministic multiplier of W (evaluation, finalize): the layer's bool mask (its
        unit group's, spread over rows or columns), or None when every weight is kept."""
        if layer.group is not None:
            mask = layer.group.mask
            return None if mask is None else layer.layout.expand(mask)
        if layer.threshold is not None:  # sharded scores: rebuilt from the gathered ones
            return mask_from_threshold(self.importance(layer), layer.threshold)
        return layer.mask

    def importance(self, selectable: PrunedLayer | UnitGroup) -> Tensor:
        """What a mask ranks or thresholds: the scores by default (whole: FSDP2's shards of a
        unit group's few scores are gathered)."""
        return whole_tensor(selectable.scores)

    def sampling_mask(self, layer: PrunedLayer) -> Tensor | None:
        """A mask applied on top of the gates sampled in training forwards (None: none)."""
        return None


class _TopV(PruningMethod):
    """Top-v of an importance (Eq. 1), v on the cubic schedule (Eq. 5)."""

    schedule_name = "remaining_target"

    @property
    def scope(self) -> str:
        return self.policy.scope

    def schedule_value(self, step: int) -> float:
        p = self.policy
        return cubic_schedule(step, initial=p.initial_remaining, final=p.final_remaining,
                              warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                              total_steps=p.total_steps)

    def refresh(self, pruner: Pruner) -> None:
        remaining = self.schedule_value(pruner.step_count)
        layers = pruner.selectables
        if remaining >= 1.0:
            for layer in layers:
                layer.set_mask(None)
            return
        if self.scope == "local":
            groups = [[layer] for layer in layers]
        else:  # structured: heads rank against heads, neurons against neurons
            kinds = dict.fromkeys(getattr(layer, "kind", "") for layer in layers)
            groups = [[layer for layer in layers if getattr(layer, "kind", "") == kind]
                      for kind in kinds]
        if pruner.thresholds:
            self._refresh_sharded(pruner, remaining, groups)
        elif pruner.sync_free(layers[0].weight):
            self._refresh_on_device(remaining, groups)
        else:
            self._refresh_on_host(pruner, remaining, groups)

    def _refresh_on_host(self, pruner: Pruner, remaining: float,
                         groups: list[list[PrunedLayer]]) -> None:
        """CPU: the sampled-bracket selection, warm-started from the last threshold."""
        for group in groups:
            key = group[0].name if len(group) == 1 else "*"
            k = topv_count(remaining, sum(layer.numel for layer in group))
            masks, _, pruner.selection_hints[key] = topv_masks(
                [self.importance(layer) for layer in group], k,
                out=[layer.mask_buffer() for layer in group],
                hint=pruner.selection_hints.get(key))
            for layer, mask in zip(group, masks):
                layer.set_mask(mask)

    def _refresh_on_device(self, remaining: float, groups: list[list[PrunedLayer]]) -> None:
        """Accelerators: device operations only. Local scope stacks the layers of one shape
        as rows of one selection (BERT-base: 3 selections for 72 layers); global scope ranks
        the concatenation of every layer."""
        if self.scope == "global":
            for layers in groups:
                flat = torch.cat([self.importance(layer).reshape(-1) for layer in layers])
                k = topv_count(remaining, flat.numel())
                masks = topv_rows(flat.unsqueeze(0), k).squeeze(0)
                for layer, mask in zip(layers, masks.split([layer.numel for layer in layers])):
                    layer.set_mask(mask.view(layer.shape))
            return
        by_shape: dict[tuple, list[PrunedLayer]] = defaultdict(list)
        for (layer,) in groups:
            w = layer.weight
            by_shape[(tuple(layer.shape), w.dtype, w.device)].append(layer)
        for same in by_shape.values():
            rows = torch.stack([self.importance(layer).reshape(-1) for layer in same])
            masks = topv_rows(rows, topv_count(remaining, rows.shape[1]))
            for layer, mask in zip(same, masks):
                layer.set_mask(mask.view(layer.shape))

    def _refresh_sharded(self, pruner: Pruner, remaining: float,
                         groups: list[list[PrunedLayer]]) -> None:
        """Sharded scores (ZeRO-3, FSDP2): exact thresholds from the shards (radix select);
        each forward rebuilds its layer's mask from the gathered scores."""
        index = {id(layer): i for i, layer in enumerate(pruner.layers)}
        totals = [sum(layer.numel for layer in group) for group in groups]  # over all ranks
        parts = [pruner.local_importance(layer) for layer in pruner.layers]
        thresholds = topv_thresholds(
            parts, [[index[id(layer)] for layer in group] for group in groups],
            [topv_count(remaining, n) for n in totals], pruner.sharding.all_reduce,
            totals=totals,
            sync_free=pruner.sync_free(parts[0]) if parts else None)
        for layer, threshold in zip(pruner.layers, thresholds):
            layer.set_threshold(threshold)


class Magnitude(_TopV):
    """Top-v of |W| (structured: of the units' L2 norms): no scores."""

    name = "magnitude"
    has_scores = False

    def importance(self, selectable: PrunedLayer | UnitGroup) -> Tensor:
        return selectable.magnitudes()


class Movement(_TopV):
    """Hard movement pruning: Top-v of the scores, which learn -dL/dW * W (Eq. 4)."""

    name = "movement"
    straight_through = True


class _Regularized(PruningMethod):
    """A penalty lambda * mean R(S) on the scores, lambda on its own schedule."""

    def penalty_lambda(self, step: int) -> float:
        p = self.policy
        return lambda_at(step, final_lambda=p.final_lambda, schedule=p.lambda_schedule,
                         warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                         total_steps=p.total_steps)



class SoftMovement(_Regularized):
    """Soft movement pruning: mask sigmoid(S) > tau, tau on the cubic schedule."""

    name = "soft_movement"
    straight_through = True
    schedule_name = "threshold"

    def penalty_grad(self, scores: Tensor) -> Tensor:
        return sigmoid_penalty_grad(scores)

    def schedule_value(self, step: int) -> float:
        p = self.policy
        return cubic_schedule(step, initial=p.initial_threshold, final=p.final_threshold,
                              warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                              total_steps=p.total_steps)

    def refresh(self, pruner: Pruner) -> None:
        tau = self.schedule_value(pruner.step_count)
        for layer in pruner.selectables:
            if pruner.thresholds:  # S > logit(tau): a threshold with no ties
                layer.set_threshold(None if tau <= 0.0 else TopVThreshold(
                    torch.tensor(logit(tau)), torch.tensor(0), 0))
            else:
                layer.set_mask(threshold_mask(self.importance(layer), tau,
                                              out=layer.mask_buffer()))


class L0(_Regularized):
    """L0 regularization: a hard-concrete gate per weight, sampled in every training forward;
    min(1, relu((r - l) sigmoid(S) + l)) at evaluation. Holds no mask."""

    name = "l0"
    samples_gates = True

    def penalty_grad(self, scores: Tensor) -> Tensor:
        p = self.policy
        return expected_l0_grad(scores, beta=p.l0_beta, left=p.l0_left, right=p.l0_right)

    def gate(self, layer: PrunedLayer) -> Tensor:
        gate = self.gate_of(self.importance(layer), layer.pruner.gate_floor)
        return gate if layer.layout is None else layer.layout.expand(gate)

    def gates_open(self, step: int) -> bool:
        """Whether the training forwards after ``step`` steps use gates of value 1 while the
        scores learn from the sampled ones (``l0_warmup_gates: open``, in the warm-up)."""
        return self.policy.l0_warmup_gates == "open" and step < self.policy.warmup_steps

    def gate_floor(self, step: int) -> float | None:
        # an open warm-up evaluates the model it trains: every evaluation gate 1 (a log-alpha
        # one above the edge of 1; training forwards take their gates' value 1 directly)
        return self._log_alpha_at(1.0) + 1.0 if self.gates_open(step) else None

    def _log_alpha_at(self, gate: float) -> float:
        """The log-alpha whose evaluation gate is ``gate`` (0: the edge of closed)."""
        p = self.policy
        return logit((gate - p.l0_left) / (p.l0_right - p.l0_left))

    def gate_of(self, scores: Tensor, floor: float | None = None) -> Tensor:
        """The evaluation gate of ``scores`` (any shard of them), held at ``floor`` or above."""
        return l0_eval_gate(floor_scores(scores, floor), left=self.policy.l0_left,
                            right=self.policy.l0_right)

    def sampled_unit_gate(self, layer: PrunedLayer) -> Tensor:
        """Structured L0: a hard-concrete gate per unit, sampled for this forward (each member
        of a group samples its own; all follow the same distribution), spread over the
        weight; differentiable in the scores."""
        p, group, pruner = self.policy, layer.group, layer.pruner
        noise = l0_noise(group.shape, group.weight.device)
        gates_open = pruner.gates_open
        scores = group.scores if gates_open else floored(group.scores, pruner.gate_floor)
        gate = hard_concrete_gate(scores, beta=p.l0_beta, left=p.l0_left,
                                  right=p.l0_right, noise=noise,
                                  through_top=p.l0_straight_through)
        if gates_open:  # 1, with the sampled gate's gradient
            gate = gate + (1.0 - gate).detach()
        mask = group.mask if self.samples_with_mask else None
        if mask is not None:
            gate = gate * mask
        return layer.layout.expand(gate)

    #: Whether the unit group's mask closes gates too (the requested-sparsity mode).
    samples_with_mask: ClassVar[bool] = False


class _ToTarget(_TopV):
    """A requested sparsity for a regularized method (beyond the paper, whose lambda sets it):
    the masks are a global Top-v of the scores on the cubic schedule, so exactly v(t) of the
    weights remain at every refresh, and lambda only shapes the scores."""

    scope = "global"  # type: ignore[assignment]

    def in_cooldown(self, step: int) -> bool:
        """Whether ``step`` is in the cool-down, where the masks are the Top-v at v_f."""
        return step >= self.policy.total_steps - self.policy.cooldown_steps


def _controlled_factor(pruner: Pruner, edge: float, target: float, band: float) -> Tensor:
    """:func:`controlled_lambda_factor` of the fraction of scores above ``edge`` (open gates,
    kept weights), the least over the kinds of unit: heads and neurons (structured) are
    separate Top-vs, each must stay at v(t). Device operations, and one all-reduce when the
    scores are sharded."""
    method = pruner.method
    kinds: dict[str, list] = defaultdict(list)
    for sel in pruner.selectables:
        kinds[getattr(sel, "kind", "")].append(sel)
    sharded = pruner.thresholds
    counts = torch.stack([
        torch.stack([(part > edge).sum(dtype=torch.float32) for part in (
            pruner.local_importance(sel) if sharded else method.importance(sel)
            for sel in sels)]).sum()
        for sels in kinds.values()])
    if sharded:
        pruner.sharding.all_reduce(counts)
    totals = torch.tensor([float(sum(sel.numel for sel in sels)) for sels in kinds.values()],
                          device=counts.device)  # over all ranks
    return controlled_lambda_factor(counts / totals, target, band).min()


class SoftMovementToTarget(_ToTarget, SoftMovement):
    """Soft movement with ``final_remaining``: the threshold on sigmoid(S) moves so that v(t)
    of the weights remain (a global Top-v of S); the sigmoid penalty still pushes S down."""


class L0ToTarget(_ToTarget, L0):
    """L0 with ``final_remaining``: the hard-concrete gates of the weights outside a global
    Top-v of the log-alpha scores are closed, v(t) on the cubic schedule.

    Two additions make the run end at exactly v_f (a fixed lambda alone closed gates the Top-v
    kept: 3.5% remaining at a requested 10%, RESULTS.md):
    - lambda follows the schedule: it is scaled by :func:`controlled_lambda_factor` of the
      fraction of open evaluation gates (per kind of unit, the least), so the penalty stops
      pushing once the open gates are down to v(t), and is off during the warm-up;
    - from the cool-down on, the gates are computed from max(S, floor), the floor being the
      log-alpha of an evaluation gate of ``PROJECTED_GATE``: a Top-v weight whose gate had
      closed reopens slightly, and learns (straight-through). A function of the scores, not
      a change to them, so sharded and mixed-precision optimizers hold nothing to fix."""

    samples_with_mask = True
    #: The controller's band: full lambda from (1 + CONTROL_BAND) x v(t) open gates up.
    CONTROL_BAND: ClassVar[float] = 0.25
    #: The evaluation gate a kept weight is held at in the cool-down (small: the function
    #: barely changes, but the gate is open and its sampled gates pass gradients).
    PROJECTED_GATE: ClassVar[float] = 0.1

    def gate_floor(self, step: int) -> float | None:
        if self.in_cooldown(step):
            return self._log_alpha_at(self.PROJECTED_GATE)
        return L0.gate_floor(self, step)

    def penalty_factor(self, pruner: Pruner) -> Tensor:
        return _controlled_factor(pruner, self._log_alpha_at(0.0),
                                  self.schedule_value(pruner.step_count), self.CONTROL_BAND)

    def gate(self, layer: PrunedLayer) -> Tensor:
        gate = L0.gate(self, layer)
        mask = self.sampling_mask(layer)
        return gate if mask is None else gate * mask

    def sampling_mask(self, layer: PrunedLayer) -> Tensor | None:
        return _TopV.gate(self, layer)


class SoftMovementControlled(_ToTarget, SoftMovement):
    """Soft movement with ``final_remaining`` and ``remaining_control: lambda``: the paper's
    mask sigmoid(S) > tau(t) on zero scores, with three additions so the run ends at exactly
    v_f without calibrating lambda (the paper's mode beat a Top-v of |W|-started scores by 1.8
    points at 10%, RESULTS.md):

    - lambda is scaled by :func:`controlled_lambda_factor` of the fraction the threshold keeps:
      all of it from (1 + CONTROL_BAND) v(t) up, none at or below v(t);
    - the masks also keep the global Top-v at v(t), so no refresh keeps less than the schedule
      (the threshold with the Top-v's weights added: ``S`` above the lower of the two);
    - from the cool-down on the masks are the global Top-v at v_f alone: the exact projection.

    The kept fraction can lag the schedule, never lead it: scores move about ``score_lr`` a
    step, and the threshold logit(0.1) = -2.2 is ~220 steps from zero, so in a short run the
    threshold prunes little and the projection does the rest at once (RESULTS.md).
    """

    #: The controller's band: full lambda from (1 + CONTROL_BAND) x v(t) kept.
    CONTROL_BAND: ClassVar[float] = 0.1

    def threshold_at(self, step: int) -> float:
        """tau(t): the paper's threshold on sigmoid(S), on its cubic schedule."""
        return SoftMovement.schedule_value(self, step)

    def penalty_factor(self, pruner: Pruner) -> Tensor:
        tau = self.threshold_at(pruner.step_count)
        edge = logit(tau) if tau > 0.0 else -math.inf
        return _controlled_factor(pruner, edge, self.schedule_value(pruner.step_count),
                                  self.CONTROL_BAND)

    def refresh(self, pruner: Pruner) -> None:
        _TopV.refresh(self, pruner)  # the Top-v at v(t): a floor under the threshold's masks
        step = pruner.step_count
        tau = self.threshold_at(step)
        if self.in_cooldown(step) or tau <= 0.0:
            return
        if not pruner.thresholds:
            for sel in pruner.selectables:
                if sel.mask is not None:
                    sel.mask.logical_or_(threshold_mask(self.importance(sel), tau))
            return
        edge = logit(tau)
        for layer in pruner.layers:  # sharded: keep S above the lower of the two thresholds
            t = layer.threshold
            if t is not None:
                lower = t.value > edge
                layer.set_threshold(TopVThreshold(
                    torch.where(lower, torch.tensor(edge, dtype=t.value.dtype,
                                                    device=t.value.device), t.value),
                    torch.where(lower, torch.zeros_like(t.ties_kept), t.ties_kept), t.k))


METHODS: dict[str, type[PruningMethod]] = {
    cls.name: cls for cls in (Magnitude, Movement, SoftMovement, L0)}
TO_TARGET: dict[str, type[PruningMethod]] = {"soft_movement": SoftMovementToTarget,
                                             "l0": L0ToTarget}


def method_for(policy: PruningPolicy) -> PruningMethod:
    """The strategy object of ``policy.method`` (and of its requested-sparsity mode)."""
    if policy.targets_remaining:
        if policy.method == "soft_movement" and policy.remaining_control == "lambda":
            return SoftMovementControlled(policy)
        return TO_TARGET[policy.method](policy)
    return METHODS[policy.method](policy)
