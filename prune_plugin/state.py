"""Save and load a pruning run's state alone: one verified safetensors file.

Tensors ``<module>.scores`` and ``<module>.mask``, keyed by module name; the metadata holds the
format version, the step, the layer list, the policy JSON and a checksum of every tensor
(:mod:`prune_plugin.storage`). The write is atomic; a file that does not fit the run it is
loaded into, or that is damaged, is refused and nothing changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune_plugin.errors import StateError
from prune_plugin.pruner import as_pruner
from prune_plugin.storage import read_safetensors, write_safetensors

WHAT = "prune_plugin state file"


def save_pruning_state(run: Any, path: str | Path) -> Path:
    """Write the pruning state (step, policy, scores, masks) of ``run`` (a PruningOptimizer, a
    Pruner, or an attached model) to ``path``."""
    state = as_pruner(run).state_dict()
    tensors = {f"{name}.scores": t for name, t in state["scores"].items()}
    tensors |= {f"{name}.mask": t for name, t in state["masks"].items()}
    metadata = {"format_version": str(state["format_version"]), "step": str(state["step"]),
                "policy": state["policy"], "layers": json.dumps(state["layers"])}
    return write_safetensors(path, tensors, metadata)


def read_pruning_state(path: str | Path) -> dict[str, Any]:
    """The pruning state stored at ``path``, shaped like ``Pruner.state_dict()``."""
    tensors, meta = read_safetensors(path, what=WHAT)
    try:
        layers = json.loads(meta["layers"])
        state = {"format_version": int(meta["format_version"]), "step": int(meta["step"]),
                 "policy": meta["policy"], "layers": layers, "scores": {}, "masks": {}}
    except (KeyError, ValueError) as err:
        raise StateError(f"{path} is not a {WHAT} (metadata {err}).") from None
    for key, t in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in ("scores", "mask"):
            raise StateError(f"{path} is not a {WHAT} (unexpected tensor {key!r}).")
        state["scores" if kind == "scores" else "masks"][name] = t
    return state


def load_pruning_state(run: Any, path: str | Path) -> None:
    """Restore step, scores and masks from ``path`` into ``run`` (a PruningOptimizer, a Pruner
    or an attached model); refuses (changing nothing) on mismatch or damage."""
    as_pruner(run).load_state_dict(read_pruning_state(path))
