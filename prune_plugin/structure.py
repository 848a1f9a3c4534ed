"""Structured pruning: units that share one score, and physically removing pruned ones.

A *unit* is what one score decides as a whole: an attention head (the rows of its query, key
and value projections and the columns of the output projection), an FFN neuron (a row of the
up-projection and the column of the down-projection), or a block of one matrix. A
:class:`UnitGroup` holds the units of one Transformer block's attention or FFN (or one matrix's
blocks): one score vector, one mask over units, and the member Linears with how each maps units
onto its weight (:class:`Layout`). Because every member of a unit goes at once, pruned heads and
neurons can be removed (:func:`shrink_groups`), which is what makes a model faster with
standard kernels.

Which modules tie is architecture knowledge: :data:`FAMILIES` holds it for BERT, RoBERTa and
the like, DistilBERT, ViT and Llama-style models (grouped key/value heads included: a unit is a
key/value head with its query heads); a policy can name the groups of any other model
(``unit_groups``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prune_plugin.distributed import is_dtensor, is_zero_sharded_now, zero_slice
from prune_plugin.errors import AttachError, TargetingError
from prune_plugin.policy import PruningPolicy, UnitGroupSpec

if TYPE_CHECKING:
    from prune_plugin.hooks import PrunedLayer

#: The groups of the known families, names relative to a repeated block (``...layer.N.``).
FAMILIES: dict[str, list[UnitGroupSpec]] = {
    "BERT, RoBERTa, ELECTRA": [
        UnitGroupSpec(kind="heads", rows=["attention.self.query", "attention.self.key",
                                      "attention.self.value"],
                  columns=["attention.output.dense"]),
        UnitGroupSpec(kind="neurons", rows=["intermediate.dense"], columns=["output.dense"])],
    "DistilBERT": [
        UnitGroupSpec(kind="heads", rows=["attention.q_lin", "attention.k_lin",
                                          "attention.v_lin"], columns=["attention.out_lin"]),
        UnitGroupSpec(kind="neurons", rows=["ffn.lin1"], columns=["ffn.lin2"])],
    "ViT": [
        UnitGroupSpec(kind="heads", rows=["attention.q_proj", "attention.k_proj",
                                      "attention.v_proj"], columns=["attention.o_proj"]),
        UnitGroupSpec(kind="neurons", rows=["mlp.fc1"], columns=["mlp.fc2"])],
    "Llama, Mistral, Qwen2": [
        UnitGroupSpec(kind="heads", rows=["self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj"], columns=["self_attn.o_proj"]),
        UnitGroupSpec(kind="neurons", rows=["mlp.gate_proj", "mlp.up_proj"],
                  columns=["mlp.down_proj"])],
}
#: Config fields holding the number of heads units are counted in (key/value heads first:
#: with grouped-query attention a unit is one key/value head and its query heads).
HEAD_COUNT_FIELDS = ("num_key_value_heads", "num_attention_heads", "n_heads", "n_head")
SHAPES_KEY = "prune_plugin_shapes"


@dataclass(frozen=True)
class Layout:
    """How a unit vector (or block matrix) maps onto one member's weight: ``axis`` 0 (rows),
    1 (columns) with ``size`` elements per unit, or 2-D blocks of ``block`` (rows, columns)."""

    axis: int
    size: int = 1
    block: tuple[int, int] | None = None
    shape: tuple[int, int] = (0, 0)  # the member's weight shape

    def expand(self, units: Tensor) -> Tensor:
        """The unit tensor on the weight's grid: broadcastable [out, 1] / [1, in], or [out, in]
        for blocks."""
        if self.block is not None:
            r, c = self.block
            full = units.repeat_interleave(r, 0).repeat_interleave(c, 1)
            return full[:self.shape[0], :self.shape[1]]
        flat = units.repeat_interleave(self.size)
        return flat.unsqueeze(1) if self.axis == 0 else flat.unsqueeze(0)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum a weight-shaped tensor over each unit's elements."""
        if self.block is not None:
            r, c = self.block
            rows, cols = math.ceil(self.shape[0] / r), math.ceil(self.shape[1] / c)
            padded = t.new_zeros(rows * r, cols * c)
            padded[:self.shape[0], :self.shape[1]] = t
            return padded.view(rows, r, cols, c).sum((1, 3))
        along = t.sum(1 - self.axis)
        return along.view(-1, self.size).sum(1)

    def reduce_squares(self, weight: Tensor) -> Tensor:
        """The sum of squares of each unit's weights, in fp32; a DTensor ``weight`` (FSDP2,
        rows sharded) is reduced shard by shard and summed across ranks (a collective), so no
        rank gathers the weight."""
        zero = is_zero_sharded_now(weight)
        if not (zero or is_dtensor(weight)):
            w = weight.detach().float()
            return self.reduce(w * w)
        if self.block is not None:
            raise AttachError("structure 'blocks' with sharded weights (FSDP2, ZeRO-3) is not "
                              "supported. Fix: prune heads or neurons (structure heads, neurons "
                              "or hybrid), or train with DDP or ZeRO stage 0-2.")
        if zero:
            return self._reduce_zero_squares(weight)
        from torch.distributed.tensor import DTensor, Partial, Replicate
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = weight.detach().to_local().float()
        squares = local * local
        if self.axis == 0:  # this rank's rows, placed at their offset among all the rows
            _, offset = compute_local_shape_and_global_offset(
                weight.shape, weight.device_mesh, weight.placements)
            along = squares.new_zeros(self.shape[0])
            along[offset[0]:offset[0] + local.shape[0]] = squares.sum(1)
        else:  # every column, summed over this rank's rows
            along = squares.sum(0)
        mesh = weight.device_mesh
        placements = [Partial() if p.is_shard() else Replicate() for p in weight.placements]
        along = DTensor.from_local(along, mesh, placements).redistribute(
            mesh, [Replicate()] * mesh.ndim).to_local()
        return along.view(-1, self.size).sum(1)

    def _reduce_zero_squares(self, weight: Tensor) -> Tensor:
        """ZeRO-3: this rank's flat slice of the weight, each element's square added to its row
        or column, then summed across ranks."""
        import deepspeed.comm as dist

        part, start = zero_slice(weight)
        part = part.float()
        index = torch.arange(start, start + part.numel(), device=part.device)
        rows, cols = self.shape
        line = index // cols if self.axis == 0 else index % cols
        along = part.new_zeros(rows if self.axis == 0 else cols)
        along.index_add_(0, line, part * part)
        dist.all_reduce(along, group=weight.ds_process_group)
        return along.view(-1, self.size).sum(1)


@dataclass
class Member:
    """One Linear of a unit group, and how the group's units lie on its weight."""

    layer: PrunedLayer
    layout: Layout


class UnitGroup:
    """The units of one block (heads or neurons) or one matrix (blocks): a shared score vector,
    a mask over units, and the member Linears. Selection treats it like a layer with
    ``numel`` units."""

    def __init__(self, name: str, kind: str, units: tuple[int, ...], members: list[Member]):
        self.name = name  # the first member's module name: where the scores are registered
        self.kind = kind
        self.shape = units
        self.members = members
        self.mask: Tensor | None = None  # bool over units; None: all kept
        self._mask_buffer: Tensor | None = None

    def __repr__(self) -> str:
        return f"UnitGroup({self.name!r}, {self.kind}, units={self.shape})"

    @property
    def owner(self) -> PrunedLayer:
        return self.members[0].layer

    @property
    def scores(self) -> nn.Parameter | None:
        return self.owner.scores

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def weight(self) -> Tensor:  # device and dtype of the group, for selection
        return self.owner.weight

    def magnitudes(self) -> Tensor:
        """L2 norm of each unit's weights over every member (magnitude pruning's importance)."""
        total = None
        for member in self.members:
            part = member.layout.reduce_squares(member.layer.weight)
            total = part if total is None else total + part
        return total.sqrt_().to(self.weight.dtype).view(self.shape)

    def mask_buffer(self) -> Tensor:
        if self._mask_buffer is None or self._mask_buffer.device != self.weight.device:
            self._mask_buffer = torch.empty(self.shape, dtype=torch.bool,
                                            device=self.weight.device)
        return self._mask_buffer

    def set_mask(self, mask: Tensor | None) -> None:
        if mask is not None and mask is not self._mask_buffer:
            self.mask_buffer().copy_(mask.view(self.shape))
            mask = self._mask_buffer
        self.mask = mask
        for member in self.members:
            member.layer.mask = None  # members read the group's mask


def _head_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for m in [model, *model.modules()] if config is None else [model]:
        config = getattr(m, "config", None)
        if config is not None:
            break
    for name in HEAD_COUNT_FIELDS:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _specs(policy: PruningPolicy, modules: dict[str, nn.Module]
           ) -> tuple[str, list[UnitGroupSpec]]:
    kinds = {"neurons": ("neurons",), "heads": ("heads",),
             "hybrid": ("heads", "neurons")}[policy.structure]
    if policy.unit_groups is not None:
        specs = [g for g in policy.unit_groups if g.kind in kinds]
        return "the policy's unit_groups", specs
    for family, specs in FAMILIES.items():
        if any(name.endswith("." + specs[0].rows[0]) or name == specs[0].rows[0]
               for name in modules):
            return family, [g for g in specs if g.kind in kinds]
    shown = ", ".join(repr(n) for n in list(modules)[:8])
    raise TargetingError(
        f"structure {policy.structure!r} needs to know which modules share a head's or a "
        f"neuron's weights, and this model is none of the known families ({', '.join(FAMILIES)}"
        f"). Fix: name them in the policy, relative to a repeated block, e.g. unit_groups: "
        "[{kind: neurons, rows: ['mlp.fc1'], columns: ['mlp.fc2']}, {kind: heads, rows: "
        "['attn.q', 'attn.k', 'attn.v'], columns: ['attn.proj'], units: 12}]. Its Linear "
        f"modules: {shown}.")


def find_unit_groups(model: nn.Module, policy: PruningPolicy,
                     targets: list[tuple[str, nn.Linear]],
                     layers: dict[str, PrunedLayer]) -> list[UnitGroup]:
    """The unit groups of ``model`` for ``policy.structure`` among the targeted Linears."""
    if policy.structure == "blocks":
        r, c = policy.block_shape  # type: ignore[misc]
        groups = []
        for name, module in targets:
            out, inp = module.weight.shape
            layout = Layout(axis=-1, block=(r, c), shape=(out, inp))
            groups.append(UnitGroup(name, "blocks", (math.ceil(out / r), math.ceil(inp / c)),
                                     [Member(layers[name], layout)]))
        return groups
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targeted = dict(targets)
    source, specs = _specs(policy, linears)
    groups: list[UnitGroup] = []
    for spec in specs:
        first = spec.rows[0]
        prefixes = [name[:len(name) - len(first)] for name in linears
                    if name == first or name.endswith("." + first)]
        for prefix in prefixes:
            names = [prefix + n for n in (*spec.rows, *spec.columns)]
            missing = [n for n in names if n not in linears]
            if missing:
                raise TargetingError(f"{source}: block {prefix!r} has no Linear {missing[0]!r} "
                                     f"for its {spec.kind}. Fix: name the modules of each block "
                                     "in unit_groups.")
            chosen = [n for n in names if n in targeted]
            if not chosen:
                continue  # the whole group is excluded
            if len(chosen) < len(names):
                left = sorted(set(names) - set(chosen))
                raise TargetingError(
                    f"the {spec.kind} of block {prefix!r} tie {names}, but {left} are not "
                    "targeted (targets/exclude): a unit is pruned in all its modules or none. "
                    "Fix: target all of them, or none.")
            units = spec.units or (_head_count(model) if spec.kind == "heads"
                                   else linears[names[0]].out_features)
            if units is None:
                raise TargetingError(f"{source}: how many heads does block {prefix!r} have? "
                                     "Fix: give units in unit_groups.")
            members = []
            for n in names:
                module = linears[n]
                axis = 0 if n in (prefix + r for r in spec.rows) else 1
                dim = module.out_features if axis == 0 else module.in_features
                if dim % units:
                    raise TargetingError(f"{n!r} has {dim} {'rows' if axis == 0 else 'columns'}, "
                                         f"not a multiple of the {units} {spec.kind} of its "
                                         "block. Fix: set units in unit_groups.")
                shape = getattr(module.weight, "ds_shape", module.weight.shape)  # ZeRO-3
                members.append(Member(layers[n], Layout(axis=axis, size=dim // units,
                                                        shape=tuple(shape))))
            groups.append(UnitGroup(names[0], spec.kind, (units,), members))
    order = {name: i for i, name in enumerate(linears)}
    groups.sort(key=lambda group: order[group.name])  # model order: block by block
    if not groups:
        raise TargetingError(f"structure {policy.structure!r}: none of the targeted modules "
                             f"forms a unit group ({source}). Fix: check targets/exclude, or "
                             "name the groups in unit_groups.")
    return groups


# -- shrinking ------------------------------------------------------------------------------------

def _resize(module: nn.Linear, rows: Tensor | None, cols: Tensor | None) -> None:
    """Keep only ``rows`` (output units) and ``cols`` (input units) of a Linear, in place."""
    with torch.no_grad():
        w = module.weight
        if rows is not None:
            w = w[rows]
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias[rows].clone(),
                                           requires_grad=module.bias.requires_grad)
        if cols is not None:
            w = w[:, cols]
        module.weight = nn.Parameter(w.clone(), requires_grad=module.weight.requires_grad)
    module.out_features, module.in_features = module.weight.shape


_HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads")


def shrink_groups(model: nn.Module, groups: list[UnitGroup]) -> dict[str, list[int]]:
    """Remove the pruned heads and neurons of ``groups`` from ``model``: smaller Linears, the
    same outputs. A group with no unit left keeps one, its output columns zero. Returns the new
    shape of every resized Linear, by name."""
    names = {id(m): n for n, m in model.named_modules()}
    shapes: dict[str, list[int]] = {}
    for group in groups:
        if group.kind == "blocks" or group.mask is None:
            continue
        keep = group.mask.nonzero().view(-1)
        empty = keep.numel() == 0
        if empty:
            keep = torch.zeros(1, dtype=torch.long, device=group.mask.device)
        for member in group.members:
            module, layout = member.layer.module, member.layout
            index = (keep.view(-1, 1) * layout.size
                     + torch.arange(layout.size, device=keep.device)).view(-1)
            _resize(module, index if layout.axis == 0 else None,
                    index if layout.axis == 1 else None)
            if empty and layout.axis == 1:
                with torch.no_grad():
                    module.weight.zero_()
            shapes[names[id(module)]] = list(module.weight.shape)
        if group.kind == "heads":
            _set_head_counts(model, group, keep.numel(), names)
    return shapes


def _set_head_counts(model: nn.Module, group: UnitGroup, units_left: int,
                     names: dict[int, str]) -> None:
    """Keep the attention module's own head counts in line (the forwards of the supported
    families infer heads from shapes; these attributes are for other code that reads them)."""
    owner = names[id(group.owner.module)]
    parent_name = owner.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name) if parent_name != owner else None
    for module in (parent, getattr(parent, "self", None)):
        if module is None:
            continue
        for attr in _HEAD_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value % group.shape[0] == 0:
                setattr(module, attr, value // group.shape[0] * units_left)
        size = getattr(module, "attention_head_size", None)
        if isinstance(getattr(module, "all_head_size", None), int) and isinstance(size, int):
            module.all_head_size = size * getattr(module, "num_attention_heads", units_left)


def load_shrunk(folder: str | Path, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved after ``finalize(model, shrink=True)``: Hugging Face's own
    ``from_pretrained`` (key conversions, dtype, device placement included), its Linears resized
    as recorded in the config (``prune_plugin_shapes``) right after the model is built.
    ``model_class`` defaults to the config's architecture; the result is an instance of it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    shapes = getattr(config, SHAPES_KEY, None) or {}
    if model_class is None:
        model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    if not shapes:
        return model_class.from_pretrained(folder, **kwargs)

    def init_then_resize(self: nn.Module, config: Any, *args: Any, **kw: Any) -> None:
        model_class.__init__(self, config, *args, **kw)
        for name, shape in shapes.items():
            module = self.get_submodule(name)
            module.weight = nn.Parameter(module.weight.new_empty(shape))
            if module.bias is not None and module.bias.shape[0] != shape[0]:
                module.bias = nn.Parameter(module.bias.new_empty(shape[0]))
            module.out_features, module.in_features = shape

    shrunk = type(model_class.__name__, (model_class,), {"__init__": init_then_resize})
    model = shrunk.from_pretrained(folder, **kwargs)
    model.__class__ = model_class  # a stock instance, only its Linears smaller
    return model


def record_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Write the resized Linears' shapes into the model's config (saved by save_pretrained)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    recorded = dict(getattr(config, SHAPES_KEY, None) or {})
    recorded.update(shapes)
    setattr(config, SHAPES_KEY, json.loads(json.dumps(recorded)))
