"""Compressed sparse checkpoint sizes, and the accuracy of the int8 variant.

    python benchmarks/compression.py --run runs/sst2-quick

(a) BERT-base encoder shapes (72 Linear weights + biases and LayerNorms) at 6% remaining,
    kept positions drawn at random (no structure for the bitmask coder to exploit);
(b) each --run folder of a finished fine-prune job: its encoder's size in fp32 and int8, and
    SST-2 validation accuracy of the model rebuilt from each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from prune_plugin.compress import (WEIGHTS_NAME, compress_folder, compress_state_dict,
                                   decompress_folder, quantize_rows, stored_bytes)
from prune_plugin.state import read_safetensors


def bert_base_encoder(keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(12):
        p = f"bert.encoder.layer.{layer}."
        shapes = {"attention.self.query": (768, 768), "attention.self.key": (768, 768),
                  "attention.self.value": (768, 768), "attention.output.dense": (768, 768),
                  "intermediate.dense": (3072, 768), "output.dense": (768, 3072)}
        for name, shape in shapes.items():
            w = torch.randn(shape, generator=g) * 0.04
            w[torch.rand(shape, generator=g) >= keep] = 0
            state[p + name + ".weight"] = w
            state[p + name + ".bias"] = torch.randn(shape[0], generator=g) * 0.02
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + ln + ".weight"] = torch.ones(768)
            state[p + ln + ".bias"] = torch.zeros(768)
    return state


def _entropy_bits(symbols: torch.Tensor) -> float:
    """Order-0 entropy of an integer tensor, in bits in all."""
    counts = torch.unique(symbols, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(counts * p.log2()).sum())


def breakdown(state: dict[str, torch.Tensor], blobs: dict[str, torch.Tensor],
              manifest: dict, prefix: str = "bert.encoder.") -> dict:
    """Where the int8 variant's bytes (``blobs``, ``manifest`` of ``state``) go, next to what
    an ideal order-0 coder of the same streams would need: the positions (binary entropy of
    each matrix's density, i.e. a random mask) and the int8 values (their empirical entropy,
    per matrix)."""
    out = {"mask": 0, "values": 0, "scale": 0, "dense": 0}
    ideal_mask = ideal_values = 0.0
    weights = kept = 0
    for key, blob in blobs.items():
        name, kind = key.rsplit(":", 1)
        if name.startswith(prefix):
            out[kind] += blob.numel()
    for name, entry in manifest["params"].items():
        if not name.startswith(prefix) or entry["encoding"] != "bitmask":
            continue
        t = state[name]
        nonzero = t != 0
        n, k = t.numel(), int(nonzero.sum())
        weights, kept = weights + n, kept + k
        ideal_mask += _entropy_bits(nonzero.reshape(-1).to(torch.uint8))
        q, _ = quantize_rows(t[nonzero], nonzero.nonzero()[:, 0], t.shape[0])
        ideal_values += _entropy_bits(q)
    out.update({"mask_bits_per_weight": 8 * out["mask"] / weights,
                "mask_entropy_bits_per_weight": ideal_mask / weights,
                "value_bits_per_kept": 8 * out["values"] / kept,
                "value_entropy_bits_per_kept": ideal_values / kept})
    return out


def accuracy(model_dir: Path, glue: str, max_length: int = 64) -> float:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    val = datasets.load_dataset(glue, "sst2")["validation"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val), 128):
            rows = val.select(range(i, min(i + 128, len(val))))
            enc = tok(list(rows["sentence"]), padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(list(rows["label"]))).sum())
    return correct / len(val)


def _report(b: dict) -> dict:
    print(f"  int8 bytes: mask {b['mask'] / 1e6:.2f} MB "
          f"({b['mask_bits_per_weight']:.3f} bits/weight; a random mask of the same densities: "
          f"{b['mask_entropy_bits_per_weight']:.3f}), values {b['values'] / 1e6:.2f} MB "
          f"({b['value_bits_per_kept']:.2f} bits each; their order-0 entropy "
          f"{b['value_entropy_bits_per_kept']:.2f}), scales {b['scale'] / 1e6:.2f} MB, "
          f"biases and LayerNorms {b['dense'] / 1e6:.2f} MB", flush=True)
    return b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="append", default=[], help="finished fine-prune run")
    parser.add_argument("--glue",
                        default=str(Path(__file__).resolve().parents[2] / "shared/data/glue"))
    parser.add_argument("--out", default="benchmarks/out/compression.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {}
    state = bert_base_encoder(0.06)
    for quant in ("none", "int8"):
        blobs, manifest = compress_state_dict(state, quantize=quant)
        stored, dense = stored_bytes(manifest, prefix="bert.encoder.")
        results[f"bert-base-encoder-6%-{quant}"] = {"bytes": stored, "dense_bytes": dense}
        print(f"BERT-base encoder at 6%, {quant}: {dense / 1e6:.1f} MB -> {stored / 1e6:.2f} MB",
              flush=True)
        if quant == "int8":
            results[f"bert-base-encoder-6%-{quant}"]["breakdown"] = _report(
                breakdown(state, blobs, manifest))
    for run in args.run:
        run = Path(run)
        metrics = json.loads((run / "metrics.json").read_text())
        row = {"remaining": metrics["remaining"], "job_accuracy": metrics["eval"]["accuracy"]}
        with tempfile.TemporaryDirectory() as tmp:
            for quant in ("none", "int8"):
                manifest = compress_folder(run / "model", Path(tmp) / quant, quantize=quant,
                                           codec="zstd")  # as measured below
                stored, dense = stored_bytes(manifest, prefix="bert.encoder.")
                total, _ = stored_bytes(manifest)
                plain = decompress_folder(Path(tmp) / quant, Path(tmp) / f"{quant}-plain")
                row[quant] = {"encoder_bytes": stored, "encoder_dense_bytes": dense,
                              "model_bytes": total, "accuracy": accuracy(plain, args.glue)}
                print(f"{run.name} ({100 * metrics['remaining']:.1f}% remaining), {quant}: "
                      f"encoder {dense / 1e6:.1f} MB -> {stored / 1e6:.2f} MB, whole model "
                      f"{total / 1e6:.1f} MB, SST-2 accuracy {row[quant]['accuracy']:.4f}",
                      flush=True)
                if quant == "int8":  # the file just written, next to the model it encodes
                    blobs = read_safetensors(Path(tmp) / quant / WEIGHTS_NAME)[0]
                    state = read_safetensors(run / "model" / "model.safetensors")[0]
                    row["breakdown"] = _report(breakdown(state, blobs, manifest))
        results[run.name] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
