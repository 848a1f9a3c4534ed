"""`Pruner`: the one owner of a pruning run.

A pruner holds the model's pruned layers, the step count, the schedule and the masks, and
its state. Whatever trains the model only tells it that a real optimizer step happened
(:meth:`Pruner.step`): :class:`~prune_plugin.optimizer.PruningOptimizer` in a plain loop, the
DeepSpeed engine's schedule slot, or the Trainer. Per-method behaviour is a strategy object
(:mod:`prune_plugin.methods`), hooks are installed and removed by :mod:`prune_plugin.hooks`.

    pruner = attach(model, policy)      # scores, forwards and masks on the targeted Linears
    ...                                  # each optimizer step: pruner.step()
    finalize(model)                      # W * M baked in: a plain model

The pruner lives on the model (``get_pruner`` finds it through wrappers such as
``torch.compile``, DDP or PEFT), so ``copy.deepcopy(model)`` copies it too, and its step and
masks are part of ``model.state_dict()`` (keys ``pruning_step`` and ``<module>.pruning_mask``,
beside the ``<module>.pruning_scores`` Parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn

from prune_plugin.distributed import (RANKS_DISAGREE, WHOLE, ScoreGradAverager, Sharding,
                                     ddp_averages, dtensor_sharding, gathered, is_dtensor,
                                     ranks_disagree, refuse_unsupported_engines, unwrap_ddp,
                                     whole_tensor)
from prune_plugin.errors import AttachError, NumericalError, StateError
from prune_plugin.hooks import MASK_KEY, SCORES_NAME, PrunedLayer, StepState, layer_of
from prune_plugin.masks import effective_weight
from prune_plugin.methods import Candidates, Method, importance, method_for
from prune_plugin.policy import PruningPolicy
from prune_plugin.selection import SelectionHint, use_device_path
from prune_plugin.structure import UnitGroup, find_unit_groups, record_shapes, shrink_groups
from prune_plugin.targeting import find_targets

#: Attribute of the attached root module that holds its Pruner.
PRUNER_ATTR = "_prune_plugin_pruner"
#: State-dict key (after the root's prefix) of the step count.
STEP_KEY = "pruning_step"
STATE_FORMAT_VERSION = 1


class Pruner:
    """A pruning run on one model: its layers, step count, schedule, masks and state."""

    #: None: the sync-free device path on accelerators, the sampled bracket on the CPU;
    #: True/False force one (tests prove the device path on CPU tensors).
    device_path: bool | None = None

    def __init__(self, model: nn.Module, policy: PruningPolicy, *,
                 score_factory: Callable[[PrunedLayer], Tensor] | None = None,
                 sharding: Sharding | None = None) -> None:
        """Attach ``policy`` to ``model``: scores, forwards and masks on every targeted
        Linear, and the run's state-dict hooks on the model.

        All or nothing: on any error the model is left exactly as it was. A model wrapped in
        ``DistributedDataParallel`` is attached inside the wrapper (the same names as one
        process); FSDP2-sharded weights get scores sharded like them. Integrations whose
        weights are sharded otherwise (ZeRO-3) pass ``score_factory`` (builds one layer's
        scores) and ``sharding``."""
        if not isinstance(policy, PruningPolicy):
            raise TypeError(f"policy must be a PruningPolicy, got {type(policy).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        refuse_unsupported_engines(model)
        model, ddp = unwrap_ddp(model)
        targets = find_targets(model, policy)
        _check_attachable(model, targets)
        self.model = model
        self.policy = policy
        self.method: Method = method_for(policy)
        #: What the layers' forwards read (the layers hold this, not the pruner).
        self.state = StepState(self.method, self.method.gate.phase(0))
        #: The PruningOptimizer stepping this run (a weakref): one at most.
        self.driver: Callable[[], Any] | None = None
        self.step_count = 0  # (sets the gate phase too)
        self._sharding: Sharding | None = sharding  # an engine's (ZeRO-3); else found (FSDP2)
        self._grad_sync: ScoreGradAverager | None = None  # DDP built before attaching
        self.closed = False
        self.selection_hints: dict[str, SelectionHint | None] = {}  # CPU warm starts
        self._loading: tuple[int | None, list[str]] | None = None
        self._on_detach: list[Callable[[], None]] = []
        self._handles: list[Any] = []
        self._pending_check: tuple[Tensor, Any, int] | None = None  # (host flags, event, step)
        self.layers = [PrunedLayer(name, m, self.state) for name, m in targets]
        #: Structured pruning: the unit groups (heads, neurons, blocks) the layers belong to.
        self.units: list[UnitGroup] = []
        if policy.structure != "unstructured":
            self.units = find_unit_groups(model, policy, targets, self.named_layers())
            for group in self.units:
                for member in group.members:
                    member.layer.group, member.layer.layout = group, member.layout
            self.layers = [layer for layer in self.layers if layer.group is not None]
        try:
            self._install(score_factory, ddp)
        except BaseException:
            self.detach()
            raise

    def _install(self, score_factory: Callable[[PrunedLayer], Tensor] | None,
                 ddp: Any) -> None:
        make = cast(Callable[[Any], Tensor], score_factory or self.method.scores)
        if score_factory is None and self.thresholds:  # FSDP2 sharded before attaching
            make = partial(_sharded_scores, self)  # (unit scores: a few, whole on every rank)
        for layer in self.layers:
            owns = self.method.has_scores and layer.is_owner
            layer.install(make(layer.group or layer) if owns else None)
        model = self.model
        self._handles = [  # partial(): torch sets an attribute on the hooks, methods refuse
            model.register_state_dict_post_hook(partial(self._save_step)),
            model.register_load_state_dict_pre_hook(partial(self._start_loading)),
            model.register_load_state_dict_post_hook(partial(self._finish_loading))]
        model.__dict__[PRUNER_ATTR] = self
        anchor = _anchor(model, [layer.name for layer in self.layers])
        if anchor is not model:  # also found from what holds every pruned layer
            anchor.__dict__[PRUNER_ATTR] = self
        if ddp is not None:
            self.follow_ddp(ddp)
        elif self.scores and (groups := self.sharding.averaging_groups(self.scores[0])):
            self._average_score_grads(groups)  # FSDP2 does not know unit scores added later
        self.refresh()

    def __repr__(self) -> str:
        return (f"Pruner(method={self.policy.method!r}, step={self.step_count}, "
                f"layers={len(self.layers)})")

    # -- what it holds ------------------------------------------------------------------------

    @property
    def step_count(self) -> int:
        """Completed optimizer steps; the masks in use are those for this step."""
        return self._step_count

    @step_count.setter
    def step_count(self, step: int) -> None:
        self._step_count = step
        # The gate's phase for the forwards: replaced only when it changes, at the schedule's
        # phase boundaries (torch.compile guards on it: once a phase, not every step)
        phase = self.method.gate.phase(step)
        if phase != self.state.phase:
            self.state.phase = phase

    @property
    def generation(self) -> int:
        """Bumped whenever masks change (invalidates the layers' cached W * M)."""
        return self.state.generation

    def _masks_changed(self) -> None:
        self.state.generation += 1

    def candidates(self) -> Candidates:
        """What a refresh (or the penalty's controller) chooses among."""
        return Candidates(self.selectables, self.layers, self.sharding, self.thresholds,
                          self.sync_free, self.selection_hints)

    @property
    def scores(self) -> list[nn.Parameter]:
        return [sel.scores for sel in self.selectables if sel.scores is not None]

    @property
    def selectables(self) -> list[Any]:
        """What masks are chosen for: the layers, or (structured) the unit groups."""
        return self.units if self.units else self.layers

    @property
    def sharding(self) -> Sharding:
        """How the scores lie across ranks: the engine's (:meth:`use_sharding`), FSDP2's once
        the weights are DTensors (``fully_shard`` before or after attaching), else whole."""
        if self._sharding is None and self.layers and is_dtensor(self.layers[0].weight):
            sharding = dtensor_sharding(self.layers)
            assert sharding is not None  # a weight is a DTensor
            self.use_sharding(sharding)
        return WHOLE if self._sharding is None else self._sharding

    @property
    def thresholds(self) -> bool:
        """Whether masks are thresholds agreed across ranks, rebuilt in each forward (sharded
        scores, one per weight); structured pruning's few unit scores are selected whole."""
        return self.sharding.shards and not self.units

    def use_sharding(self, sharding: Sharding) -> None:
        """An engine shards the scores (ZeRO-3): masks become thresholds agreed across ranks."""
        self._sharding = sharding

    def follow_ddp(self, ddp: Any) -> None:
        """DDP wraps the model: if it was built before the scores existed, average their
        gradients here."""
        if self.scores and not ddp_averages(ddp, self.scores):
            self._average_score_grads([ddp.process_group],
                                      lambda: ddp.require_backward_grad_sync)

    def _average_score_grads(self, groups: list[Any],
                             syncs: Callable[[], bool] = lambda: True) -> None:
        """Average the scores' gradients over ``groups`` (no engine knows the scores):
        :class:`~prune_plugin.distributed.ScoreGradAverager`."""
        if self._grad_sync is None:
            self._grad_sync = ScoreGradAverager(groups, self.scores, syncs)

    def named_layers(self) -> dict[str, PrunedLayer]:
        return {layer.name: layer for layer in self.layers}

    def sync_free(self, like: Tensor) -> bool:
        """Whether mask refreshes avoid every read back to the host (see ``device_path``)."""
        return use_device_path(like) if self.device_path is None else self.device_path

    @property
    def target(self) -> float | None:
        """What the schedule asks for now: remaining fraction (Top-v) or tau (soft movement)."""
        return self.method.schedule_value(self.step_count)

    @property
    def penalty_lambda(self) -> float:
        """lambda as applied now (a requested-sparsity L0 run scales it by what it measures:
        reading that factor reads back from the device, and under ZeRO-3 is a collective)."""
        lam = self.method.penalty_lambda(self.step_count)
        if lam == 0.0 or not self.selectables:
            return lam
        with torch.no_grad():
            factor = self.method.penalty_factor(self.candidates(), self.step_count)
        return lam if factor is None else lam * float(factor)

    # -- training -------------------------------------------------------------------------------

    def step(self) -> None:
        """One optimizer step was applied: advance the schedule and refresh the masks when due."""
        if self.closed:
            raise AttachError("this pruner was detached or finalized; nothing is left to prune. "
                              "Fix: keep training with the plain optimizer.")
        self.step_count += 1
        self._check_numbers()
        if self.step_count % self.policy.mask_update_every == 0:
            self.refresh()
        if self.step_count == 1 and ranks_disagree(self):
            raise AttachError(RANKS_DISAGREE)

    def refresh(self) -> None:
        """Recompute every mask for the current step."""
        self.sharding.settle(self.model, self.layers)
        with torch.no_grad():
            self.method.refresh(self.candidates(), self.step_count)
        self._masks_changed()

    # -- diverged runs ----------------------------------------------------------------------------

    def _watched(self, layer: PrunedLayer | UnitGroup) -> Tensor:
        """What a layer's masks are computed from: its scores, or its weight (magnitude)."""
        return self.sharding.local(layer.scores if layer.scores is not None else layer.weight)

    def _check_numbers(self) -> None:
        """Stop at NaN or Inf in what the masks are computed from, naming the layer and step.

        On the CPU the check reads its answer at once. On an accelerator it never waits: each
        step queues its flags for a copy to the host, and the next step looks at them only if
        the copy has landed, so a diverged run stops a step or two later, without a stall."""
        watched: list[PrunedLayer | UnitGroup] = [
            *(self.layers if not self.units or not self.method.has_scores else self.units)]
        tensors = [self._watched(layer) for layer in watched]
        if not tensors:
            return
        # A sum (or an L1 norm) is NaN or Inf exactly when an element is (or the values are
        # ~1e30, which is divergence too), at a tenth of the cost of isfinite() over every
        # element: on an accelerator every tensor's norm in one multi-tensor kernel; the CPU
        # sums 7x faster than it takes norms.
        sync_free = self.sync_free(tensors[0])
        totals = torch._foreach_norm(tensors, 1, dtype=torch.float32) if sync_free \
            else [t.sum(dtype=torch.float32) for t in tensors]
        flags = ~torch.isfinite(torch.stack(totals))
        if not sync_free:
            if bool(flags.any()):
                bad = next(i for i, flag in enumerate(flags.tolist()) if flag)
                raise NumericalError(self._diverged_message(watched[bad], self.step_count))
            return
        pending = self._pending_check
        if pending is not None and pending[1].query():
            self._pending_check = None
            host, _, step = pending
            diverged = [layer for layer, flag in zip(watched, host.tolist()) if flag]
            if diverged:  # a pinned host copy: reading it does not wait for the device
                raise NumericalError(self._diverged_message(diverged[0], step))
        if flags.device.type != "cuda" or self._pending_check is not None:
            return  # other devices: no asynchronous copy to watch (the reports still check)
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_check = (host, event, self.step_count)

    def _diverged_message(self, layer: PrunedLayer | UnitGroup, step: int) -> str:
        what = SCORES_NAME if layer.scores is not None else "weight"
        return (f"training diverged: {layer.name}.{what} holds NaN or Inf after step {step}. "
                "Usual causes: a learning rate too high for the model (BERT-like models "
                "fine-tune at 1e-5 to 1e-4), fp16 overflow without loss scaling, or a too large "
                "score_lr. Fix: lower the learning rate (or score_lr), or train in bf16, and "
                "restart from a checkpoint before the divergence.")

    def nonfinite_layers(self) -> list[str]:
        """The weights and scores of pruned layers that hold NaN or Inf (reads back)."""
        bad = []
        with torch.no_grad():
            for layer in self.layers:
                for name, t in (("weight", layer.weight), (SCORES_NAME, layer.scores)):
                    if t is not None and not bool(torch.isfinite(t).all()):
                        bad.append(f"{layer.name}.{name}")
        return bad

    def add_penalty_grads(self, params: list[Tensor]) -> None:
        """Add d(lambda * mean R(S))/dS to the gradients of ``params`` (soft movement, L0).

        ``params`` are whatever holds the scores when the optimizer steps: the scores, or the
        flat fp32 shards ZeRO swaps in. The penalty is a sum of per-score terms, so its gradient
        is elementwise, works on any shard, and is normalised by the number of scores so that
        lambda does not depend on the model's size."""
        lam = self.method.penalty_lambda(self.step_count)  # (the factor: below, on device)
        if lam == 0.0 or not params:
            return
        scale = lam / sum(sel.numel for sel in self.selectables)  # per score
        penalty = self.method.penalty
        assert penalty is not None  # lambda is 0 without one
        with torch.no_grad():
            factor = self.method.penalty_factor(self.candidates(), self.step_count)
            by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
            for s in params:
                if s.grad is None:  # (scores the loss did not reach: the penalty's alone)
                    s.grad = torch.zeros_like(s)
                if is_dtensor(s):  # FSDP2: elementwise, so on this rank's shard
                    s, grad = s.to_local(), cast(Any, s.grad).to_local()
                else:
                    grad = s.grad
                grads, scores = by_device.setdefault(s.device, ([], []))
                grads.append(grad)
                scores.append(s.detach())
            for device, (grads, scores) in by_device.items():
                # lambda as a 0-d tensor filled on the device: no host copy, one compiled kernel
                penalty.add_grads(grads, scores, torch.full((), scale, device=device),
                                  None if factor is None else factor.to(device))

    def kept_counts(self) -> list[int]:
        """Weights each layer's forward keeps. With sharded scores each rank counts its shard
        and one all-reduce adds them up (a collective: call it on every rank)."""
        if not self.thresholds:
            return [layer.kept() for layer in self.layers]
        self.sharding.settle(self.model, self.layers)
        local = []
        gate, phase, candidates = self.method.gate, self.state.phase, self.candidates()
        with torch.no_grad():
            ties = []  # the Top-v's ties at its threshold, counted once per tensor
            for layer in self.layers:
                imp = candidates.local_importance(layer)
                t, tied = layer.threshold, 0
                opened = gate.open_where(imp, phase)  # (L0: its evaluation gate open)
                if t is not None:
                    kept = imp > t.value.to(imp.device, imp.dtype)
                    tied = int(t.ties_kept)
                    if opened is not None:
                        kept &= opened
                        value = t.value.to(imp.device, imp.dtype).reshape(1)
                        open_at_t = gate.open_where(value, phase)
                        assert open_at_t is not None  # the gate that gave ``opened``
                        tied *= int(open_at_t.item())
                elif opened is not None:
                    kept = opened
                else:
                    local.append(imp.numel())
                    ties.append(0)
                    continue
                local.append(int(torch.count_nonzero(kept)))
                ties.append(tied)
        counts = torch.tensor(local, dtype=torch.int64)
        self.sharding.all_reduce(counts)
        return [int(c) + tied for c, tied in zip(counts.tolist(), ties)]

    def unit_counts(self) -> list[int]:
        """Structured pruning: the units each group keeps (L0: open evaluation gates)."""
        kept = [self._kept_units(group) for group in self.units]
        return [group.numel if k is None else int(k.sum()) for group, k in zip(self.units, kept)]

    def _kept_units(self, group: UnitGroup) -> Tensor | None:
        """The units ``group`` keeps at evaluation (bool), None when all: its mask, and for L0
        the units whose evaluation gate is open (inside the mask, with a requested fraction)."""
        with torch.no_grad():
            kept = self.method.gate.open_where(importance(group), self.state.phase)
        if kept is None:
            return group.mask
        return kept if group.mask is None else kept & group.mask

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step, policy, scores and masks, keyed by module name."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "step": self.step_count,
            "policy": self.policy.to_json(),
            "scores": {lay.name: lay.scores.detach() for lay in self.layers
                       if lay.scores is not None and lay.is_owner},
            "masks": {lay.name: lay.saved_mask for lay in self.layers
                      if lay.saved_mask is not None and lay.is_owner},
            "layers": [lay.name for lay in self.layers],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one that does not fit, changing nothing."""
        self.check_state(state)
        layers = self.named_layers()
        with torch.no_grad():
            for name, layer in layers.items():
                if not layer.is_owner:
                    continue
                if name in state["scores"]:
                    assert layer.scores is not None  # saved scores: a method with scores
                    layer.scores.copy_(state["scores"][name])
                mask = state["masks"].get(name)
                self._set_saved_mask(layer, mask)
        self.step_count = int(state["step"])
        self._masks_changed()

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Refuse saved pruning state that does not fit this run; changes nothing."""
        version = state.get("format_version")
        if version != STATE_FORMAT_VERSION:
            raise StateError(f"pruning state has format_version {version!r}; this prune_plugin "
                             f"reads {STATE_FORMAT_VERSION}. Fix: save it again with this "
                             "version.")
        check_saved_policy(state["policy"], self.policy)
        layers = self.named_layers()
        if list(state["layers"]) != list(layers):
            missing = sorted(set(state["layers"]) - set(layers))
            extra = sorted(set(layers) - set(state["layers"]))
            raise StateError(f"pruning state covers other modules (saved only: {missing[:5]}, "
                             f"model only: {extra[:5]}). Fix: load it into the model it was "
                             "saved from.")
        for kind in ("scores", "masks"):
            for name, tensor in state[kind].items():
                shape = layers[name].state_shape
                if tuple(tensor.shape) != shape:
                    raise StateError(f"saved {kind} of {name!r} have shape "
                                     f"{tuple(tensor.shape)}, this run's {shape}. Fix: "
                                     "load into the same model.")
        owners = {name for name, layer in layers.items() if layer.is_owner}
        if self.method.has_scores and set(state["scores"]) != owners:
            raise StateError("pruning state lacks scores for some layers. Fix: save it again.")

    # -- the step in the model's state dict -------------------------------------------------------

    def _save_step(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: Any) -> None:
        state_dict[prefix + STEP_KEY] = torch.tensor(self.step_count, dtype=torch.int64)

    def _start_loading(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                       local_metadata: Any, strict: bool, missing_keys: list[str],
                       unexpected_keys: list[str], error_msgs: list[str]) -> None:
        step = state_dict.pop(prefix + STEP_KEY, None)  # never an unexpected key
        for layer in self.layers:
            layer.loaded_mask = None
        self._loading = (None if step is None else int(step), error_msgs)

    def _finish_loading(self, module: nn.Module, incompatible: Any) -> None:
        """After ``model.load_state_dict``: take the loaded step and masks (nothing if the load
        failed), and let a checkpoint of the plain model load without the scores."""
        loading, self._loading = self._loading, None
        masks = {layer.name: layer.loaded_mask for layer in self.layers
                 if layer.loaded_mask is not None}
        for layer in self.layers:
            layer.loaded_mask = None
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                        if not k.endswith("." + SCORES_NAME)]
        if loading is None or loading[1]:  # not started here, or errors: torch raises them
            return
        step, _ = loading
        layers = self.named_layers()
        for name, mask in masks.items():
            self._set_saved_mask(layers[name], mask)
        if step is not None:
            self.step_count = step
            if len(masks) < len(self.selectables) and self.sharding.refresh_after_load:
                self.refresh()  # masks not in the checkpoint: rebuild them for the step
        self._masks_changed()

    @staticmethod
    def _set_saved_mask(layer: PrunedLayer, mask: Tensor | None) -> None:
        """Give a loaded mask to the layer, or to its unit group."""
        if mask is not None:
            mask = mask.to(layer.weight.device, torch.bool)
        (layer.group or layer).set_mask(mask)

    # -- ending the run -------------------------------------------------------------------------

    def on_detach(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the model is detached or finalized (not copied by deepcopy)."""
        self._on_detach.append(callback)

    def detach(self) -> None:
        """Remove scores, masks and hooks: the model is bit-exactly what it was before."""
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None
        for layer in self.layers:
            layer.uninstall()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for m in self.model.modules():
            if m.__dict__.get(PRUNER_ATTR) is self:
                del m.__dict__[PRUNER_ATTR]
        self.closed = True
        callbacks, self._on_detach = self._on_detach, []
        for callback in callbacks:
            callback()

    def finalize(self, *, shrink: bool = False, merge_adapters: bool = False) -> None:
        """Bake ``W * M`` into each pruned weight (in place; L0: its evaluation gate), then
        detach: a plain model. ``shrink`` (structured pruning) also removes the pruned heads
        and neurons: smaller Linears, the same outputs; their shapes go into the model's config
        for :func:`prune_plugin.load_shrunk`. ``merge_adapters`` first merges the
        PEFT adapters (LoRA) of pruned layers into them, so the masks apply to ``W + dW``."""
        if shrink and self.policy.structure in ("unstructured", "blocks"):
            raise AttachError(f"shrink removes pruned heads and neurons; structure "
                              f"{self.policy.structure!r} prunes single weights or blocks, "
                              "which standard kernels cannot skip. Fix: finalize without "
                              "shrink, or prune with structure neurons, heads or hybrid.")
        if self.sharding.shards:
            raise AttachError(
                f"finalize bakes the masks into whole weights, and under {self.sharding.name} "
                "each rank holds shards. Fix: take the finalized weights as one state dict, "
                "prune_plugin.finalized_state_dict(model) (FSDP2) or prune_plugin.integrations."
                "deepspeed.finalized_state_dict(engine) (ZeRO-3), on every rank, and save or load "
                "it into an unsharded model.")
        if merge_adapters:
            self._merge_adapters()
        with torch.no_grad():
            for layer in self.layers:
                gate = layer.gate()
                if gate is not None:
                    layer.weight.mul_(gate.to(layer.weight.dtype))
            if shrink:
                for group in self.units:  # L0: a unit is kept while its gate opens
                    group.set_mask(self._kept_units(group))
                record_shapes(self.model, *shrink_groups(self.model, self.units))
        self.detach()

    def _merge_adapters(self) -> None:
        """Merge each PEFT tuner layer whose base layer is pruned (its ``merge()`` adds the
        adapter's delta to the base weight), found without importing PEFT."""
        pruned = {id(layer.module) for layer in self.layers}
        modules: list[Any] = list(self.model.modules())  # (PEFT's methods, untyped here)
        tuners = [m for m in modules
                  if callable(getattr(m, "get_base_layer", None)) and callable(getattr(m, "merge",
                                                                                       None))
                  and isinstance(getattr(m, "adapter_layer_names", None), (tuple, list))
                  and id(m.get_base_layer()) in pruned]
        if not tuners:
            raise AttachError("merge_adapters: no pruned layer carries a PEFT adapter. Fix: "
                              "finalize without merge_adapters.")
        for tuner in tuners:
            tuner.merge()

    def __getstate__(self) -> dict[str, Any]:
        # A copy of the model (deepcopy, pickle) is not tied to the original's optimizer.
        state = dict(self.__dict__)
        state["_on_detach"] = []
        state["_pending_check"] = None
        state["driver"] = None
        return state


# -- attaching -----------------------------------------------------------------------------------

def _check_attachable(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    if get_pruner(model) is not None:
        raise AttachError("this model is already attached to a pruning policy. Fix: call "
                          "prune_plugin.detach(model) first, or reuse the existing optimizer.")
    holders: dict[int, dict[int, str]] = {}  # parameter -> the modules holding it
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                holders.setdefault(id(p), {})[id(m)] = name
    for name, m in targets:
        others = [n for i, n in holders.get(id(m.weight), {}).items() if i != id(m)]
        if others:
            tied = others[0]
            raise AttachError(f"module {name!r} shares its weight with {tied!r} (tied weights, "
                              "e.g. an output head tied to the token embedding): pruning one "
                              "would prune both. Fix: exclude it, or untie the weights "
                              "(config.tie_word_embeddings = False) before attaching.")
        if layer_of(m) is not None or SCORES_NAME in m._parameters or "forward" in m.__dict__:
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
           sharding: Sharding | None = None) -> Pruner:
    """Attach ``policy`` to ``model``: scores, forwards and masks on every targeted Linear
    (:class:`Pruner`). Most users never call this directly: ``PruningOptimizer(optimizer,
    policy, model=model)`` does."""
    return Pruner(model, policy, score_factory=score_factory, sharding=sharding)


def _anchor(model: nn.Module, names: list[str]) -> nn.Module:
    """The smallest module holding every pruned layer: what PEFT's ``merge_and_unload()`` or
    a wrapper's unwrapping hands back still holds it, so the run is found from there (the
    layers themselves do not know their pruner)."""
    paths = [name.split(".") for name in names]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(common) == min(map(len, paths), default=0):
        common = common[:-1]  # one layer: its parent (the layer's own __dict__ stays clean)
    return model.get_submodule(".".join(common)) if common else model


def _sharded_scores(pruner: Pruner, layer: PrunedLayer) -> Tensor:
    """FSDP2: a layer's initial scores computed from its whole weight (as one process would),
    then sharded like the weight."""
    with torch.no_grad(), gathered(layer):
        whole = pruner.method.scores(layer)  # type: ignore[misc]
    return nn.Parameter(pruner.sharding.distribute(whole))


def get_pruner(model: nn.Module) -> Pruner | None:
    """The live pruner of ``model`` or of a module inside it (``torch.compile``'s wrapper,
    DDP, PEFT and accelerate wrappers hold the attached model as a submodule), or None."""
    pruner = model.__dict__.get(PRUNER_ATTR)
    if pruner is not None:
        return pruner
    found = {id(p): p for m in model.modules() if (p := m.__dict__.get(PRUNER_ATTR)) is not None}
    if len(found) > 1:
        raise AttachError(f"this module holds layers of {len(found)} different pruning runs. "
                          "Fix: pass the model each run was attached to.")
    return next(iter(found.values()), None)


def as_pruner(obj: Any) -> Pruner:
    """The pruner of a Pruner, a PruningOptimizer (or anything with ``.pruner``), or a model."""
    if isinstance(obj, Pruner):
        return obj
    pruner = getattr(obj, "pruner", None)
    if isinstance(pruner, Pruner):
        return pruner
    if isinstance(obj, nn.Module):
        return require_pruner(obj, "find the pruning state of")
    raise TypeError(f"expected a Pruner, a PruningOptimizer or an attached model, got "
                    f"{type(obj).__name__}")


def require_pruner(model: nn.Module, action: str) -> Pruner:
    pruner = get_pruner(model)
    if pruner is None:
        raise AttachError(f"cannot {action} this model: it has no pruning attached (pass the "
                          "model given to PruningOptimizer, or a wrapper of it).")
    return pruner


def detach(model: nn.Module) -> nn.Module:
    """Remove scores, masks and hooks; the model is bit-exactly what it was before attaching."""
    require_pruner(model, "detach").detach()
    return model


def finalize(model: nn.Module, *, shrink: bool = False, merge_adapters: bool = False
             ) -> nn.Module:
    """Bake ``W * M`` into each pruned ``weight`` (in place) and detach: a plain model.

    L0 uses its deterministic evaluation gate. ``shrink`` (structured pruning: neurons, heads,
    hybrid) removes the pruned units: smaller Linears, the same outputs, a faster model;
    ``prune_plugin.load_shrunk`` loads it back after ``save_pretrained``. Returns the model.

    ``merge_adapters`` (a PEFT model whose base layers were pruned): merge the adapters into
    the pruned layers before baking, so the merged model keeps the masks' sparsity (PEFT's
    ``merge_and_unload()`` after ``finalize`` would add dense deltas back); returns the
    unloaded base model. The adapters' deltas were dense in training: their pruned entries go.
    """
    require_pruner(model, "finalize").finalize(shrink=shrink, merge_adapters=merge_adapters)
    unload = getattr(model, "merge_and_unload", None)
    if merge_adapters and callable(unload):
        return unload()  # already merged: PEFT only swaps the base layers back in
    return model


def finalized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """What ``model.state_dict()`` holds after :func:`finalize`, without changing the model:
    ``W * M`` baked into each pruned weight (L0: its evaluation gate), no scores, no masks, no
    step, every tensor whole and on the CPU. Keys are those of the attached model (inside
    DDP's wrapper). Under FSDP2 this is a collective (every rank gathers each tensor in turn
    and gets the whole dict): what rank 0 saves, and what stock ``from_pretrained`` loads."""
    pruner = require_pruner(model, "export")
    by_key = {f"{layer.name}.weight": layer for layer in pruner.layers}
    skip = (SCORES_NAME, MASK_KEY)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, value in pruner.model.state_dict(keep_vars=True).items():
            if key == STEP_KEY or key.rsplit(".", 1)[-1] in skip:
                continue
            layer = by_key.get(key)
            if layer is None:
                out[key] = whole_tensor(value).cpu().clone()
                continue
            with gathered(layer):
                out[key] = effective_weight(layer.weight.detach(), layer.gate()).cpu().clone()
    return out


def check_saved_policy(saved_json: str, policy: PruningPolicy) -> None:
    """Refuse pruning state saved with another policy, naming the fields that differ."""
    saved = PruningPolicy.from_saved_json(saved_json)
    if saved != policy:
        fields = dict.fromkeys([*type(saved).model_fields, *type(policy).model_fields])
        diff = [f"{k}: saved {getattr(saved, k, None)!r} vs current {getattr(policy, k, None)!r}"
                for k in fields if getattr(saved, k, None) != getattr(policy, k, None)]
        raise StateError("pruning state was saved with another policy (" + "; ".join(diff)
                         + "). Fix: attach with the saved policy to resume.")
