"""Pruning across ranks: the one seam for sharded scores, and the engines around the model.

Every rank must end each step with the same masks. What that takes depends on the engine:

- one process, or DDP with the plugin attached first: scores whole on every rank; nothing to
  do (DDP averages the scores' gradients like any parameter's);
- DDP built before the plugin: scores whole, unknown to DDP; :class:`ScoreGradAverager`
  broadcasts rank 0's initial scores and launches one bucketed all-reduce of the score
  gradients per backward, when the last one is ready;
- FSDP2 (``fully_shard``), either order: scores are DTensor shards like the weight's;
  :class:`DTensorSharding` selects the exact Top-v over the shards, and :func:`gathered` makes a
  layer's shards whole for its forward when FSDP does not;
- DeepSpeed ZeRO-3: scores are ZeRO partitions; the DeepSpeed integration's :class:`Sharding`.

:class:`Sharding` is the seam the pruner calls: this rank's real elements of a tensor, and a
sum across the ranks that share them. The base class is the null object (whole tensors, one
rank), so the pruner never asks whether there is a sharding, only whether it shards.

Engines the plugin cannot make correct are refused when attaching: ``nn.DataParallel`` (it
replicates the modules on every forward) and FSDP1 (it flattens the weights).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import torch
from torch import Tensor, nn

from prune_plugin.errors import AttachError

if TYPE_CHECKING:
    from prune_plugin.hooks import PrunedLayer
    from prune_plugin.pruner import Pruner

try:  # DTensor (FSDP2's parameters) ships with every torch the package accepts
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
except ImportError:  # pragma: no cover - torch built without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]


# -- the seam -------------------------------------------------------------------------------------

class Sharding:
    """Whole tensors on one rank: the null sharding (and the base of the real ones).

    ``local(t)`` is this rank's real elements of a parameter ``t`` (flat, no padding), and
    ``all_reduce(x)`` sums a small tensor in place over the ranks whose shards make up the
    whole; a sharding that ``shards`` makes the pruner choose masks as thresholds agreed across
    ranks (:func:`prune_plugin.selection.topv_thresholds`) instead of whole masks."""

    #: Whether a rank holds only part of each score tensor.
    shards: bool = False
    #: What the sharding is called in errors ("FSDP2", "ZeRO-3").
    name: str = "one process"
    #: Whether ``model.load_state_dict`` may rebuild masks missing from a checkpoint (a
    #: collective when sharded; ZeRO-3's engine refreshes after its own loading instead).
    refresh_after_load: bool = True

    def local(self, t: Tensor) -> Tensor:
        return t.detach().reshape(-1)

    def distribute(self, whole: Tensor) -> Tensor:
        """``whole`` laid out as this sharding lays out a parameter of its shape."""
        return whole

    def all_reduce(self, t: Tensor) -> None:
        return None

    def averaging_groups(self, param: Tensor) -> list[Any]:
        """The process groups over which the plugin must average the gradient of ``param``,
        a parameter the engine does not know of ([]: the engine averages it, or one rank)."""
        return []

    def settle(self, model: nn.Module, layers: Sequence[PrunedLayer]) -> None:
        """Put every layer's parameters back in their sharded form before shards are read."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: The null sharding.
WHOLE = Sharding()


def is_dtensor(t: Any) -> TypeGuard[DTensor]:
    return isinstance(t, DTensor)


class DTensorSharding(Sharding):
    """FSDP2: weights and scores are DTensors sharded on one device mesh (dim 0, as
    ``fully_shard`` shards); sums run over the mesh dimensions that shard (HSDP's replicate
    dimension holds copies, which must not be counted twice)."""

    shards = True
    name = "FSDP2"

    def __init__(self, mesh: Any, placements: Sequence[Any]) -> None:
        self.mesh = mesh
        self.placements = tuple(placements)
        self._groups = [mesh.get_group(d) for d, p in enumerate(self.placements)
                        if p.is_shard()]

    def __repr__(self) -> str:
        return f"DTensorSharding(mesh={tuple(self.mesh.shape)}, placements={self.placements})"

    def local(self, t: Tensor) -> Tensor:
        # (a plain tensor is one replicated on every rank: structured pruning's unit scores)
        return (cast(DTensor, t.detach()).to_local() if is_dtensor(t) else t.detach()).reshape(-1)

    def all_reduce(self, t: Tensor) -> None:
        device = self.mesh.device_type
        on_mesh = t if t.device.type == device else t.to(device)
        for group in self._groups:
            dist.all_reduce(on_mesh, group=group)
        if on_mesh is not t:
            t.copy_(on_mesh)

    def averaging_groups(self, param: Tensor) -> list[Any]:
        # a plain tensor beside FSDP2's DTensors (unit scores attached after fully_shard):
        # averaging over each of the mesh's groups in turn averages over every rank
        return [] if is_dtensor(param) else [self.mesh.get_group(d)
                                              for d in range(self.mesh.ndim)]

    def settle(self, model: nn.Module, layers: Sequence[PrunedLayer]) -> None:
        # FSDP2 leaves the root's parameters unsharded after a forward without backward
        # (an evaluation): a pruned Linear directly under the root would read whole
        if all(is_dtensor(layer.weight) for layer in layers):
            return
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def distribute(self, whole: Tensor) -> Tensor:
        """``whole`` (the same on every rank) as a DTensor placed like the weights."""
        return distribute_tensor(whole, self.mesh, self.placements)


def dtensor_sharding(layers: Sequence[PrunedLayer]) -> DTensorSharding | None:
    """The FSDP2 sharding of ``layers`` when their weights are DTensors (None when none is);
    refuses layers sharded on different meshes or placements, or only some of them sharded."""
    weights = [layer.weight for layer in layers]
    sharded: list[DTensor] = [w for w in weights if is_dtensor(w)]
    if not sharded:
        return None
    first = sharded[0]
    if len(sharded) != len(weights):
        plain = next(layer.name for layer in layers if not is_dtensor(layer.weight))
        raise AttachError(f"some pruned layers are sharded by FSDP2 and some are not ({plain!r} "
                          "is not): their masks could not be agreed on. Fix: call fully_shard on "
                          "the root module too (it shards every parameter left).")
    for layer, w in zip(layers, sharded):  # every weight is sharded by now
        if w.device_mesh != first.device_mesh or tuple(w.placements) != tuple(first.placements):
            raise AttachError(f"pruned layer {layer.name!r} is sharded on another device mesh or "
                              "with other placements than the first one. Fix: shard every "
                              "pruned layer on one mesh (fully_shard's default).")
    if not all(p.is_shard(0) or p.is_replicate() for p in first.placements):
        raise AttachError(f"FSDP2 weights placed as {tuple(first.placements)}: pruning supports "
                          "fully_shard's dim-0 sharding (and HSDP's replicate dimension). Fix: "
                          "drop shard_placement_fn.")
    return DTensorSharding(first.device_mesh, first.placements)


def is_zero_partitioned(t: Any) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (``ds_tensor`` holds this rank's part)."""
    return hasattr(t, "ds_id")


def is_zero_sharded_now(t: Any) -> bool:
    """Whether ``t`` is a ZeRO-3 parameter holding only its partition (not gathered now)."""
    return is_zero_partitioned(t) and t.numel() != t.ds_numel


def zero_slice(t: Any) -> tuple[Tensor, int]:
    """A ZeRO-3 parameter's real elements on this rank (its flat partition, less the padding
    of the last one) and their offset in the flat whole."""
    import deepspeed.comm as ds_dist

    shard = t.ds_tensor.detach().reshape(-1)
    start = ds_dist.get_rank(group=t.ds_process_group) * shard.numel()
    return shard[:max(0, min(shard.numel(), t.ds_numel - start))], start


def whole_tensor(t: Tensor) -> Tensor:
    """``t`` whole on this rank: a DTensor or a ZeRO-3 parameter gathered (a collective; for
    small tensors such as unit scores), anything else detached."""
    if is_dtensor(t):
        mesh = t.device_mesh
        return cast(DTensor, t.detach()).redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
    if is_zero_sharded_now(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.detach().clone()
    return t.detach()


_GATHERED = ("weight", "pruning_scores")  # the weight and hooks.SCORES_NAME


def holds_dtensors(module: nn.Module) -> bool:
    """Whether the Linear's weight or scores are DTensor shards right now (FSDP2 outside its
    gathered forward, or scores it does not manage)."""
    params = module._parameters
    return any(is_dtensor(params.get(name)) for name in _GATHERED)


@contextmanager
def gathered(layer: PrunedLayer) -> Iterator[None]:
    """The layer's DTensor parameters whole for the code inside (a no-op when none is one).

    FSDP2 gathers the parameters it manages around its modules' forwards; scores attached after
    ``fully_shard`` are not among them, so a forward gathers them here, differentiably: their
    gradient comes back reduce-scattered and averaged over the ranks, as FSDP2 does for its own.
    Outside forwards (``finalize``) the weight is gathered too."""
    module = layer.module
    swapped: dict[str, Any] = {}  # the DTensor parameters, put back after
    for name in _GATHERED:
        p = module._parameters.get(name)
        if is_dtensor(p):
            swapped[name] = p
    if not swapped:
        yield
        return
    for name, p in swapped.items():
        replicate = [Replicate()] * p.device_mesh.ndim
        whole = p.redistribute(p.device_mesh, replicate)
        module._parameters[name] = whole.to_local(
            grad_placements=[Partial("avg")] * p.device_mesh.ndim)
    try:
        yield
    finally:
        for name, p in swapped.items():
            module._parameters[name] = p


# -- DDP ----------------------------------------------------------------------------------------

def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, Any]:
    """``(module, ddp)``: the module a ``DistributedDataParallel`` wraps and the wrapper, or
    ``(model, None)``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model
    return model, None


def refuse_unsupported_engines(model: nn.Module) -> None:
    """Refuse engines whose parameters or modules the plugin cannot follow, naming the
    supported ones."""
    supported = ("Supported: one process, DistributedDataParallel, FSDP2 (fully_shard) and "
                 "DeepSpeed ZeRO 0-3 (prune_plugin.integrations.deepspeed).")
    if isinstance(model, nn.DataParallel):
        raise AttachError("torch.nn.DataParallel copies the modules onto every GPU at each "
                          "forward, and the copies would not carry the pruning masks. Fix: use "
                          f"DistributedDataParallel (torchrun) instead. {supported}")
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FullyShardedDataParallel):
            raise AttachError("FSDP1 (FullyShardedDataParallel) flattens the weights into one "
                              "buffer, so no Linear keeps a weight to prune. Fix: shard with "
                              f"FSDP2, torch.distributed.fsdp.fully_shard. {supported}")


def ddp_averages(ddp: Any, params: Sequence[Tensor]) -> bool:
    """Whether ``ddp`` averages the gradients of ``params`` (they existed when it was built)."""
    known = getattr(ddp, "_module_parameters", None)
    if known is None:  # another torch: averaging twice is harmless, never averaging is not
        return False
    ids = {id(p) for p in known}
    return all(id(p) in ids for p in params)


class ScoreGradAverager:
    """Averages the gradients of scores no engine knows of, over ``groups`` in turn (together
    every rank that trains on other data): the scores of a DDP built before the plugin, and
    structured pruning's few unit scores, kept whole on every rank, under FSDP2.

    At start, each group's first rank's scores are broadcast (as DDP broadcasts the parameters
    it is built with). In each backward where ``syncs()`` (DDP: not under ``no_sync``, as its
    own), the last score gradient to be accumulated launches one asynchronous all-reduce of all
    of them, flattened into one bucket; the end of the backward waits for it and writes back
    the average. No value is read back to the host."""

    def __init__(self, groups: Sequence[Any], scores: Sequence[nn.Parameter],
                 syncs: Callable[[], bool] = lambda: True) -> None:
        self.groups = list(groups)
        self.syncs = syncs
        self.scores = list(scores)
        self._ready = 0
        self._queued = False
        self._work: Any = None
        self._flat: Tensor | None = None
        with torch.no_grad():
            flat = torch._utils._flatten_dense_tensors([s.detach() for s in self.scores])
            for group in self.groups:
                dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
            for s, synced in zip(self.scores,
                                 torch._utils._unflatten_dense_tensors(flat, self.scores)):
                s.copy_(synced)
        self._handles = [s.register_post_accumulate_grad_hook(self._on_grad)
                         for s in self.scores]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_grad(self, param: Tensor) -> None:
        if not self.syncs():
            return
        if not self._queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        self._ready += 1
        if self._ready == len(self.scores):
            self._launch()

    def _launch(self) -> None:
        with torch.no_grad():
            grads = [torch.zeros_like(s) if s.grad is None else s.grad for s in self.scores]
            self._flat = torch._utils._flatten_dense_tensors(grads)
        # the first group's all-reduce starts now; the others (HSDP) follow it at the end
        self._work = dist.all_reduce(self._flat, group=self.groups[0], async_op=True)

    def _finish(self) -> None:
        if self._work is None:  # a score got no gradient in this backward: launch now
            self._launch()
        self._work.wait()
        assert self._flat is not None  # set by _launch
        flat = self._flat.div_(dist.get_world_size(self.groups[0]))
        for group in self.groups[1:]:
            dist.all_reduce(flat, group=group)
            flat.div_(dist.get_world_size(group))
        with torch.no_grad():
            for s, avg in zip(self.scores,
                              torch._utils._unflatten_dense_tensors(flat, self.scores)):
                if s.grad is None:
                    s.grad = avg.clone()
                else:
                    s.grad.copy_(avg)
        self._ready, self._queued, self._work, self._flat = 0, False, None, None


# -- one check that ranks agree ------------------------------------------------------------------

def ranks_disagree(pruner: Pruner) -> bool:
    """Whether the ranks of the default process group hold the same pruned model (same layer
    names, shapes and policy) with different scores or weights in it. A collective with one
    read back: the pruner calls it once, after the first step."""
    if dist is None or not dist.is_available() or not dist.is_initialized() \
            or dist.get_world_size() < 2 or pruner.sharding.shards:
        return False
    layers = pruner.layers
    if not layers:
        return False
    like = layers[0].weight
    device = like.device if dist.get_backend() != "gloo" else torch.device("cpu")
    what = repr([(layer.name, tuple(layer.shape)) for layer in layers]) + pruner.policy.to_json()
    digest = int.from_bytes(hashlib.sha256(what.encode()).digest()[:6], "little")
    with torch.no_grad():
        sums = torch.stack([(layer.scores if layer.scores is not None else layer.weight)
                            .detach().double().sum().to(device) for layer in layers])
    fingerprint = torch.cat([torch.tensor([float(digest)], dtype=torch.float64, device=device),
                             sums])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low[0] != high[0]:  # different models on the ranks: not data parallel, not ours to judge
        return False
    return not torch.equal(low, high)


RANKS_DISAGREE = (
    "the ranks hold different pruning scores or weights after the first step: their gradients "
    "are not averaged, so every rank would end with a different model. This happens when "
    "DistributedDataParallel wraps the model before attaching and the unwrapped module is given "
    "to the plugin. Fix: pass the DDP wrapper itself (PruningOptimizer(..., model=ddp_model)), "
    "or attach before wrapping the model in DDP.")
