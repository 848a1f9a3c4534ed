"""Structured pruning: units that share one score, and physically removing pruned ones.

A *unit* is what one score decides as a whole: an attention head (the rows of its query, key
and value projections and the columns of the output projection), an FFN neuron (a row of the
up-projection and the column of the down-projection), or a block of one matrix. A
:class:`UnitGroup` holds the units of one Transformer block's attention or FFN (or one matrix's
blocks): one score vector, one mask over units, and the member layers with how each maps units
onto its weight (:class:`Layout`, fused projections included). Because every member of a unit
goes at once, pruned heads and neurons can be removed (:func:`shrink_groups`), which is what
makes a model faster with standard kernels.

Which modules tie is architecture knowledge, in :mod:`prune_plugin.families`; a policy can
name the groups of any other model (``unit_groups``), checked against the module shapes here.
Layouts work on the weight as stored: GPT-2's ``Conv1D`` keeps ``[in, out]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from prune_plugin.distributed import is_dtensor, is_zero_sharded_now, zero_slice
from prune_plugin.errors import AttachError, TargetingError
from prune_plugin.families import (FAMILIES, Family, find_family, fused_head_dim,
                                   unit_lines, unknown_family)
from prune_plugin.policy import PruningPolicy, UnitGroupSpec
from prune_plugin.targeting import (bias_of, is_transposed, linear_dims, prunable_modules,
                                    weight_of)

if TYPE_CHECKING:
    from prune_plugin.hooks import PrunedLayer

#: Config fields holding the number of heads units are counted in (key/value heads first:
#: with grouped-query attention a unit is one key/value head and its query heads).
HEAD_COUNT_FIELDS = ("num_key_value_heads", "num_kv_heads", "num_attention_heads", "n_heads",
                     "n_head")
#: Head-count attributes rescaled on the attention module of a user's unit_groups.
GENERIC_HEAD_COUNTS = ("num_attention_heads", "n_heads", "n_head", "num_heads",
                       "num_key_value_heads", "num_kv_heads", "all_head_size", "split_size")
SHAPES_KEY = "prune_plugin_shapes"
ATTRIBUTES_KEY = "prune_plugin_attributes"


@dataclass(frozen=True)
class Layout:
    """How a unit vector (or block matrix) maps onto one member's stored weight: along ``axis``
    (0: the weight's first dimension, 1: its second), ``size`` consecutive lines per unit, or
    the unit of each line (``unit_of``: a fused projection; ``units`` marks lines no unit owns),
    or 2-D blocks of ``block``. ``output``: the axis holds the layer's outputs."""

    axis: int
    size: int = 1
    block: tuple[int, int] | None = None
    shape: tuple[int, int] = (0, 0)  # the member's weight shape, as stored
    output: bool = True
    units: int = 0
    unit_of: Tensor | None = field(default=None, compare=False, repr=False)
    _on_device: dict[torch.device, Tensor] = field(default_factory=dict, compare=False,
                                                   repr=False)

    def _unit_of(self, device: torch.device) -> Tensor:
        found = self._on_device.get(device)
        if found is None:
            found = self._on_device[device] = self.unit_of.to(device)  # type: ignore[union-attr]
        return found

    def _lines(self, units: Tensor) -> Tensor:
        """One value per line along the axis; lines no unit owns get 1 (kept; for scores the
        value does not matter: the forward does not read it)."""
        if self.unit_of is None:  # (one line per unit, as neurons: a view, no copy)
            flat = units.reshape(-1)
            return flat if self.size == 1 else flat.repeat_interleave(self.size)
        values = torch.cat([units.reshape(-1), units.new_ones(1)])
        return values.index_select(0, self._unit_of(units.device))

    def expand(self, units: Tensor) -> Tensor:
        """The unit tensor on the weight's grid: broadcastable [out, 1] / [1, in], or [out, in]
        for blocks."""
        if self.block is not None:
            r, c = self.block
            full = units.repeat_interleave(r, 0).repeat_interleave(c, 1)
            return full[:self.shape[0], :self.shape[1]]
        flat = self._lines(units)
        return flat.unsqueeze(1) if self.axis == 0 else flat.unsqueeze(0)

    def per_unit(self, along: Tensor) -> Tensor:
        """Sum one value per line into one per unit (lines no unit owns dropped)."""
        if self.unit_of is None:
            return along.view(-1, self.size).sum(1)
        out = along.new_zeros(self.units + 1)
        return out.index_add_(0, self._unit_of(along.device), along)[:self.units]

    def reduce(self, t: Tensor) -> Tensor:
        """Sum a weight-shaped tensor over each unit's elements."""
        if self.block is not None:
            r, c = self.block
            rows, cols = math.ceil(self.shape[0] / r), math.ceil(self.shape[1] / c)
            padded = t.new_zeros(rows * r, cols * c)
            padded[:self.shape[0], :self.shape[1]] = t
            return padded.view(rows, r, cols, c).sum((1, 3))
        return self.per_unit(t.sum(1 - self.axis))

    def kept_lines(self, keep: Tensor) -> Tensor:
        """The indices along the axis of the kept units' lines (and the shared ones), in their
        order: a fused projection keeps its layout, with fewer heads or neurons."""
        if self.unit_of is None:
            return (keep.view(-1, 1) * self.size
                    + torch.arange(self.size, device=keep.device)).view(-1)
        kept = torch.zeros(self.units + 1, dtype=torch.bool, device=keep.device)
        kept[keep] = True
        kept[-1] = True
        return kept[self._unit_of(keep.device)].nonzero().view(-1)

    def reduce_squares(self, weight: Any) -> Tensor:
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
        return self.per_unit(along)

    def _reduce_zero_squares(self, weight: Any) -> Tensor:
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
        return self.per_unit(along)


@dataclass
class Member:
    """One Linear of a unit group, and how the group's units lie on its weight."""

    layer: PrunedLayer
    layout: Layout


class UnitGroup:
    """The units of one block (heads or neurons) or one matrix (blocks): a shared score vector,
    a mask over units, and the member Linears. Selection treats it like a layer with
    ``numel`` units."""

    def __init__(self, name: str, kind: str, units: tuple[int, ...], members: list[Member],
                 family: Family | None = None) -> None:
        self.name = name  # the first member's module name: where the scores are registered
        self.kind = kind
        self.shape = units
        self.members = members
        self.family = family  # None: the policy's unit_groups (or blocks)
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

    ranks_abs_weight = False  # magnitude pruning ranks unit norms

    def magnitudes(self) -> Tensor:
        """L2 norm of each unit's weights over every member (magnitude pruning's importance)."""
        parts = [member.layout.reduce_squares(member.layer.weight) for member in self.members]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total.sqrt_().to(self.weight.dtype).view(self.shape)

    def mask_buffer(self) -> Tensor:
        if self._mask_buffer is None or self._mask_buffer.device != self.weight.device:
            self._mask_buffer = torch.empty(self.shape, dtype=torch.bool,
                                            device=self.weight.device)
        return self._mask_buffer

    def use_mask_buffer(self, buffer: Tensor) -> None:
        self._mask_buffer = buffer

    def set_mask(self, mask: Tensor | None) -> None:
        if mask is not None and mask is not self._mask_buffer:
            self.mask_buffer().copy_(mask.view(self.shape))
            mask = self._mask_buffer
        self.mask = mask
        for member in self.members:
            member.layer.mask = None  # members read the group's mask


def _config(model: nn.Module) -> Any:
    for m in (model, *model.modules()):
        config = getattr(m, "config", None)
        if config is not None:
            return config
    return None


def _config_count(config: Any, fields: tuple[str, ...]) -> int | None:
    for name in fields:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def _specs(policy: PruningPolicy, modules: dict[str, nn.Module], config: Any
           ) -> tuple[str, Family | None, list[UnitGroupSpec]]:
    kinds = {"neurons": ("neurons",), "heads": ("heads",),
             "hybrid": ("heads", "neurons")}[policy.structure]
    if policy.unit_groups is not None:  # a known model type still says how to shrink it
        model_type = getattr(config, "model_type", None)
        family = next((f for f in FAMILIES if model_type in f.model_types), None)
        return "the policy's unit_groups", family, [g for g in policy.unit_groups
                                                     if g.kind in kinds]
    found = find_family(set(modules), config, kinds)
    if found is None:
        shown = ", ".join(repr(n) for n in list(modules)[:8])
        raise unknown_family(shown)
    family, specs = found
    return f"the {family.name} family", family, [g for g in specs if g.kind in kinds]


#: Model types whose attention adds per-head biases built once for the model's head count.
ALIBI_MODEL_TYPES = ("bloom", "mpt")


def _refuse_alibi_heads(policy: PruningPolicy, config: Any) -> None:
    if policy.structure in ("heads", "hybrid") and (
            getattr(config, "alibi", False) is True
            or getattr(config, "model_type", None) in ALIBI_MODEL_TYPES):
        raise TargetingError(
            f"structure {policy.structure!r}: this model uses ALiBi, whose per-head biases are "
            "built once for the model's head count, so a layer with fewer heads cannot run. "
            "Fix: structure 'neurons', or 'unstructured'.")


def _plain_member(source: str, name: str, module: nn.Module, output: bool, units: int,
                  kind: str) -> Layout:
    dims = linear_dims(module)
    dim = dims[0 if output else 1]
    if dim % units:
        raise TargetingError(f"{source}: {name!r} has {dim} {'rows' if output else 'columns'}, "
                             f"not a multiple of the {units} {kind} of its block. Fix: set "
                             "units in unit_groups.")
    return Layout(axis=int(output == is_transposed(module)), size=dim // units,
                  shape=_stored_shape(module), output=output, units=units)


def _stored_shape(module: nn.Module) -> tuple[int, int]:
    weight = weight_of(module)
    return tuple(getattr(weight, "ds_shape", weight.shape))


def _block_members(source: str, spec: UnitGroupSpec, prefix: str, modules: dict[str, nn.Module],
                   units: int, query_heads: int, head_dim: int | None
                   ) -> list[tuple[str, Layout]]:
    """Each member of one block with its layout, checked: the members must split into the same
    units (a fused projection named as plain, or wrong units, is refused here, before any
    training: a shrink would change the outputs)."""
    laid: list[tuple[str, Layout]] = []
    for rel in (*spec.rows, *spec.columns):
        name, module = prefix + rel, modules[prefix + rel]
        output = rel in spec.rows
        fused = spec.fused.get(rel) if output else None
        if fused is None:
            laid.append((name, _plain_member(source, name, module, output, units, spec.kind)))
            continue
        lines = linear_dims(module)[0]
        try:
            owner = unit_lines(fused, lines, units, query_heads)
        except ValueError as e:
            raise TargetingError(
                f"{source}: {name!r} is declared fused as {fused!r}, but {e} ({units} units, "
                f"{query_heads} query heads). Fix: correct fused, units or query_heads in "
                "unit_groups.") from None
        laid.append((name, Layout(axis=int(is_transposed(module)), shape=_stored_shape(module),
                                  output=True, units=units, unit_of=owner)))
    _check_consistent(source, spec, prefix, laid, units, query_heads, head_dim)
    return laid


def _unit_width(spec: UnitGroupSpec, rel: str, layout: Layout, units: int,
                query_heads: int) -> int:
    """Lines of one unit's 'payload': a plain member's size; a fused qkv projection's query
    lines per unit; a halves projection's lines per neuron in each half."""
    fused = spec.fused.get(rel)
    if fused is None:
        return layout.size
    if fused == "halves":
        return 1
    lines = layout.shape[layout.axis]
    head_dim = fused_head_dim(fused, lines, units, query_heads)
    return head_dim if fused == "qkv_multi_query" else head_dim * (query_heads // units)


def _head_dim(config: Any) -> int | None:
    """The config's head size (``head_dim``, T5's ``d_kv``, else hidden size / heads)."""
    for name in ("head_dim", "d_kv"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0:
        return hidden // heads
    return None


def _check_consistent(source: str, spec: UnitGroupSpec, prefix: str,
                      laid: list[tuple[str, Layout]], units: int, query_heads: int,
                      head_dim: int | None) -> None:
    relative = [*spec.rows, *spec.columns]
    widths = {name: _unit_width(spec, rel, layout, units, query_heads)
              for rel, (name, layout) in zip(relative, laid, strict=True)}
    if spec.kind == "heads" and head_dim is not None:  # a unit holds whole heads
        for name, w in widths.items():
            if w % head_dim:
                raise TargetingError(
                    f"{source}: in block {prefix!r}, {name!r} has {w} lines per unit, not "
                    f"whole heads of {head_dim} (the config's head size): {units} units "
                    "cannot be this block's heads. Fix: set units to the number of key/value "
                    "heads (grouped-query attention: a unit is a key/value head with its "
                    "query heads), or query_heads.")
    column = prefix + spec.columns[0]
    width = widths[column]
    for name, w in widths.items():
        rel = name[len(prefix):]
        if spec.kind == "heads":  # query and value rows span a head, key/value ones may be a part
            ok = w == width if (rel in spec.columns or rel in spec.fused) else width % w == 0
        else:
            ok = w == width
        if ok:
            continue
        unit = spec.kind[:-1]
        fused_hint = "" if rel in spec.fused or rel in spec.columns else (
            f" ({name!r} looks fused: several projections in one matrix)")
        raise TargetingError(
            f"{source}: in block {prefix!r}, {name!r} has {w} lines per {unit} and {column!r} "
            f"{width}: they cannot hold the same {units} {spec.kind}{fused_hint}. Fix: describe "
            "a fused projection in unit_groups' fused (qkv_stacked, qkv_interleaved, "
            "qkv_grouped, qkv_multi_query, halves), or correct units/query_heads.")


def find_unit_groups(model: nn.Module, policy: PruningPolicy,
                     targets: list[tuple[str, nn.Module]],
                     layers: dict[str, PrunedLayer]) -> list[UnitGroup]:
    """The unit groups of ``model`` for ``policy.structure`` among the targeted layers."""
    groups: list[UnitGroup] = []
    if policy.structure == "blocks":
        for name, module in targets:
            r, c = policy.block_shape  # type: ignore[misc]
            if is_transposed(module):
                r, c = c, r
            shape = tuple(weight_of(module).shape)
            layout = Layout(axis=-1, block=(r, c), shape=shape)  # type: ignore[arg-type]
            groups.append(UnitGroup(name, "blocks", (math.ceil(shape[0] / r),
                                                     math.ceil(shape[1] / c)),
                                    [Member(layers[name], layout)]))
        return groups
    modules = prunable_modules(model)
    targeted = dict(targets)
    config = _config(model)
    _refuse_alibi_heads(policy, config)
    source, family, specs = _specs(policy, modules, config)
    for spec in specs:
        first = spec.rows[0]
        prefixes = [name[:len(name) - len(first)] for name in modules
                    if name == first or name.endswith("." + first)]
        for prefix in prefixes:
            names = [prefix + n for n in (*spec.rows, *spec.columns)]
            missing = [n for n in names if n not in modules]
            if missing:
                raise TargetingError(f"{source}: block {prefix!r} has no layer {missing[0]!r} "
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
            query_heads = spec.query_heads or _config_count(config, ("num_attention_heads",))
            units = spec.units
            if units is None and spec.kind == "heads":
                multi_query = "qkv_multi_query" in spec.fused.values()
                units = query_heads if multi_query else _config_count(config, HEAD_COUNT_FIELDS)
            elif units is None:
                units = linear_dims(modules[prefix + spec.columns[0]])[1]
            if units is None:
                raise TargetingError(f"{source}: how many heads does block {prefix!r} have? "
                                     "Fix: give units in unit_groups.")
            head_dim = None if spec.query_heads else _head_dim(config)
            laid = _block_members(source, spec, prefix, modules, units, query_heads or units,
                                  head_dim)
            members = [Member(layers[n], layout) for n, layout in laid]
            groups.append(UnitGroup(names[0], spec.kind, (units,), members, family))
    order = {name: i for i, name in enumerate(modules)}
    groups.sort(key=lambda group: order[group.name])  # model order: block by block
    if not groups:
        raise TargetingError(f"structure {policy.structure!r}: none of the targeted modules "
                             f"forms a unit group ({source}). Fix: check targets/exclude, or "
                             "name the groups in unit_groups.")
    return groups


# -- shrinking ------------------------------------------------------------------------------------

def _resize(module: nn.Module, index: Tensor, layout: Layout) -> None:
    """Keep only the lines ``index`` of the weight's ``layout.axis`` (the bias follows outputs),
    in place; the module's own size attributes follow."""
    weight, bias = weight_of(module), bias_of(module)
    with torch.no_grad():
        w = weight.index_select(layout.axis, index)
        if layout.output and bias is not None:
            module.bias = nn.Parameter(bias[index].clone(), requires_grad=bias.requires_grad)
        module.weight = nn.Parameter(w.clone(), requires_grad=weight.requires_grad)
    _set_sizes(module, tuple(w.shape))


def _set_sizes(module: nn.Module, shape: tuple[int, ...]) -> None:
    names = ("nx", "nf") if is_transposed(module) else ("out_features", "in_features")
    for name, size in zip(names, shape):  # (transformers' Conv1D: weight [nx, nf])
        setattr(module, name, size)


def shrink_groups(model: nn.Module, groups: list[UnitGroup]
                  ) -> tuple[dict[str, list[int]], dict[str, dict[str, int]]]:
    """Remove the pruned heads and neurons of ``groups`` from ``model``: smaller layers, the
    same outputs. A group with no unit left keeps one, its output columns zero. Returns the new
    shape of every resized layer and the attention modules' rescaled head counts, by name."""
    names = {id(m): n for n, m in model.named_modules()}
    shapes: dict[str, list[int]] = {}
    attributes: dict[str, dict[str, int]] = {}
    kept_in_place = []
    for group in groups:
        if group.kind == "blocks" or group.mask is None:
            continue
        if group.kind == "heads" and group.family is not None \
                and not group.family.removable_heads:
            kept_in_place.append(group.name)
            continue
        keep = group.mask.nonzero().view(-1)
        empty = keep.numel() == 0
        if empty:
            keep = torch.zeros(1, dtype=torch.long, device=group.mask.device)
        for member in group.members:
            module, layout = member.layer.module, member.layout
            _resize(module, layout.kept_lines(keep), layout)
            if empty and not layout.output:
                with torch.no_grad():
                    weight_of(module).zero_()
            shapes[names[id(module)]] = list(weight_of(module).shape)
        if group.kind == "heads":
            attributes.update(_set_head_counts(model, group, keep.numel(), names))
    if kept_in_place:
        import warnings

        family = groups[0].family.name if groups[0].family else ""
        warnings.warn(f"shrink: the {family} layers share one position bias across a stack, so "
                      f"the pruned heads of {len(kept_in_place)} attention modules stay in place "
                      "(their weights zero, the outputs unchanged); neurons were removed.",
                      stacklevel=3)
    return shapes, attributes


def _set_head_counts(model: nn.Module, group: UnitGroup, units_left: int,
                     names: dict[int, str]) -> dict[str, dict[str, int]]:
    """Rescale the attention module's head counts (its forward reshapes by them): each
    attribute that counts the group's units (a multiple of them) becomes that many per unit
    left. Returns {module name: {attribute path: value}}."""
    owner = names[id(group.owner.module)]
    parent_name = owner.rsplit(".", 1)[0] if "." in owner else ""
    parent = model.get_submodule(parent_name)
    paths = group.family.head_counts if group.family is not None else GENERIC_HEAD_COUNTS
    changed: dict[str, int] = {}
    units = group.shape[0]
    for path in paths:
        value = _get_path(parent, path)
        if isinstance(value, int) and not isinstance(value, bool) and value % units == 0:
            changed[path] = value // units * units_left
    if group.family is not None:
        changed.update(derived_counts(parent, group.family.derived_counts, changed))
    apply_attributes(parent, changed)
    return {parent_name: changed} if changed else {}


def derived_counts(module: Any, derived: Iterable[tuple[str, str, str]],
                   changed: dict[str, int]) -> dict[str, int]:
    """The derived counts (:attr:`Family.derived_counts`) that ``module`` has, from its counts
    once ``changed`` is set."""
    out = {}
    for name, num, den in derived:
        now = {path: changed.get(path, _get_path(module, path)) for path in (name, num, den)}
        if all(isinstance(v, int) and not isinstance(v, bool) for v in now.values()):
            out[name] = now[num] // now[den]
    return out


def _get_path(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


class ConfigOverlay:
    """One layer's view of the model's shared config with its own head counts: every other
    field is read from (and written to) the shared config, so later changes to it (the
    attention implementation, say) still reach the layer."""

    def __init__(self, base: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_base", "_own"):  # copy and pickle probes
            raise AttributeError(name)
        own = self.__dict__["_own"]
        return own[name] if name in own else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_own"]:
            self.__dict__["_own"][name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def own(self, name: str, value: Any) -> None:
        self.__dict__["_own"][name] = value


def apply_attributes(module: nn.Module, changed: dict[str, int]) -> None:
    """Set ``changed`` (attribute paths) on ``module``. A ``config.`` path gives the module a
    :class:`ConfigOverlay` of the shared config with that count, so other layers keep
    theirs."""
    for path, value in changed.items():
        parts = path.split(".")
        if parts[0] == "config" and len(parts) == 2:
            overlay: Any = module.config
            if not isinstance(overlay, ConfigOverlay):
                overlay = ConfigOverlay(overlay)
                module.config = overlay
            overlay.own(parts[1], value)
            continue
        target: Any = module
        for part in parts[:-1]:
            target = getattr(target, part)
        setattr(target, parts[-1], value)


def resize_as_recorded(model: nn.Module, shapes: dict[str, list[int]],
                       attributes: dict[str, dict[str, int]]) -> None:
    """Give a freshly built model the recorded layer shapes and head counts (the weights are
    loaded after)."""
    for name, shape in shapes.items():
        module = model.get_submodule(name)
        module.weight = nn.Parameter(weight_of(module).new_empty(shape))
        out = shape[1] if is_transposed(module) else shape[0]
        bias = bias_of(module)
        if bias is not None and bias.shape[0] != out:
            module.bias = nn.Parameter(bias.new_empty(out))
        _set_sizes(module, tuple(shape))
    every_derived = [d for family in FAMILIES for d in family.derived_counts]
    for name, changed in attributes.items():
        module = model.get_submodule(name)  # (a file written before a count was derived too)
        apply_attributes(module, {**changed, **derived_counts(module, every_derived, changed)})


def record_shapes(model: nn.Module, shapes: dict[str, list[int]],
                  attributes: dict[str, dict[str, int]]) -> None:
    """Write the resized layers' shapes and head counts into the model's config (saved by
    save_pretrained)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for key, new in ((SHAPES_KEY, shapes), (ATTRIBUTES_KEY, attributes)):
        recorded = dict(getattr(config, key, None) or {})
        recorded.update(new)
        setattr(config, key, json.loads(json.dumps(recorded)))
