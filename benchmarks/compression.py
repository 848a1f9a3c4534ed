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

from prune_plugin.compress import (compress_folder, compress_state_dict, decompress_folder,
                                   stored_bytes)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", action="append", default=[], help="finished fine-prune run")
    parser.add_argument("--glue", default=str(Path(__file__).resolve().parents[2] / "shared/data/glue"))
    parser.add_argument("--out", default="benchmarks/out/compression.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict = {}
    state = bert_base_encoder(0.06)
    for quant in ("none", "int8"):
        _, manifest = compress_state_dict(state, quantize=quant)
        stored, dense = stored_bytes(manifest, prefix="bert.encoder.")
        results[f"bert-base-encoder-6%-{quant}"] = {"bytes": stored, "dense_bytes": dense}
        print(f"BERT-base encoder at 6%, {quant}: {dense / 1e6:.1f} MB -> {stored / 1e6:.2f} MB",
              flush=True)
    for run in args.run:
        run = Path(run)
        metrics = json.loads((run / "metrics.json").read_text())
        row = {"remaining": metrics["remaining"], "job_accuracy": metrics["eval"]["accuracy"]}
        with tempfile.TemporaryDirectory() as tmp:
            for quant in ("none", "int8"):
                manifest = compress_folder(run / "model", Path(tmp) / quant, quantize=quant)
                stored, dense = stored_bytes(manifest, prefix="bert.encoder.")
                total, _ = stored_bytes(manifest)
                plain = decompress_folder(Path(tmp) / quant, Path(tmp) / f"{quant}-plain")
                row[quant] = {"encoder_bytes": stored, "encoder_dense_bytes": dense,
                              "model_bytes": total, "accuracy": accuracy(plain, args.glue)}
                print(f"{run.name} ({100 * metrics['remaining']:.1f}% remaining), {quant}: "
                      f"encoder {dense / 1e6:.1f} MB -> {stored / 1e6:.2f} MB, whole model "
                      f"{total / 1e6:.1f} MB, SST-2 accuracy {row[quant]['accuracy']:.4f}",
                      flush=True)
        results[run.name] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
