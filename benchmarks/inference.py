"""Structured pruning makes models faster: latency of dense vs shrunk MiniLM, next to accuracy.

    python benchmarks/inference.py --train              # the fine-pruning runs (resumable)
    python benchmarks/inference.py                      # measure the finished runs, plot

Runs (all-MiniLM-L6-v2 on SST-2, the budget of the paper comparison: 1,000 steps x 16,
16,000 training sentences, lr 1e-4, max length 64): a dense fine-tuning (the teacher), then
hybrid structured movement pruning (heads and FFN neurons, local Top-v over units, scores
started from the units' norms) to several fractions of units kept, distilled from the dense
model (alpha 0.9, T 2), each written shrunk (``shrink: true``).

Latency: the encoder's forward (the model without its classifier) on CPU with 2 threads,
batch 1 x 128 and batch 32 x 128 tokens, median of ``--repeats`` after warm-up, dense and
shrunk models measured alternately in one process. Accuracy: each run's full SST-2 validation
split (its metrics.json). Writes benchmarks/results/inference.json and the speed-accuracy plot
benchmarks/results/inference.png (``--replot`` redraws it from the JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GLUE = str(ROOT.parent / "shared" / "data" / "glue")
TARGETS = (0.5, 0.3, 0.2, 0.1)
RESULT_JSON = ROOT / "benchmarks" / "results" / "inference.json"  # the figures, tracked


def job(name: str, pruning: dict | None, teacher: str | None, out: Path, shrink: bool) -> dict:
    return {"model": "minilm",
            "data": {"path": GLUE, "name": "sst2", "text_columns": ["sentence"],
                     "max_train_samples": 16000},
            "training": {"max_steps": 1000, "batch_size": 16, "max_length": 64,
                         "learning_rate": 1.0e-4, "warmup_ratio": 0.1, "logging_steps": 100,
                         "seed": 42},
            "pruning": pruning,
            "teacher": {"model": teacher, "alpha": 0.9, "temperature": 2.0} if teacher else None,
            "shrink": shrink, "output_dir": str(out / name)}


def hybrid(remaining: float) -> dict:
    return {"method": "movement", "structure": "hybrid", "final_remaining": remaining,
            "score_init": "magnitude", "warmup_steps": 100, "cooldown_steps": 200}


def train(out: Path) -> None:
    from prune_plugin.integrations.job import load_job, run_job
    from prune_plugin.integrations.job.run_folder import RunFolder

    dense = out / "dense"
    if RunFolder(dense).state() != "finished":
        run_job(load_job(data=job("dense", None, None, out, False)), overwrite=True,
                progress=False)
    for remaining in TARGETS:
        name = f"hybrid-{round(100 * remaining)}"
        if RunFolder(out / name).state() == "finished":
            continue
        spec = job(name, hybrid(remaining), str(dense / "model"), out, True)
        run_job(load_job(data=spec), overwrite=True, progress=False)


def encoder_latency(model, batch: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, 128), generator=g)
    mask = torch.ones_like(ids)
    encoder = model.base_model
    with torch.inference_mode():
        for _ in range(2):
            encoder(input_ids=ids, attention_mask=mask)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(out: Path, repeats: int) -> dict:
    from transformers import AutoModelForSequenceClassification

    from prune_plugin import load_shrunk

    torch.set_num_threads(2)
    runs = {"dense": out / "dense"} | {f"hybrid-{round(100 * r)}": out / f"hybrid-{round(100 * r)}"
                                       for r in TARGETS}
    runs = {k: v for k, v in runs.items() if (v / "metrics.json").is_file()}
    models = {}
    for name, run in runs.items():
        cls = AutoModelForSequenceClassification
        models[name] = (cls.from_pretrained(run / "model") if name == "dense"
                        else load_shrunk(run / "model", None)).eval()
    result: dict = {}
    for batch in (1, 32):
        samples: dict[str, list[float]] = {k: [] for k in models}
        for r in range(3):  # interleaved rounds: the machine's speed drifts
            for name in (models if r % 2 == 0 else list(models)[::-1]):
                samples[name].append(encoder_latency(models[name], batch, repeats))
        for name, s in samples.items():
            result.setdefault(name, {})[f"batch{batch}_s"] = statistics.median(s)
    for name, run in runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        params = sum(p.numel() for n, p in models[name].named_parameters()
                     if ".encoder." in f".{n}")
        result[name].update(accuracy=metrics["eval"]["accuracy"],
                            remaining=metrics["remaining"], encoder_params=params)
    dense = result["dense"]
    for row in result.values():
        row["speedup_batch1"] = dense["batch1_s"] / row["batch1_s"]
        row["speedup_batch32"] = dense["batch32_s"] / row["batch32_s"]
        row["accuracy_vs_dense"] = row["accuracy"] / dense["accuracy"]
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for batch, marker in ((32, "o"), (1, "s")):
        xs = [row[f"speedup_batch{batch}"] for row in result.values()]
        ys = [100 * row["accuracy"] for row in result.values()]
        ax.plot(xs, ys, marker=marker, linestyle="-", label=f"batch {batch} x 128")
        for name, x, y in zip(result, xs, ys):
            ax.annotate(name.replace("hybrid-", "") + ("%" if name != "dense" else ""),
                        (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("encoder speed-up vs dense (CPU, 2 threads)")
    ax.set_ylabel("SST-2 accuracy (%)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: hybrid movement pruning\n"
                 "+ distillation, shrunk (labels: units kept)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", action="store_true", help="run the fine-pruning jobs first")
    parser.add_argument("--out", default="benchmarks/out/inference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plot from benchmarks/results/inference.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        plot(json.loads(RESULT_JSON.read_text()), RESULT_JSON.with_suffix(".png"))
        return
    if args.train:
        train(out)
    result = measure(out, args.repeats)
    for name, row in result.items():
        print(f"{name:10} acc {100 * row['accuracy']:.1f} ({100 * row['accuracy_vs_dense']:.1f}% "
              f"of dense)  batch32 {row['batch32_s'] * 1e3:.0f} ms ({row['speedup_batch32']:.2f}x)"
              f"  batch1 {row['batch1_s'] * 1e3:.1f} ms ({row['speedup_batch1']:.2f}x)  encoder "
              f"params {row['encoder_params'] / 1e6:.1f}M", flush=True)
    RESULT_JSON.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULT_JSON.with_suffix(".png"))


if __name__ == "__main__":
    main()
