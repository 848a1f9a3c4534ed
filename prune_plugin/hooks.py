"""The one place that installs things on a model's linear layers, and removes them again.

Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2), whose weight is stored
transposed: masks and scores keep the stored shape, and the forward transposes views.

How a Linear computes ``x (W * M)^T + b`` without replacing its class: an **instance-level**
``forward`` (``module.forward``, as accelerate's hooks do) computes with the layer's current
mask through one fused autograd function (:mod:`prune_plugin.masks`). ``type(module) is
nn.Linear`` still holds and ``weight`` stays the same Parameter under the same key (no
``weight_orig``, no ``parametrizations.*``), so optimizers, Hugging Face loaders and state
dicts keep working. The gate is decided inside that forward, after every forward pre-hook has
run, so an engine's own pre-hooks (DeepSpeed ZeRO-3 gathering the weight) come first whatever
the order they were registered in.

Installed per layer, each kept as a handle and removed exactly by :meth:`PrunedLayer.uninstall`:

- the score Parameter ``<module>.pruning_scores`` (not for magnitude pruning): registered on
  the Linear itself, so ZeRO-3, which gathers a module's own parameters around its forward,
  shards and gathers it with the weight;
- the forward;
- state-dict hooks that add the layer's mask as ``<module>.pruning_mask`` to
  ``model.state_dict()`` and take it back in ``load_state_dict``, so a model-only checkpoint
  carries its masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from prune_plugin.distributed import gathered, holds_dtensors
from prune_plugin.masks import effective_weight, masked_linear
from prune_plugin.methods import GatePhase, Method, importance
from prune_plugin.selection import TopVThreshold, mask_from_threshold
from prune_plugin.targeting import bias_of, is_transposed, weight_of

if TYPE_CHECKING:
    from prune_plugin.structure import Layout, UnitGroup

#: Name of the score Parameter registered on each pruned Linear.
SCORES_NAME = "pruning_scores"
#: State-dict key (after the module's prefix) of a pruned Linear's mask.
MASK_KEY = "pruning_mask"
#: Attribute of a pruned Linear that points to its PrunedLayer.
LAYER_ATTR = "_prune_plugin_layer"


@dataclass(eq=False)
class StepState:
    """What the forwards of one run's layers read, shared by them and written by the run's
    pruner when a step changes it: the method (its gate computes the forward), the gate's
    phase, and a generation bumped whenever masks change (it invalidates cached W * M)."""

    method: Method
    phase: GatePhase
    generation: int = 0


class PrunedLayer:
    """The pruning state of one Linear: its current mask and how it computes with it."""

    def __init__(self, name: str, module: nn.Module, state: StepState) -> None:
        self.name = name
        self.module = module
        self.state = state
        #: A mask ``model.load_state_dict`` gave this layer, for the pruner to take.
        self.loaded_mask: Tensor | None = None
        self.mask: Tensor | None = None  # bool, same shape as the weight; None: all kept
        # Sharded scores (ZeRO-3): no full mask is kept between forwards; each forward rebuilds
        # it from the gathered scores and this threshold.
        self.threshold: TopVThreshold | None = None
        self._mask_buffer: Tensor | None = None
        self._inference: tuple[tuple, Tensor] | None = None  # (key, W * gate) for no-grad passes
        self._handles: list[RemovableHandle] = []
        #: Structured pruning: the unit group this layer belongs to, and how its units lie on
        #: the weight; the group holds the scores and the mask over units.
        self.group: UnitGroup | None = None
        self.layout: Layout | None = None
        self.transposed = is_transposed(module)  # transformers' Conv1D: weight [in, out]

    def __repr__(self) -> str:
        return f"PrunedLayer({self.name!r}, {tuple(self.weight.shape)})"

    # -- state ----------------------------------------------------------------------------------

    @property
    def weight(self) -> nn.Parameter:
        return weight_of(self.module)

    @property
    def bias(self) -> nn.Parameter | None:
        return bias_of(self.module)

    @property
    def scores(self) -> nn.Parameter | None:
        """This layer's scores: its own, or (structured) its unit group's, one per unit."""
        if self.group is not None and self.group.owner is not self:
            return self.group.scores
        return self.module._parameters.get(SCORES_NAME)

    @property
    def is_owner(self) -> bool:
        """Whether the layer holds the scores and the mask in the model's state dict (every
        unstructured layer; the first member of a unit group)."""
        return self.group is None or self.group.owner is self

    @property
    def state_shape(self) -> tuple[int, ...]:
        """The shape of this layer's scores and mask in saved state."""
        return tuple(self.group.shape) if self.group is not None else tuple(self.weight.shape)

    @property
    def saved_mask(self) -> Tensor | None:
        """The mask this layer saves: its own, or its unit group's; a tensor of its own (a
        mask may be a view into one buffer of several layers' masks: save_pretrained keeps
        one of the tensors sharing memory, as tied weights, and torch.save the whole buffer)."""
        mask = self.group.mask if self.group is not None else self.mask
        if mask is not None and mask.untyped_storage().nbytes() != mask.numel():
            return mask.clone()
        return mask

    @property
    def numel(self) -> int:
        w = self.weight
        return getattr(w, "ds_numel", w.numel())  # ZeRO-3 holds a shard: count the whole

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    #: Magnitude pruning ranks |W| element by element (a unit group ranks unit norms).
    ranks_abs_weight = True

    def magnitudes(self) -> Tensor:
        """|W|: what magnitude pruning ranks."""
        return self.weight.detach().abs()

    def mask_buffer(self) -> Tensor:
        """A reused bool buffer of the weight's shape (no per-step allocation)."""
        w = self.weight
        if self._mask_buffer is None or self._mask_buffer.device != w.device \
                or self._mask_buffer.shape != w.shape:
            self._mask_buffer = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        return self._mask_buffer

    def use_mask_buffer(self, buffer: Tensor) -> None:
        """Take ``buffer`` (a view into one tensor a selection writes for several layers at
        once) as the mask buffer."""
        self._mask_buffer = buffer

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

    def current_mask(self) -> Tensor | None:
        """The bool mask of this step over the weight (its unit group's, spread over rows or
        columns; rebuilt from the gathered scores under sharded ones), None: all kept."""
        if self.group is not None:
            mask = self.group.mask
            assert self.layout is not None  # set with the group
            return None if mask is None else self.layout.expand(mask)
        if self.threshold is not None:
            return mask_from_threshold(importance(self), self.threshold)
        if self.mask is not None and self.mask.device != self.weight.device:
            self.set_mask(self.mask.to(self.weight.device))  # the model was moved
        return self.mask

    def gate(self) -> Tensor | None:
        """The deterministic multiplier of W (the mask, or L0's evaluation gate); None: all
        weights kept."""
        return self.state.method.gate.eval_gate(self, self.state.phase)

    def kept(self) -> int:
        """Number of weights the forward keeps (L0: gates above 0 at evaluation). Reads the
        count back from the device."""
        with torch.no_grad():
            gate = self.gate()
        if gate is None:
            return self.numel
        # a gate per row or column (structured) stands for numel / gate.numel() weights each
        return int(torch.count_nonzero(gate)) * (self.numel // gate.numel())

    # -- the module's computation ---------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        if holds_dtensors(self.module):  # FSDP2 scores attached after fully_shard
            with gathered(self):
                return self._forward(input)
        return self._forward(input)

    def _forward(self, input: Tensor) -> Tensor:
        return self.state.method.gate.forward(self, input, self.state.phase)

    @property
    def as_linear(self) -> Any:
        """Turns a stored weight-shaped tensor into the Linear's [out, in] (Conv1D stores W^T)."""
        return _transpose if self.transposed else _same

    def masked_forward(self, input: Tensor, *, straight_through: bool) -> Tensor:
        """x (W * gate)^T + b with the deterministic gate; ``straight_through``: the scores get
        dL/dW' * W (Eq. 2). Without autograd, W * gate is cached."""
        lin = self.as_linear
        if not torch.is_grad_enabled():
            return F.linear(input, lin(self.inference_weight()), self.bias)
        self._inference = None  # training: free the cached product
        gate = self.gate()
        scores: Tensor | None = self.scores if straight_through else None
        if scores is not None and self.layout is not None:  # one score per unit
            scores = self.layout.expand(scores)
        if gate is None and scores is None:
            return F.linear(input, lin(self.weight), self.bias)
        return masked_linear(input, lin(self.weight), self.bias, lin(gate), lin(scores))

    def inference_weight(self) -> Tensor:
        """W * gate for passes without autograd, cached while the weight, the scores and the
        masks are unchanged (evaluation then costs what the finalized model costs)."""
        w, scores = self.weight, self.scores
        if self.threshold is not None or torch.compiler.is_compiling():
            return effective_weight(w, self.gate())  # sharded, or traced: nothing to keep
        # a new storage (the model moved, .data reassigned) or any in-place write changes it
        key = (self.state.generation, w.untyped_storage()._cdata, w._version, w.dtype,
               None if scores is None else (scores.untyped_storage()._cdata, scores._version))
        if self._inference is not None and self._inference[0] == key:
            return self._inference[1]
        gate = self.gate()
        if gate is None:
            self._inference = None
            return w
        self._inference = (key, effective_weight(w.detach(), gate))
        return self._inference[1]

    # -- install / uninstall --------------------------------------------------------------------

    def install(self, scores: Tensor | None) -> None:
        m = self.module
        if scores is not None:
            if not isinstance(scores, nn.Parameter):
                scores = nn.Parameter(scores, requires_grad=True)
            m.register_parameter(SCORES_NAME, scores)
        m.forward = self.forward  # instance attribute; the class is untouched
        m.__dict__[LAYER_ATTR] = self
        # partial(): torch marks hooks it is given with an attribute, which methods refuse
        self._handles = [m.register_state_dict_post_hook(partial(self._save_mask)),
                         m.register_load_state_dict_pre_hook(partial(self._load_mask))]

    def uninstall(self) -> None:
        m = self.module
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if m.__dict__.get("forward") == self.forward:
            del m.forward
        m.__dict__.pop(LAYER_ATTR, None)
        m.__dict__.pop(MASK_KEY, None)
        if SCORES_NAME in m._parameters:
            del m._parameters[SCORES_NAME]
        self.mask = self._mask_buffer = self._inference = None
        self.threshold = None

    # -- the mask in the model's state dict -------------------------------------------------------

    def _save_mask(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: Any) -> None:
        mask = self.saved_mask
        if mask is not None and self.is_owner:
            state_dict[prefix + MASK_KEY] = mask.detach()
            # torch.distributed.checkpoint resolves each key as an attribute path
            module.__dict__[MASK_KEY] = state_dict[prefix + MASK_KEY]

    def _load_mask(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                   local_metadata: Any, strict: bool, missing_keys: list[str],
                   unexpected_keys: list[str], error_msgs: list[str]) -> None:
        mask = state_dict.pop(prefix + MASK_KEY, None)  # never an unexpected key
        if mask is None:
            return
        if tuple(mask.shape) != self.state_shape:
            error_msgs.append(f"size mismatch for {prefix + MASK_KEY}: the checkpoint's mask "
                              f"has shape {tuple(mask.shape)}, this pruning run's "
                              f"{self.state_shape}.")
            return
        self.loaded_mask = mask


def _same(t: Tensor | None) -> Tensor | None:
    return t


def _transpose(t: Tensor | None) -> Tensor | None:
    """A stored Conv1D-shaped tensor as the Linear's (a view; per-unit vectors too)."""
    return t if t is None or t.dim() < 2 else t.t()


def layer_of(module: nn.Module) -> PrunedLayer | None:
    """The PrunedLayer installed on ``module``, or None."""
    return module.__dict__.get(LAYER_ATTR)
