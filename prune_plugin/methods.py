"""A pruning method, composed from parts: no method name is tested outside this file.

    Method = scores (how they start; none for magnitude)
           + a selector (which weights the masks keep at each step; none for the paper's L0)
           + a gate (what the forward multiplies W by, and what counts as kept)
           + a penalty (a regularizer on the scores with its lambda schedule; or none)

    method           selector               gate                    penalty
    magnitude        TopV(|W|)              MaskGate                -
    movement         TopV(S)                MaskGate(straight)      -
    soft_movement    Threshold(sigmoid(S))  MaskGate(straight)      Penalty(sigmoid)
      at v_f, topv   TopV(S, global)        MaskGate(straight)      Penalty(sigmoid)
      at v_f, lambda ThresholdOverTopV      MaskGate(straight)      Penalty(sigmoid, Controller)
    l0               -                      HardConcreteGate        Penalty(expected L0)
      at v_f         TopV(S, global)        HardConcreteGate(mask)  Penalty(expected L0, Controller)

(every method but magnitude learns scores S; "at v_f": with a requested ``final_remaining``,
beyond the paper; "straight": straight-through, the scores get dL/dW' * W, Eq. 2).

The schedules (Eq. 5 for v and tau, lambda's) are functions of the step built from the policy.
The parts are stateless: a selector writes masks (or thresholds) to the layers
(:class:`~prune_plugin.hooks.PrunedLayer`) or unit groups it is given; the step count is the
pruner's. A gate's per-step values (:class:`GatePhase`) reach the forwards through the layers'
shared :class:`~prune_plugin.hooks.StepState`.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prune_plugin.distributed import Sharding, whole_tensor
from prune_plugin.masks import (add_sigmoid_slope_, effective_weight, floor_scores, floored,
                                hard_concrete_gate, l0_eval_gate, l0_linear, l0_noise, l0_shift,
                                logit, threshold_mask)
from prune_plugin.policy import (L0Policy, MagnitudePolicy, MovementPolicy, PruningPolicy,
                                 SoftMovementPolicy)
from prune_plugin.schedule import controlled_lambda_factor, cubic_schedule, lambda_at
from prune_plugin.selection import (SelectionHint, TopVThreshold, topv_count, topv_masks,
                                    topv_rows, topv_thresholds)

if TYPE_CHECKING:
    from prune_plugin.hooks import PrunedLayer

Selectable = Any  # a PrunedLayer, or (structured) a UnitGroup: what a mask is chosen for
Schedule = Callable[[int], float]  # a value after `step` optimizer steps


def importance(selectable: Selectable) -> Tensor:
    """What masks rank or threshold: the scores (whole: FSDP2's shards of a unit group's few
    scores are gathered), or |W| (structured: unit norms) where nothing learns scores."""
    if selectable.scores is not None:
        return whole_tensor(selectable.scores)
    return selectable.magnitudes()


def _joined_importance(sels: list[Selectable], *, as_rows: bool) -> Tensor:
    """The importance of ``sels`` joined for one selection: stacked as rows (same shapes) or
    concatenated. |W| is taken once over the joined weights, not layer by layer."""
    if all(sel.scores is None and sel.ranks_abs_weight for sel in sels):
        weights = [sel.weight.detach().reshape(-1) for sel in sels]
        return (torch.stack(weights) if as_rows else torch.cat(weights)).abs_()
    parts = [importance(sel).reshape(-1) for sel in sels]
    return torch.stack(parts) if as_rows else torch.cat(parts)


def _joint_mask_buffer(sels: list[Selectable]) -> Tensor:
    """One flat bool tensor holding the mask buffers of ``sels`` end to end, so one selection
    over their joined importance writes every mask in place (a copy per layer otherwise): the
    one the selectables already hold, else a new one handed to them."""
    buffers = [sel.mask_buffer() for sel in sels]
    offsets = list(itertools.accumulate((b.numel() for b in buffers), initial=0))
    joint = buffers[0]._base
    if joint is not None and joint.dim() == 1 and joint.numel() == offsets[-1] and all(
            b._base is joint and b.storage_offset() == at for b, at in zip(buffers, offsets)):
        return joint
    joint = torch.empty(offsets[-1], dtype=torch.bool, device=buffers[0].device)
    for sel, buffer, at in zip(sels, buffers, offsets):
        sel.use_mask_buffer(joint[at:at + buffer.numel()].view(buffer.shape))
    return joint


@dataclass
class Candidates:
    """What one refresh chooses masks among, built by the pruner for it."""

    #: What masks are chosen for: the layers, or (structured) the unit groups.
    selectables: list[Selectable]
    #: Every pruned layer (under sharded scores, thresholds are set on these).
    layers: list[PrunedLayer]
    #: How the scores lie across ranks.
    sharding: Sharding
    #: Whether masks are thresholds agreed across ranks, rebuilt in each forward.
    sharded: bool
    #: Whether selection avoids every read back to the host, for tensors like this one.
    sync_free: Callable[[Tensor], bool]
    #: CPU warm starts of the Top-v selection, kept across refreshes.
    hints: dict[str, SelectionHint | None] = field(default_factory=dict)

    def local_importance(self, layer: PrunedLayer) -> Tensor:
        """This rank's real elements of what the layer's masks rank: its scores, or |W|."""
        if layer.scores is not None:
            return self.sharding.local(layer.scores)
        return self.sharding.local(layer.weight).abs()

    def by_kind(self) -> list[list[Selectable]]:
        """The selectables by unit kind (structured: heads rank against heads, neurons
        against neurons); one list when unstructured."""
        kinds: dict[str, list[Selectable]] = defaultdict(list)
        for sel in self.selectables:
            kinds[getattr(sel, "kind", "")].append(sel)
        return list(kinds.values())


# -- scores -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoreInit:
    """How the scores start (``score_init``, ``score_init_value``, ``score_init_offset``)."""

    kind: str
    value: float
    offset: float = 0.0

    def __call__(self, selectable: Selectable) -> Tensor:
        """The scores of a layer (one per weight) or of a unit group (one per unit)."""
        like = selectable.magnitudes().detach()
        if self.kind == "constant":
            scores = torch.full_like(like, self.value)
        elif self.kind == "uniform":
            scores = torch.empty_like(like).uniform_(-self.value, self.value)
        elif self.kind == "kaiming":
            scores = torch.empty_like(like)
            # the fan-in of the Linear's [out, in]: Conv1D stores [in, out]
            nn.init.kaiming_uniform_(scores.t() if getattr(selectable, "transposed", False)
                                     else scores, a=math.sqrt(5))
        else:
            # magnitude: |W| (or unit norms) normalised per layer, so that one scale fits every
            # layer and model (a layer's |W| is ~1e-2 while score updates are ~score_lr a step)
            scores = like.div_(like.mean().clamp_min(1e-12)).mul_(self.value)
        return scores.add_(self.offset)


# -- selectors: which weights the masks keep ----------------------------------------------------

class Selector(Protocol):
    #: What ``schedule`` is, as a name for logs.
    schedule_name: str

    def schedule(self, step: int) -> float:
        """What the schedule asks for after ``step`` steps."""

    def refresh(self, candidates: Candidates, step: int) -> None:
        """Set every candidate's mask (or threshold) for the forwards after ``step`` steps."""


@dataclass(frozen=True)
class TopV:
    """The Top-v of the importance (Eq. 1), v on the cubic schedule (Eq. 5); per layer (local)
    or across layers (global; structured: across the groups of one unit kind)."""

    remaining: Schedule
    scope: str
    schedule_name: str = "remaining_target"

    def schedule(self, step: int) -> float:
        return self.remaining(step)

    def refresh(self, candidates: Candidates, step: int) -> None:
        remaining = self.remaining(step)
        selectables = candidates.selectables
        if remaining >= 1.0:
            for sel in selectables:
                sel.set_mask(None)
            return
        groups = [[sel] for sel in selectables] if self.scope == "local" \
            else candidates.by_kind()
        if candidates.sharded:
            self._refresh_sharded(candidates, remaining, groups)
        elif candidates.sync_free(selectables[0].weight):
            self._refresh_on_device(remaining, groups)
        else:
            self._refresh_on_host(candidates, remaining, groups)

    @staticmethod
    def _refresh_on_host(candidates: Candidates, remaining: float,
                         groups: list[list[Selectable]]) -> None:
        """CPU: the sampled-bracket selection, warm-started from the last threshold."""
        hints = candidates.hints
        for group in groups:
            key = group[0].name if len(group) == 1 else "*"
            k = topv_count(remaining, sum(sel.numel for sel in group))
            masks, _, hints[key] = topv_masks(
                [importance(sel) for sel in group], k,
                out=[sel.mask_buffer() for sel in group], hint=hints.get(key))
            for sel, mask in zip(group, masks):
                sel.set_mask(mask)

    def _refresh_on_device(self, remaining: float, groups: list[list[Selectable]]) -> None:
        """Accelerators: device operations only. Local scope stacks the layers of one shape
        as rows of one selection (BERT-base: 3 selections for 72 layers); global scope ranks
        the concatenation of every layer."""
        if self.scope == "global":
            for sels in groups:
                flat = _joined_importance(sels, as_rows=False)
                topv_rows(flat.unsqueeze(0), topv_count(remaining, flat.numel()),
                          out=_joint_mask_buffer(sels).unsqueeze(0))
                for sel in sels:
                    sel.set_mask(sel.mask_buffer())  # written in place: no copy
            return
        by_shape: dict[tuple, list[Selectable]] = defaultdict(list)
        for (sel,) in groups:
            w = sel.weight
            by_shape[(tuple(sel.shape), w.dtype, w.device)].append(sel)
        for same in by_shape.values():
            rows = _joined_importance(same, as_rows=True)
            topv_rows(rows, topv_count(remaining, rows.shape[1]),
                      out=_joint_mask_buffer(same).view(rows.shape))
            for sel in same:
                sel.set_mask(sel.mask_buffer())

    @staticmethod
    def _refresh_sharded(candidates: Candidates, remaining: float,
                         groups: list[list[Selectable]]) -> None:
        """Sharded scores (ZeRO-3, FSDP2): exact thresholds from the shards (radix select);
        each forward rebuilds its layer's mask from the gathered scores."""
        layers = candidates.layers
        index = {id(layer): i for i, layer in enumerate(layers)}
        totals = [sum(layer.numel for layer in group) for group in groups]  # over all ranks
        parts = [candidates.local_importance(layer) for layer in layers]
        thresholds = topv_thresholds(
            parts, [[index[id(layer)] for layer in group] for group in groups],
            [topv_count(remaining, n) for n in totals], candidates.sharding.all_reduce,
            totals=totals, sync_free=candidates.sync_free(parts[0]) if parts else None)
        for layer, threshold in zip(layers, thresholds):
            layer.set_threshold(threshold)


@dataclass(frozen=True)
class Threshold:
    """Soft movement's mask sigmoid(S) > tau, tau on the cubic schedule."""

    tau: Schedule
    schedule_name: str = "threshold"

    def schedule(self, step: int) -> float:
        return self.tau(step)

    def refresh(self, candidates: Candidates, step: int) -> None:
        tau = self.tau(step)
        for sel in candidates.selectables:
            if candidates.sharded:  # S > logit(tau): a threshold with no ties, made on the
                device = sel.weight.device  # scores' device by fills (no host copy)
                sel.set_threshold(None if tau <= 0.0 else TopVThreshold(
                    torch.full((), logit(tau), device=device),
                    torch.zeros((), dtype=torch.int64, device=device), 0))
            else:
                sel.set_mask(threshold_mask(importance(sel), tau, out=sel.mask_buffer()))


@dataclass(frozen=True)
class ThresholdOverTopV:
    """The threshold's mask with the global Top-v at v(t) added (S above the lower of the two),
    so no refresh keeps less than the schedule; from the cool-down on the Top-v at v_f alone,
    the exact projection. Soft movement at a requested fraction, ``remaining_control:
    lambda``."""

    threshold: Threshold
    topv: TopV
    cooldown_from: int
    schedule_name: str = "remaining_target"

    def schedule(self, step: int) -> float:
        return self.topv.schedule(step)

    def refresh(self, candidates: Candidates, step: int) -> None:
        self.topv.refresh(candidates, step)  # the Top-v at v(t): a floor under the threshold
        tau = self.threshold.tau(step)
        if step >= self.cooldown_from or tau <= 0.0:
            return
        if not candidates.sharded:
            for sel in candidates.selectables:
                if sel.mask is not None:
                    sel.mask.logical_or_(threshold_mask(importance(sel), tau))
            return
        edge = logit(tau)
        for layer in candidates.layers:  # sharded: keep S above the lower of the thresholds
            t = layer.threshold
            if t is not None:
                lower = t.value > edge
                layer.set_threshold(TopVThreshold(
                    torch.where(lower, torch.full_like(t.value, edge), t.value),
                    torch.where(lower, torch.zeros_like(t.ties_kept), t.ties_kept), t.k))


# -- gates: what the forward multiplies W by --------------------------------------------------

@dataclass(frozen=True)
class GatePhase:
    """A gate's values for the forwards of one step. They change only at the schedule's phase
    boundaries, so ``torch.compile`` guards on them and recompiles once a phase (reading the
    step itself recompiled every step)."""

    #: Training forwards use gates of value 1 (L0's open warm-up).
    open: bool = False
    #: A floor under the log-alpha of the gates in use (L0), or None.
    floor: float | None = None


CLOSED_PHASE = GatePhase()


@dataclass(frozen=True)
class MaskGate:
    """W * M with the layer's mask; ``straight_through``: the scores get dL/dW' * W (Eq. 2)."""

    straight_through: bool = False

    def phase(self, step: int) -> GatePhase:
        return CLOSED_PHASE

    def forward(self, layer: PrunedLayer, input: Tensor, phase: GatePhase) -> Tensor:
        return layer.masked_forward(input, straight_through=self.straight_through)

    def eval_gate(self, layer: PrunedLayer, phase: GatePhase) -> Tensor | None:
        """The deterministic multiplier of W (evaluation, finalize): the mask, or None."""
        return layer.current_mask()

    def open_where(self, importance: Tensor, phase: GatePhase) -> Tensor | None:
        """Where a weight kept by the mask is also open (None: everywhere)."""
        return None


@dataclass(frozen=True)
class HardConcreteGate:
    """L0's hard-concrete gate: sampled in every training forward, min(1, relu((r - l)
    sigmoid(S) + l)) at evaluation. ``masked`` (a requested fraction): the selector's mask
    closes the gates outside it, and from ``projected_from`` on the gates in use are computed
    from max(S, floor), the floor being the log-alpha of an evaluation gate of
    ``PROJECTED_GATE``: a kept weight whose gate had closed reopens slightly, and learns. A
    function of the scores, not a change to them, so sharded and mixed-precision optimizers
    hold nothing to fix."""

    beta: float
    left: float
    right: float
    through_top: bool  # the score gradient passes the clamp at 1 (straight_through)
    open_until: int = 0  # l0_warmup_gates open: training gates are 1 before this step
    masked: bool = False
    projected_from: int | None = None

    #: The evaluation gate a kept weight is held at in the cool-down (small: the function
    #: barely changes, but the gate is open and its sampled gates pass gradients).
    PROJECTED_GATE = 0.1

    def log_alpha_at(self, gate: float) -> float:
        """The log-alpha whose evaluation gate is ``gate`` (0: the edge of closed)."""
        return logit((gate - self.left) / (self.right - self.left))

    def phase(self, step: int) -> GatePhase:
        gates_open = step < self.open_until
        if self.projected_from is not None and step >= self.projected_from:
            return GatePhase(gates_open, self.log_alpha_at(self.PROJECTED_GATE))
        # an open warm-up evaluates the model it trains: every evaluation gate 1 (a log-alpha
        # one above the edge of 1; training forwards take their gates' value 1 directly)
        return GatePhase(gates_open, self.log_alpha_at(1.0) + 1.0 if gates_open else None)

    def of(self, scores: Tensor, floor: float | None) -> Tensor:
        """The evaluation gate of ``scores`` (any shard of them), held at ``floor`` or above."""
        return l0_eval_gate(floor_scores(scores, floor), left=self.left, right=self.right)

    def eval_gate(self, layer: PrunedLayer, phase: GatePhase) -> Tensor:
        gate = self.of(importance(layer), phase.floor)
        if layer.layout is not None:
            gate = layer.layout.expand(gate)
        mask = layer.current_mask() if self.masked else None
        return gate if mask is None else gate * mask

    def open_where(self, importance: Tensor, phase: GatePhase) -> Tensor:
        return self.of(importance, phase.floor) > 0

    def forward(self, layer: PrunedLayer, input: Tensor, phase: GatePhase) -> Tensor:
        if not layer.module.training:  # evaluation: the deterministic gate
            return layer.masked_forward(input, straight_through=False)
        lin = layer.as_linear  # Conv1D stores W^T: weight-shaped tensors as the Linear's
        bias = layer.bias
        if layer.group is not None:  # structured: one gate per unit
            return F.linear(input, lin(effective_weight(layer.weight,
                                                        self._sampled_unit_gate(layer, phase))),
                            bias)
        weight = lin(layer.weight)
        noise = l0_noise(weight.shape, weight.device)
        mask = lin(layer.current_mask() if self.masked else None)
        floor = None if phase.open else phase.floor
        if torch.is_grad_enabled():
            return l0_linear(input, weight, bias, lin(layer.scores), noise, beta=self.beta,
                             left=self.left, right=self.right, mask=mask, floor=floor,
                             through_top=self.through_top, open_gates=phase.open)
        if phase.open:
            return F.linear(input, effective_weight(weight, mask), bias)
        scores = layer.scores
        assert scores is not None  # L0 always has scores
        gate = hard_concrete_gate(floor_scores(lin(scores.detach()), floor),
                                  beta=self.beta, left=self.left, right=self.right, noise=noise)
        return F.linear(input, effective_weight(effective_weight(weight, gate), mask), bias)

    def _sampled_unit_gate(self, layer: PrunedLayer, phase: GatePhase) -> Tensor:
        """A hard-concrete gate per unit, sampled for this forward (each member of a group
        samples its own; all follow the same distribution), spread over the weight;
        differentiable in the scores."""
        group, layout = layer.group, layer.layout
        assert group is not None and layout is not None and group.scores is not None
        noise = l0_noise(group.shape, group.weight.device)
        scores = group.scores if phase.open else floored(group.scores, phase.floor)
        gate = hard_concrete_gate(scores, beta=self.beta, left=self.left, right=self.right,
                                  noise=noise, through_top=self.through_top)
        if phase.open:  # 1, with the sampled gate's gradient
            gate = gate + (1.0 - gate).detach()
        if self.masked and group.mask is not None:
            gate = gate * group.mask
        return layout.expand(gate)


Gate = MaskGate | HardConcreteGate


# -- penalties --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Controller:
    """Scales lambda by :func:`~prune_plugin.schedule.controlled_lambda_factor` of the fraction
    of scores above ``edge(step)`` (open gates, kept weights), the least over the kinds of
    unit: all of it from (1 + band) x v(t) up, none at or below v(t)."""

    edge: Schedule
    target: Schedule
    band: float

    def factor(self, candidates: Candidates, step: int) -> Tensor:
        """Device operations, and one all-reduce when the scores are sharded."""
        edge, kinds = self.edge(step), candidates.by_kind()
        sharded = candidates.sharded
        counts = torch.stack([
            torch.stack([(part > edge).sum(dtype=torch.float32) for part in (
                candidates.local_importance(sel) if sharded else importance(sel)
                for sel in sels)]).sum()
            for sels in kinds])
        if sharded:
            candidates.sharding.all_reduce(counts)
        totals = torch.tensor([float(sum(sel.numel for sel in sels)) for sels in kinds],
                              device=counts.device)  # over all ranks
        return controlled_lambda_factor(counts / totals, self.target(step), self.band).min()


@dataclass(frozen=True)
class Penalty:
    """lambda(t) * mean R(S) on the scores, R(S) = sum sigmoid(S - ``shift``) (soft movement:
    0; L0: its gates' logit shift); a ``controller`` scales lambda by what it measures."""

    shift: float
    lam: Schedule
    controller: Controller | None = None

    def add_grads(self, grads: list[Tensor], scores: list[Tensor], scale: Tensor,
                  factor: Tensor | None) -> None:
        """``grads += scale * factor * dR/dS`` in place, one pass per score tensor."""
        for grad, s in zip(grads, scores):
            add_sigmoid_slope_(grad, s, scale, factor, self.shift)


# -- methods ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A policy's method, from its parts."""

    name: str
    scores: ScoreInit | None
    selector: TopV | Threshold | ThresholdOverTopV | None
    gate: Gate
    penalty: Penalty | None = None

    def __repr__(self) -> str:
        parts = [type(p).__name__ for p in (self.scores, self.selector, self.gate, self.penalty)
                 if p is not None]
        return f"Method({self.name!r}: {' + '.join(parts)})"

    @property
    def has_scores(self) -> bool:
        """Whether the method learns a score Parameter per weight (or unit)."""
        return self.scores is not None

    @property
    def schedule_name(self) -> str | None:
        """What :meth:`schedule_value` is, as a name for logs (None: no schedule)."""
        return None if self.selector is None else self.selector.schedule_name

    def schedule_value(self, step: int) -> float | None:
        """What the schedule asks for after ``step`` steps: the remaining fraction (Top-v) or
        tau (soft movement); None without a selector."""
        return None if self.selector is None else self.selector.schedule(step)

    def refresh(self, candidates: Candidates, step: int) -> None:
        """Recompute the masks for the forwards after ``step`` steps."""
        if self.selector is not None:
            self.selector.refresh(candidates, step)

    def penalty_lambda(self, step: int) -> float:
        """lambda of the regularizer after ``step`` steps (0 without one)."""
        return 0.0 if self.penalty is None else self.penalty.lam(step)

    def penalty_factor(self, candidates: Candidates, step: int) -> Tensor | None:
        """A multiplier of the scheduled lambda measured from the current scores (a 0-dim
        tensor on their device), or None: lambda as scheduled."""
        controller = None if self.penalty is None else self.penalty.controller
        return None if controller is None else controller.factor(candidates, step)


def method_for(policy: PruningPolicy) -> Method:
    """The method of ``policy``, composed from its parts."""
    p = policy
    window = dict(warmup_steps=p.warmup_steps, cooldown_steps=p.cooldown_steps,
                  total_steps=p.total_steps)
    cooldown_from = p.total_steps - p.cooldown_steps

    def cubic(initial: float, final: float) -> Schedule:
        return partial(cubic_schedule, initial=initial, final=final, **window)

    scores = None if isinstance(p, MagnitudePolicy) else \
        ScoreInit(p.score_init, p.score_init_value, p.score_init_offset)  # type: ignore[attr-defined]
    if isinstance(p, (MagnitudePolicy, MovementPolicy)):
        return Method(p.method, scores, TopV(cubic(p.initial_remaining, p.final_remaining),
                                             p.scope),
                      MaskGate(straight_through=isinstance(p, MovementPolicy)))
    if not isinstance(p, (SoftMovementPolicy, L0Policy)):  # pragma: no cover
        raise TypeError(f"no method for {type(policy).__name__}")
    lam = partial(lambda_at, final_lambda=p.final_lambda, schedule=p.lambda_schedule, **window)
    remaining = None  # v(t), where a final_remaining is requested (beyond the paper)
    if p.targets_remaining:
        assert p.initial_remaining is not None and p.final_remaining is not None
        remaining = cubic(p.initial_remaining, p.final_remaining)
    if isinstance(p, SoftMovementPolicy):
        shift = 0.0
        if remaining is not None and p.remaining_control == "topv":
            return Method(p.method, scores, TopV(remaining, "global"),
                          MaskGate(straight_through=True), Penalty(shift, lam))
        assert p.initial_threshold is not None and p.final_threshold is not None  # unless topv
        threshold = Threshold(cubic(p.initial_threshold, p.final_threshold))
        if remaining is None:
            return Method(p.method, scores, threshold, MaskGate(straight_through=True),
                          Penalty(shift, lam))
        controller = Controller(partial(_logit_or_minus_inf, threshold.tau), remaining,
                                band=0.1)
        return Method(p.method, scores,
                      ThresholdOverTopV(threshold, TopV(remaining, "global"), cooldown_from),
                      MaskGate(straight_through=True), Penalty(shift, lam, controller))
    requested = remaining is not None  # L0
    gate = HardConcreteGate(p.l0_beta, p.l0_left, p.l0_right, p.l0_straight_through,
                            open_until=p.warmup_steps if p.l0_warmup_gates == "open" else 0,
                            masked=requested, projected_from=cooldown_from if requested else None)
    shift = l0_shift(beta=p.l0_beta, left=p.l0_left, right=p.l0_right)
    if remaining is None:
        return Method(p.method, scores, None, gate, Penalty(shift, lam))
    # lambda follows the schedule: a fixed lambda alone closed gates the Top-v kept (3.5%
    # remaining at a requested 10%, RESULTS.md); off once the open gates are down to v(t)
    controller = Controller(partial(_constant, gate.log_alpha_at(0.0)), remaining, band=0.25)
    return Method(p.method, scores, TopV(remaining, "global"), gate,
                  Penalty(shift, lam, controller))


def _constant(value: float, step: int) -> float:
    return value


def _logit_or_minus_inf(tau: Schedule, step: int) -> float:
    t = tau(step)
    return logit(t) if t > 0.0 else -math.inf
