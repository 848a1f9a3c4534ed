"""Save and load the pruning state alone: one safetensors file, keyed by module name.

Tensors ``<module>.scores`` and ``<module>.mask``; the header's metadata holds the format
version, the step, the layer list and the policy JSON. The file is written to a temporary
name and renamed, so a crash never leaves a half-written checkpoint. The format is written
here (it is a length-prefixed JSON header and raw little-endian bytes) to keep the core's
dependencies at torch and pydantic; the `safetensors` library reads these files.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from prune_plugin.errors import StateError
from prune_plugin.optimizer import (PruningOptimizer, apply_pruning_state, check_pruning_state)

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
           torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (row-major)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes() \
        if t.numel() else b""


def bytes_tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor over a fresh copy of ``data`` (writable, owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format, atomically."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    blobs, offset = [], 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store {name!r} of dtype {t.dtype} in safetensors")
        data = tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (tensors, metadata)."""
    raw = Path(path).read_bytes()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
    except (struct.error, ValueError) as err:
        raise StateError(f"{path} is not a safetensors file ({err}).") from None
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = _FROM_NAME[info["dtype"]]
        if end > start:
            tensors[name] = bytes_tensor(raw[base + start:base + end]).view(dtype).reshape(
                info["shape"])
        else:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
    return tensors, metadata


def save_pruning_state(optimizer: PruningOptimizer, path: str | Path) -> Path:
    """Write the optimizer's pruning state (step, policy, scores, masks) to ``path``."""
    state = optimizer.pruning_state_dict()
    tensors = {f"{name}.scores": t for name, t in state["scores"].items()}
    tensors |= {f"{name}.mask": t for name, t in state["masks"].items()}
    metadata = {"format_version": str(state["format_version"]), "step": str(state["step"]),
                "policy": state["policy"], "layers": json.dumps(state["layers"])}
    write_safetensors(path, tensors, metadata)
    return Path(path)


def read_pruning_state(path: str | Path) -> dict[str, Any]:
    """The pruning state stored at ``path``, shaped like ``pruning_state_dict()``."""
    if not Path(path).is_file():
        raise StateError(f"no pruning state at {str(path)!r}.")
    tensors, meta = read_safetensors(path)
    try:
        layers = json.loads(meta["layers"])
        state = {"format_version": int(meta["format_version"]), "step": int(meta["step"]),
                 "policy": meta["policy"], "layers": layers, "scores": {}, "masks": {}}
    except (KeyError, ValueError) as err:
        raise StateError(f"{path} is not a prune_plugin state file (metadata {err}).") from None
    for key, t in tensors.items():
        name, _, kind = key.rpartition(".")
        state["scores" if kind == "scores" else "masks"][name] = t
    return state


def load_pruning_state(optimizer: PruningOptimizer, path: str | Path) -> None:
    """Restore step, scores and masks from ``path``; refuses (changing nothing) on mismatch."""
    state = read_pruning_state(path)
    check_pruning_state(optimizer.attachment, state)
    apply_pruning_state(optimizer.attachment, state)
    optimizer.step_count = state["step"]
