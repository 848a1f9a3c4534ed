"""Verified, atomic safetensors files: how the plugin writes every tensor file of its own.

- **Verified**: the header's metadata holds a SHA-256 of every tensor's bytes; reading checks
  each one, so a flipped byte is an error naming the file and the tensor, never wrong numbers.
- **Atomic**: a file (or folder) is written under a temporary name, flushed to disk and
  renamed over the target, so a crash leaves the old one or the new one, never half of one.

The format is plain safetensors (the ``safetensors`` library writes and reads it), so any
tool opens these files; the checksums are just metadata.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from prune_plugin.errors import PolicyError, StateError

#: Metadata key of the per-tensor checksums (a JSON object: tensor name -> SHA-256 hex).
CHECKSUMS_KEY = "prune_plugin.sha256"
#: The checksum table's entry for the rest of the metadata.
METADATA = "__metadata__"


def _metadata_hash(metadata: dict[str, str]) -> str:
    canonical = json.dumps({k: v for k, v in metadata.items() if k != CHECKSUMS_KEY},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hash(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw little-endian bytes, row-major (no copy for CPU tensors)."""
    t = t.detach().contiguous().cpu()
    n = t.numel() * t.element_size()
    digest = hashlib.sha256()
    if n:
        digest.update(memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())))
    return digest.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (row-major)."""
    t = t.detach().contiguous().cpu()
    n = t.numel() * t.element_size()
    return bytes((ctypes.c_ubyte * n).from_address(t.data_ptr())) if n else b""


def bytes_tensor(data: bytes) -> torch.Tensor:
    """A uint8 tensor over a fresh copy of ``data`` (writable, owns its memory)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.zeros(0, dtype=torch.uint8)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)``, flush the file to disk, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_folder(path: str | Path, fill: Callable[[Path], object]) -> Path:
    """``fill(tmp)`` a new folder, then rename it to ``path``; an older folder there is
    replaced only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (and string ``metadata``) with per-tensor checksums, atomically."""
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    meta = dict(metadata or {})
    sums = {k: _hash(t) for k, t in tensors.items()}
    sums[METADATA] = _metadata_hash(meta)
    meta[CHECKSUMS_KEY] = json.dumps(sums)
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_safetensors(path: str | Path, *, what: str = "file"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file written by :func:`write_safetensors`: (tensors, metadata), every tensor's
    checksum verified. Raises StateError naming the file (and tensor) on any damage."""
    path = Path(path)
    if not path.is_file():
        raise StateError(f"no {what} at {str(path)!r}.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise StateError(f"{path} is not a readable safetensors file ({err}); it is damaged or "
                         f"not a {what}.") from None
    sums = metadata.pop(CHECKSUMS_KEY, None)
    if sums is None:
        raise StateError(f"{path} carries no checksums, so it cannot be verified: it was not "
                         f"written by prune_plugin as a {what} (or by a version before "
                         "checksums). Fix: write it again with this version.")
    try:
        expected = json.loads(sums)
        if not isinstance(expected, dict):
            raise ValueError(sums)
    except ValueError:
        raise StateError(f"{path}: its checksum table is damaged.") from None
    if expected.pop(METADATA, None) != _metadata_hash(metadata):
        raise StateError(f"{path}: its metadata does not match its checksum; the file is "
                         "damaged. Fix: use another copy, or write it again.")
    if set(expected) != set(tensors):
        raise StateError(f"{path}: the tensors {sorted(set(expected) ^ set(tensors))[:5]} do not "
                         "match its checksum table; the file is damaged.")
    for name, t in tensors.items():
        if _hash(t) != expected[name]:
            raise StateError(f"{path}: tensor {name!r} does not match its checksum; the file is "
                             "damaged (a disk or copy error). Fix: use another copy, or write "
                             "it again.")
    return tensors, metadata


#: The record a fine-pruning job keeps in its output folder (prune_plugin.integrations.job).
RUN_RECORD_NAME = "status.json"


def holds_run_record(folder: Path) -> bool:
    """Whether ``folder`` is a fine-pruning run's output folder: its ``status.json`` is a
    mapping with a ``state`` (a user's own file of that name is not). The job's files belong to
    that run: nothing else writes into it or replaces it."""
    try:
        record = json.loads((Path(folder) / RUN_RECORD_NAME).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and "state" in record


#: safetensors' names of the dtypes it stores (its header's "dtype").
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
               torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


# -- policy files -----------------------------------------------------------------------------

def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The fields of a ``.json``, ``.yaml`` or ``.yml`` policy file, unvalidated (a job adds
    ``total_steps`` before validating); every problem is a PolicyError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist. Fix: pass the path "
                          "of a .json or .yaml policy file.")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise PolicyError(f"{path} is not a text file ({err.reason} at byte {err.start}). "
                          "Fix: write the policy as UTF-8 JSON or YAML.") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - depends on the environment
            raise PolicyError(f"reading {path} needs PyYAML. Fix: pip install pyyaml, or "
                              "write the policy as JSON.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise PolicyError(f"{path}: not valid YAML: {err}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PolicyError(f"{path}: not valid JSON: {err}") from None
    else:
        raise PolicyError(f"policy file {str(path)!r} has suffix {path.suffix!r}; allowed: "
                          "'.json', '.yaml', '.yml'. Fix: rename it or convert it.")
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping of policy fields, got "
                          f"{type(data).__name__} {data!r:.80}. Fix: write it as "
                          '{"method": "movement", "total_steps": ...}.')
    return data
