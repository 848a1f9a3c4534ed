"""Decoders shrunk by structured pruning generate faster: latency and throughput of greedy
generation, dense against shrunk, on CPU.

    python benchmarks/generation.py                 # measure, write JSON and the plot
    python benchmarks/generation.py --replot        # redraw the plot from the JSON

Models (random weights: speed does not depend on them): a Llama-style decoder (hidden 768,
12 layers, 12 heads and 12 key/value heads, SwiGLU FFN 2,048, vocabulary 32,000, untied output
head: 134M parameters) and GPT-2 small (124M, its Conv1D layers). Each is shrunk to 50%, 30%
and 20% of its units kept in every block (heads and FFN neurons, ``structure: hybrid``;
magnitude masks: which units go does not change speed), through ``finalize(shrink=True)``.

Latency: batch 1, a 32-token prompt, 64 new tokens, the time per generated token. Throughput:
batch 8 with the same prompt length and new tokens, generated tokens per second. Median of
``--repeats`` after a warm-up, all variants of a model measured round-robin in one process with
2 threads. Writes benchmarks/results/generation.json and generation.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULT_JSON = ROOT / "benchmarks" / "results" / "generation.json"
KEPT = (1.0, 0.5, 0.3, 0.2)
PROMPT, NEW = 32, 64


def build(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        config = tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                num_hidden_layers=12, num_attention_heads=12,
                                num_key_value_heads=12, tie_word_embeddings=False)
        return tf.LlamaForCausalLM(config).eval()
    return tf.GPT2LMHeadModel(tf.GPT2Config()).eval()


def shrunk(family: str, kept: float) -> nn.Module:
    from prune_plugin import PruningPolicy, attach, finalize

    model = build(family)
    if kept < 1.0:
        policy = PruningPolicy(method="magnitude", structure="hybrid", initial_remaining=kept,
                               final_remaining=kept, total_steps=1)
        attach(model, policy)
        finalize(model, shrink=True)
    return model.eval()


def generate_once(model: nn.Module, batch: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (batch, PROMPT), generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             pad_token_id=0)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == PROMPT + NEW
    return elapsed


def measure(family: str, repeats: int) -> list[dict]:
    models = {kept: shrunk(family, kept) for kept in KEPT}
    sizes = {kept: sum(p.numel() for p in m.parameters()) for kept, m in models.items()}
    times: dict[tuple[float, int], list[float]] = {(k, b): [] for k in KEPT for b in (1, 8)}
    for model in models.values():  # warm-up
        generate_once(model, 1)
    for _ in range(repeats):
        for batch in (1, 8):
            for kept, model in models.items():
                times[(kept, batch)].append(generate_once(model, batch))
    rows = []
    for kept in KEPT:
        one = statistics.median(times[(kept, 1)])
        eight = statistics.median(times[(kept, 8)])
        rows.append({"family": family, "kept": kept, "parameters": sizes[kept],
                     "ms_per_token_batch1": 1000 * one / NEW,
                     "tokens_per_s_batch8": 8 * NEW / eight})
    dense = rows[0]
    for row in rows:
        row["speedup_batch1"] = dense["ms_per_token_batch1"] / row["ms_per_token_batch1"]
        row["speedup_batch8"] = row["tokens_per_s_batch8"] / dense["tokens_per_s_batch8"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family in sorted({r["family"] for r in rows}):
        mine = [r for r in rows if r["family"] == family]
        kept = [r["kept"] for r in mine]
        axes[0].plot(kept, [r["ms_per_token_batch1"] for r in mine], "o-", label=family)
        axes[1].plot(kept, [r["tokens_per_s_batch8"] for r in mine], "o-", label=family)
    axes[0].set(xlabel="fraction of heads and neurons kept", ylabel="ms per token (batch 1)",
                title="Generation latency")
    axes[1].set(xlabel="fraction of heads and neurons kept", ylabel="tokens/s (batch 8)",
                title="Generation throughput")
    for ax in axes:
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Greedy generation on CPU (2 threads), {PROMPT}-token prompt, {NEW} new")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--families", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--replot", action="store_true")
    args = parser.parse_args()
    if not args.replot:
        torch.set_num_threads(2)
        rows = [row for family in args.families for row in measure(family, args.repeats)]
        RESULT_JSON.write_text(json.dumps(rows, indent=2) + "\n")
    rows = json.loads(RESULT_JSON.read_text())
    plot(rows, RESULT_JSON.with_suffix(".png"))
    print(f"{'family':7} {'kept':>5} {'params':>8} {'ms/token b1':>12} {'x':>5} "
          f"{'tok/s b8':>9} {'x':>5}")
    for r in rows:
        print(f"{r['family']:7} {r['kept']:5.2f} {r['parameters'] / 1e6:7.1f}M "
              f"{r['ms_per_token_batch1']:12.2f} {r['speedup_batch1']:5.2f} "
              f"{r['tokens_per_s_batch8']:9.1f} {r['speedup_batch8']:5.2f}")


if __name__ == "__main__":
    main()
