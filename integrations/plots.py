"""The picture of a run: ``sparsity.png`` of the fine-pruning job and ``prune-plugin report``
(needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
