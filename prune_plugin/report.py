"""`sparsity_report`: remaining weights per pruned layer and in total.

Totals are given two ways: over the pruned layers' weights, and the paper's way
(``counts_parameters.py`` of the original code): over every parameter under a scope (default:
the pruned layers' common parent, e.g. ``bert.encoder``), with biases, norms and unpruned
weights counted as remaining.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_plugin.hooks import SCORES_NAME
from prune_plugin.policy import PruningPolicy
from prune_plugin.pruner import get_pruner
from prune_plugin.targeting import find_targets


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
            layers = [LayerSparsity(n, int(torch.count_nonzero(m.weight)), m.weight.numel())
                      for n, m in targets]
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


def plot_sparsity(report: dict[str, Any], path: Path, title: str) -> None:
    """What a run did, as a PNG (needs matplotlib): the remaining fraction and the training
    loss over the steps (when ``report`` has a ``history``: the job records one), the
    remaining weights per layer grouped by block (the paper's Figure 6; when every layer keeps
    the same share, as local Top-v does, one line says so instead of identical bars), and the
    heads and neurons kept per block (structured runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    values = [100 * lay["remaining"] for lay in layers]
    history = report.get("history") or []
    units = report.get("units") or []
    uniform = bool(values) and max(values) - min(values) < 0.05
    panels = [p for p, on in (("history", bool(history)), ("layers", not uniform),
                              ("units", bool(units))) if on] or ["layers"]
    heights = {"history": 3.0, "layers": 3.6, "units": 2.8}
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 0.22 * len(layers) if "layers" in panels
                                          else 6.0), sum(heights[p] for p in panels) + 0.4))
    summary = f"{100 * report['remaining']:.2f}% of pruned weights remain"
    if uniform:
        summary += f"; every pruned layer keeps {values[0]:.2f}%"
    fig.suptitle(f"{title}\n{summary}", fontsize=9)
    for ax, panel in zip((row[0] for row in axes), panels):
        {"history": _plot_history, "layers": _plot_layers, "units": _plot_units}[panel](
            ax, report, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_history(ax: Any, report: dict[str, Any], plt: Any) -> None:
    history = report["history"]
    kept = [(h["step"], 100 * h["remaining"]) for h in history if h.get("remaining") is not None]
    if kept:
        ax.plot(*zip(*kept), color="C0", label="remaining")
    ax.set_ylabel("remaining weights (%)", color="C0")
    ax.set_xlabel("step")
    losses = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses), color="C1", label="training loss")
        twin.set_ylabel("training loss", color="C1")
    ax.set_title("over the run", fontsize=9)


def _plot_layers(ax: Any, report: dict[str, Any], plt: Any) -> None:
    layers = report["layers"]
    names = [lay["name"] for lay in layers]
    # the module's role inside its block: "attention.self.query", "output.dense", ...
    kinds = [n.split(".layer.")[-1].split(".", 1)[-1] if ".layer." in n else n for n in names]
    palette: dict[str, str] = {}
    colors = [palette.setdefault(k, f"C{len(palette) % 10}") for k in kinds]
    ax.bar(range(len(layers)), [100 * lay["remaining"] for lay in layers], color=colors)
    ax.set_ylabel("remaining weights (%)")
    ax.set_xlabel("pruned layer (model order)")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.split(".layer.")[-1] if ".layer." in n else n for n in names],
                       rotation=90, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()]
    ax.legend(handles, list(palette), fontsize=6, ncol=3, loc="lower left",
              bbox_to_anchor=(0.0, 1.02), frameon=False)


def _plot_units(ax: Any, report: dict[str, Any], plt: Any) -> None:
    units = report["units"]
    blocks = list(dict.fromkeys(u["name"] for u in units))
    kinds = list(dict.fromkeys(u["kind"] for u in units))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        of_kind = {u["name"]: u for u in units if u["kind"] == kind}
        xs = [b + i * width for b, name in enumerate(blocks) if name in of_kind]
        kept = [of_kind[name] for name in blocks if name in of_kind]
        ax.bar(xs, [100 * u["kept"] / u["total"] for u in kept], width=width,
               color=f"C{i}", label=f"{kind} (of {kept[0]['total']})")
    ax.set_ylabel("units kept (%)")
    ax.set_xticks([b + 0.4 - width / 2 for b in range(len(blocks))])
    ax.set_xticklabels([b.split(".layer.")[-1].split(".layers.")[-1] for b in blocks],
                       fontsize=7)
    ax.set_xlabel("block")
    ax.legend(fontsize=7)
