"""`sparsity_report`: remaining weights per pruned layer and in total.

Totals are given two ways: over the pruned layers' weights, and the paper's way
(``counts_parameters.py`` of the original code): over every parameter under a scope (default:
the pruned layers' common parent, e.g. ``bert.encoder``), with biases, norms and unpruned
weights counted as remaining.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prune_plugin.hooks import SCORES_NAME
from prune_plugin.policy import PruningPolicy
from prune_plugin.pruner import get_pruner
from prune_plugin.targeting import find_targets, weight_of


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    kept: int
    total: int

    @property
    def remaining(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass(frozen=True)
class UnitSparsity:
    """Structured pruning: the heads or neurons (or blocks) one block keeps."""

    name: str
    kind: str
    kept: int
    total: int


@dataclass(frozen=True)
class SparsityReport:
    layers: list[LayerSparsity]
    scope: str
    scope_kept: int
    scope_total: int
    units: list[UnitSparsity] = field(default_factory=list)
    kept: int = field(init=False)
    total: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kept", sum(lay.kept for lay in self.layers))
        object.__setattr__(self, "total", sum(lay.total for lay in self.layers))

    @property
    def remaining(self) -> float:
        """Fraction of the pruned layers' weights kept."""
        return self.kept / self.total if self.total else 1.0

    @property
    def scope_remaining(self) -> float:
        """The paper's count: fraction of all parameters under ``scope`` remaining."""
        return self.scope_kept / self.scope_total if self.scope_total else 1.0

    def as_dict(self) -> dict:
        return {
            "layers": [{**asdict(lay), "remaining": lay.remaining} for lay in self.layers],
            "kept": self.kept, "total": self.total, "remaining": self.remaining,
            "scope": self.scope, "scope_kept": self.scope_kept,
            "scope_total": self.scope_total, "scope_remaining": self.scope_remaining,
            "units": [asdict(u) for u in self.units],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SparsityReport:
        """The inverse of ``as_dict`` (e.g. a run's sparsity.json)."""
        return cls([LayerSparsity(d["name"], d["kept"], d["total"]) for d in data["layers"]],
                   data["scope"], data["scope_kept"], data["scope_total"],
                   [UnitSparsity(**u) for u in data.get("units", [])])

    def __str__(self) -> str:
        width = max([len(lay.name) for lay in self.layers] + [24])
        rows = [f"{'layer':<{width}} {'kept':>10} {'total':>10} {'remaining':>9}"]
        rows += [f"{lay.name:<{width}} {lay.kept:>10} {lay.total:>10} {lay.remaining:>9.2%}"
                 for lay in self.layers]
        rows.append(f"{f'pruned layers ({len(self.layers)})':<{width}} {self.kept:>10} "
                    f"{self.total:>10} {self.remaining:>9.2%}")
        rows.append(f"{(self.scope or '(model)') + ' (all params)':<{width}} {self.scope_kept:>10} "
                    f"{self.scope_total:>10} {self.scope_remaining:>9.2%}")
        if self.units:
            rows.append("")
            rows.append(f"{'units':<{width}} {'kept':>10} {'total':>10} {'remaining':>9}")
            rows += [f"{u.name + ' ' + u.kind:<{width}} {u.kept:>10} {u.total:>10} "
                     f"{u.kept / u.total:>9.2%}" for u in self.units]
        return "\n".join(rows)


def _common_parent(names: list[str]) -> str:
    parents = [n.split(".")[:-1] for n in names]
    prefix = os.path.commonprefix(parents) if parents else []
    return ".".join(prefix)


def sparsity_report(model: nn.Module, *, scope: str | None = None,
                    policy: PruningPolicy | None = None) -> SparsityReport:
    """Remaining weights of ``model``.

    Attached models (also through wrappers such as ``torch.compile``) report their masks (L0:
    evaluation gates above 0); with ZeRO-3-sharded scores this is a collective, to call on
    every rank. Plain (finalized) models report the non-zero weights of the Linears ``policy``
    targets (default: every Linear but the output heads).
    """
    pruner = get_pruner(model)
    modules: dict[str, nn.Module]
    units: list[UnitSparsity] = []
    if pruner is not None:
        layers = [LayerSparsity(lay.name, kept, lay.numel)
                  for lay, kept in zip(pruner.layers, pruner.kept_counts())]
        units = [UnitSparsity(_common_parent([m.layer.name for m in g.members]) or g.name,
                              g.kind, kept, g.numel)
                 for g, kept in zip(pruner.units, pruner.unit_counts())]
        modules = {lay.name: lay.module for lay in pruner.layers}
        model = pruner.model  # names are relative to the attached model
    else:
        policy = policy or PruningPolicy(method="magnitude", total_steps=1)
        targets = find_targets(model, policy)
        with torch.no_grad():
            layers = [LayerSparsity(n, int(torch.count_nonzero(weight_of(m))),
                                    weight_of(m).numel()) for n, m in targets]
        modules = dict(targets)
    scope = _common_parent(list(modules)) if scope is None else scope
    kept_by_weight = {id(modules[lay.name].weight): lay.kept for lay in layers}
    scope_kept = scope_total = 0
    prefix = scope + "." if scope else ""
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or name.endswith("." + SCORES_NAME):
            continue
        numel = getattr(p, "ds_numel", p.numel())  # ZeRO-3 holds only a shard
        scope_total += numel
        scope_kept += kept_by_weight.get(id(p), numel)
    return SparsityReport(layers, scope, scope_kept, scope_total, units)
