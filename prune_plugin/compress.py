"""Compressed sparse checkpoints of finalized (plain, pruned) models.

Each 2-D weight that is mostly zeros is stored as a bitmask of its kept positions (1 bit per
weight, packed) plus the kept values in row-major order: fp32, or int8 with one fp32 scale per
row (absmax / 127) when asked. Every other tensor is stored as it is. Each blob is then
compressed with lzma or zstd (the bitmask of a 94%-sparse matrix has ~0.33 bits of entropy
per weight).
Everything goes in one safetensors file whose metadata holds the manifest, so the container
is a format every tool can open; ``decompress_folder`` rebuilds a plain checkpoint that
``from_pretrained`` loads with the model's own class.

The paper's anchor: BERT-base's encoder, 340 MB dense, fits in 11 MB at 6% remaining weights
(CSR + int8 + a general-purpose compressor).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from prune_plugin.errors import StateError
from prune_plugin.storage import (DTYPE_NAMES, bytes_tensor, holds_run_record, read_safetensors,
                                  tensor_bytes, write_folder, write_safetensors)

FORMAT = "prune_plugin.compressed"
VERSION = 1
WEIGHTS_NAME = "model.compressed.safetensors"
Quantize = Literal["none", "int8"]
#: Matrices with at most this fraction of non-zeros are stored sparse (and quantised if asked);
#: others, pruned or not (embeddings, heads), are stored exactly as they are.
MAX_DENSITY = 0.5
_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
#: dtype names in the manifest (those of the safetensors format).
_DTYPES = DTYPE_NAMES
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


# -- pure encodings --------------------------------------------------------------------------------

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8, 8 flags per byte, most significant bit first (numpy.packbits)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) >> _SHIFTS) & 1
    return bits.reshape(-1)[:numel].bool()


def quantize_rows(values: torch.Tensor, rows: torch.Tensor, n_rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and per-row fp32 scales (absmax / 127) for values grouped by ``rows``."""
    absmax = torch.zeros(n_rows, dtype=torch.float32).scatter_reduce_(
        0, rows, values.abs().float(), reduce="amax")
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(values.float() / scale[rows]).clamp_(-127, 127).to(torch.int8)
    return q, scale


CODECS = ("lzma", "zstd", "none")


def _bounded_decompress(name: str, data: bytes, limit: int, key: str) -> bytes:
    """Decompress at most ``limit`` bytes (what the manifest declares): a blob that expands
    beyond it (a decompression bomb, a forged manifest) is refused before it is held."""
    if name == "none":
        out = data
    elif name == "lzma":
        import lzma

        decompressor = lzma.LZMADecompressor()
        try:
            out = decompressor.decompress(data, max_length=limit + 1)
        except lzma.LZMAError as err:
            raise StateError(f"blob {key!r} is not valid lzma data ({err}).") from None
    else:
        import io

        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                out = reader.read(limit + 1)
        except zstandard.ZstdError as err:
            raise StateError(f"blob {key!r} is not valid zstd data ({err}).") from None
    if len(out) > limit:
        raise StateError(f"blob {key!r} decompresses to more than the {limit} bytes its "
                         "manifest entry declares (a damaged or crafted file). Nothing was "
                         "loaded.")
    return out


def _check_manifest(manifest: Any, blobs: dict[str, torch.Tensor]) -> None:
    """Every field of a manifest, against what the decoder accepts and the blobs present:
    a compressed file is data, never trusted."""
    def bad(where: str, what: str) -> StateError:
        return StateError(f"compressed checkpoint: {where}: {what}. The file is damaged or was "
                          "not written by prune_plugin. Fix: compress the model again.")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StateError(f"not a {FORMAT} v{VERSION} checkpoint (got {got!r}).")
    if manifest.get("codec") not in CODECS:
        raise bad("manifest", f"codec {manifest.get('codec')!r} is not one of {CODECS}")
    params = manifest.get("params")
    if not isinstance(params, dict):
        raise bad("params", "missing or not a mapping")
    for name, entry in params.items():
        if not isinstance(entry, dict):
            raise bad(name, "its entry is not a mapping")
        if entry.get("dtype") not in _FROM_NAME:
            raise bad(name, f"dtype {entry.get('dtype')!r} is not one of {sorted(_FROM_NAME)}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and 0 <= d < 2**40 for d in shape):
            raise bad(name, f"shape {shape!r} is not a list of sizes")
        encoding = entry.get("encoding")
        if encoding == "dense":
            keys = [f"{name}:dense"]
        elif encoding == "bitmask":
            if len(shape) != 2:
                raise bad(name, f"a bitmask entry needs a 2-D shape, got {shape}")
            if entry.get("quantize") not in ("none", "int8"):
                raise bad(name, f"quantize {entry.get('quantize')!r} is not 'none' or 'int8'")
            keys = [f"{name}:mask", f"{name}:values"] + (
                [f"{name}:scale"] if entry["quantize"] == "int8" else [])
        else:
            raise bad(name, f"encoding {encoding!r} is not 'dense' or 'bitmask'")
        missing = [k for k in keys if k not in blobs]
        if missing:
            raise bad(name, f"blob {missing[0]!r} is missing")
        if math.prod(shape) * _FROM_NAME[entry["dtype"]].itemsize > 2**40:
            raise bad(name, f"shape {shape} declares more than 1 TiB")


def _codec(name: str):
    """(compress, decompress) of a codec: lzma is Python's own (the default: the core needs
    no other package), zstd is as small here (within 1%) and faster to decode."""
    if name == "none":
        return (lambda b: b), (lambda b: b)
    if name == "lzma":
        import lzma

        return (lambda b: lzma.compress(b, preset=6)), lzma.decompress
    if name != "zstd":
        raise ValueError(f"codec must be one of {CODECS}, got {name!r}")
    try:
        import zstandard
    except ImportError:
        raise ImportError("zstd compression needs the 'zstandard' package. Fix: pip install "
                          "zstandard, or pass codec='none'.") from None
    comp = zstandard.ZstdCompressor(level=19, threads=-1)
    return comp.compress, zstandard.ZstdDecompressor().decompress


def compress_state_dict(state_dict: dict[str, torch.Tensor], *, quantize: Quantize = "none",
                        codec: str = "lzma") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode a plain state dict: (blobs for the safetensors file, manifest)."""
    if quantize not in ("none", "int8"):
        raise ValueError(f"quantize must be 'none' or 'int8', got {quantize!r}")
    compress, _ = _codec(codec)
    blobs: dict[str, torch.Tensor] = {}
    params: dict[str, Any] = {}
    for name, t in state_dict.items():
        mine: dict[str, torch.Tensor] = {}  # this parameter's blobs
        t = t.detach().cpu()
        if t.dtype not in _DTYPES:
            raise TypeError(f"cannot store {name!r} of dtype {t.dtype}")
        entry: dict[str, Any] = {"shape": list(t.shape), "dtype": _DTYPES[t.dtype]}
        nonzero = t != 0 if t.dtype.is_floating_point and t.dim() == 2 else None
        kept = int(nonzero.sum()) if nonzero is not None else t.numel()
        if nonzero is not None and kept <= MAX_DENSITY * t.numel():
            values = t[nonzero]
            entry["encoding"] = "bitmask"
            entry["quantize"] = quantize
            mine[f"{name}:mask"] = bytes_tensor(compress(tensor_bytes(pack_bits(nonzero))))
            if quantize == "int8":
                rows = nonzero.nonzero()[:, 0]
                q, scale = quantize_rows(values, rows, t.shape[0])
                mine[f"{name}:values"] = bytes_tensor(compress(tensor_bytes(q)))
                mine[f"{name}:scale"] = bytes_tensor(compress(tensor_bytes(scale)))
            else:
                mine[f"{name}:values"] = bytes_tensor(compress(tensor_bytes(values)))
        else:
            entry["encoding"] = "dense"
            mine[f"{name}:dense"] = bytes_tensor(compress(tensor_bytes(t)))
        blobs.update(mine)
        entry["bytes"] = sum(b.numel() for b in mine.values())
        params[name] = entry
    return blobs, {"format": FORMAT, "version": VERSION, "codec": codec, "params": params}


def stored_bytes(manifest: dict[str, Any], *, prefix: str = "",
                 encoding: str | None = None) -> tuple[int, int]:
    """(stored bytes, dense fp32 bytes) of the parameters under ``prefix`` in a manifest,
    optionally only those stored with ``encoding`` ("bitmask" or "dense")."""
    stored = dense = 0
    for name, entry in manifest["params"].items():
        if name.startswith(prefix) and encoding in (None, entry["encoding"]):
            stored += entry["bytes"]
            dense += 4 * math.prod(entry["shape"])
    return stored, dense


def decompress_state_dict(blobs: dict[str, torch.Tensor], manifest: dict[str, Any]
                          ) -> dict[str, torch.Tensor]:
    """Rebuild the plain state dict from ``compress_state_dict``'s output."""
    _check_manifest(manifest, blobs)
    codec = manifest["codec"]
    if codec == "zstd":
        _codec(codec)  # the missing-package error, before any blob

    def read(key: str, dtype: torch.dtype, count: int, exact: bool = True) -> torch.Tensor:
        """``count`` elements of ``dtype`` (at most, unless ``exact``), bounded while
        decompressing."""
        data = _bounded_decompress(codec, tensor_bytes(blobs[key]), count * dtype.itemsize, key)
        if len(data) % dtype.itemsize or (exact and len(data) != count * dtype.itemsize):
            raise StateError(f"blob {key!r} holds {len(data)} bytes, its manifest entry "
                             f"declares {count} x {dtype.itemsize}. The file is damaged.")
        return bytes_tensor(data).view(dtype) if data else torch.zeros(0, dtype=dtype)

    out: dict[str, torch.Tensor] = {}
    for name, entry in manifest["params"].items():
        dtype, shape = _FROM_NAME[entry["dtype"]], entry["shape"]
        numel = math.prod(shape)
        if entry["encoding"] == "dense":
            out[name] = read(f"{name}:dense", dtype, numel).reshape(shape)  # fresh memory
            continue
        mask = unpack_bits(read(f"{name}:mask", torch.uint8, (numel + 7) // 8), numel)
        mask = mask.view(shape)
        kept = int(mask.sum())
        if entry["quantize"] == "int8":
            scale = read(f"{name}:scale", torch.float32, shape[0])
            rows = mask.nonzero()[:, 0]
            values = (read(f"{name}:values", torch.int8, kept).float() * scale[rows]).to(dtype)
        else:
            values = read(f"{name}:values", dtype, kept)
        dense = torch.zeros(shape, dtype=dtype)
        dense[mask] = values
        out[name] = dense
    return out


# -- checkpoint folders (e.g. from save_pretrained) ---------------------------------------------

def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    index = folder / "model.safetensors.index.json"
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) \
        if index.is_file() else [folder / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise StateError(f"{folder} holds no model.safetensors. Fix: point at a folder written "
                         "by save_pretrained (a finished fine-prune run's 'model' folder).")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as err:
            raise StateError(f"{f} is not a readable safetensors file ({err}).") from None
    return state, files + ([index] if index.is_file() else [])


def compress_folder(model_dir: str | Path, out_dir: str | Path, *, quantize: Quantize = "none",
                    codec: str = "lzma") -> dict[str, Any]:
    """Compress a saved model folder; config, tokenizer and other files are copied as they are.

    Returns the manifest (with each parameter's stored bytes)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    state, weight_files = _read_weights(model_dir)
    blobs, manifest = compress_state_dict(state, quantize=quantize, codec=codec)

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in model_dir.iterdir():
            if f.is_file() and f not in weight_files:
                shutil.copy2(f, tmp / f.name)
        write_safetensors(tmp / WEIGHTS_NAME, blobs, {"manifest": json.dumps(manifest)})
    write_folder(out_dir, fill)
    return manifest


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain state dict stored in a compressed folder (or its weights file)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise StateError(f"no compressed checkpoint at {str(path)!r}.")
    blobs, meta = read_safetensors(path, what="compressed checkpoint")
    if "manifest" not in meta:
        raise StateError(f"{path} is a safetensors file but not a compressed checkpoint.")
    return decompress_state_dict(blobs, json.loads(meta["manifest"]))


def _check_destination(source: Path, out: Path) -> None:
    """Refuse, even with overwrite, a destination that is the source, holds it, lies inside
    it, or is (or lies inside) a fine-pruning run folder: replacing it would lose that."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise StateError(f"cannot decompress {str(source)!r} into {str(out)!r}: the destination "
                         "is the compressed folder itself, holds it or lies inside it, and "
                         "would replace it. Fix: give a new folder elsewhere.")
    for folder in (dst, *dst.parents):
        if holds_run_record(folder):
            raise StateError(f"cannot decompress into {str(out)!r}: "
                             + ("it is" if folder == dst else f"it lies inside {str(folder)!r},")
                             + " a fine-pruning run's folder, whose files belong to that run. "
                             "Fix: give a new folder outside it.")


def decompress_folder(compressed_dir: str | Path, out_dir: str | Path, *,
                      overwrite: bool = False) -> Path:
    """Write a plain checkpoint folder (``model.safetensors`` + the copied files) that the
    model's own ``from_pretrained`` loads. ``out_dir`` must be new or empty unless
    ``overwrite`` (it would replace a model's weights, e.g. exact ones by int8-rounded ones)."""
    compressed_dir, out_dir = Path(compressed_dir), Path(out_dir)
    _check_destination(compressed_dir, out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise StateError(f"{str(out_dir)!r} is not an empty folder; decompressing into it would "
                         "replace what it holds. Fix: give a new folder, or pass --overwrite.")
    state = load_compressed(compressed_dir)

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        for f in compressed_dir.iterdir():
            if f.is_file() and f.name != WEIGHTS_NAME:
                shutil.copy2(f, tmp / f.name)
        write_safetensors(tmp / "model.safetensors", state, {"format": "pt"})
    write_folder(out_dir, fill)
    return out_dir
