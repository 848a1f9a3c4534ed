"""Why hard movement pruning collapses at short budgets, and what fixes it (issue 13).

    python benchmarks/collapse.py --variants magnitude movement movement-magprior \
        --seeds 42 43 44 [--steps 250]

Each variant is the README's main job (all-MiniLM-L6-v2 on SST-2, 4,000 training sentences,
batch 32, max length 64, lr 1e-4, pruning to 10% with warm-up 30% and cool-down 20% of the
run) with one change, run on several seeds. Beside the accuracy, a callback records at every
mask refresh:

- ``churn``: the weights a refresh dropped, as a fraction of those it keeps (mostly the
  schedule's own shrink, ~0.02 per step here, for every method);
- ``swapped_in``: the weights a refresh newly keeps, as a fraction of those it keeps (the
  swaps beyond the schedule; 0 when the ranking does not change);
- ``big_kept``: the fraction of the |W| mass of the weights that were the largest 10% at the
  start of pruning that the masks still keep (magnitude pruning keeps most of it by design);
- the training loss (the collapse shows as ~0.69, chance for SST-2);
- at the end of warm-up: the scores' spread and their rank correlation with |W|.

Rows are appended to ``benchmarks/results/collapse.jsonl`` (tracked); a rerun skips finished
(variant, seed) pairs. The summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prune_plugin.integrations.job import load_job, run_job

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "collapse.jsonl"
DATA = str(ROOT / "examples" / "data" / "sst2")  # the main job's data, shipped

#: Each variant: changes to the pruning policy and the training settings of the base job.
VARIANTS: dict[str, dict] = {
    "dense": {"pruning": None},
    "magnitude": {"pruning": {"method": "magnitude"}},
    # the paper's code: scores start at 0 (score_init: constant)
    "movement": {"pruning": {"method": "movement", "score_init": "constant"}},
    # the plugin's default since issue 13: scores start at |W| / mean |W|
    "movement-magprior": {"pruning": {"method": "movement", "score_init": "magnitude"}},
    "movement-longwarmup": {"pruning": {"method": "movement", "score_init": "constant",
                                        "warmup_frac": 0.5}},
    "movement-lowlr": {"pruning": {"method": "movement", "score_init": "constant"},
                       "training": {"learning_rate": 3e-5}},
    "movement-magprior-0.3": {"pruning": {"method": "movement", "score_init": "magnitude",
                                          "score_init_value": 0.3}},
    "soft_movement": {"pruning": {"method": "soft_movement"}},  # lambda sets the sparsity
    # the requested-fraction mode from zero scores (its default is the |W| prior since then)
    "soft_movement-target": {"pruning": {"method": "soft_movement", "final_remaining": 0.10,
                                         "score_init": "constant"}},
    "soft_movement-target-magprior": {"pruning": {"method": "soft_movement",
                                                  "final_remaining": 0.10,
                                                  "score_init": "magnitude"}},
    "l0-target": {"pruning": {"method": "l0", "final_remaining": 0.10}},
}


def base_job(steps: int, seed: int, data: str, out: Path) -> dict:
    return {"model": "minilm",
            "data": {"path": data, "text_columns": ["sentence"], "label_column": "label"},
            "training": {"max_steps": steps, "batch_size": 32, "max_length": 64,
                         "learning_rate": 1e-4, "warmup_ratio": 0.1, "logging_steps": 10,
                         "seed": seed},
            "pruning": None, "output_dir": str(out)}


def pruning_for(variant: dict, steps: int) -> dict | None:
    fields = variant["pruning"]
    if fields is None:
        return None
    fields = dict(fields)
    warmup = round(steps * fields.pop("warmup_frac", 0.3))
    fields.update(warmup_steps=warmup, cooldown_steps=round(steps * 0.2))
    if fields["method"] in ("magnitude", "movement"):
        fields.setdefault("final_remaining", 0.10)
    return fields


def diagnostics_callback(trace: dict):
    """A Trainer callback recording churn, big-weight mass kept and loss at every refresh."""
    from transformers import TrainerCallback

    from prune_plugin import get_pruner

    class Diagnostics(TrainerCallback):
        def __init__(self) -> None:
            self.previous: list | None = None
            self.big: list | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            pruner = get_pruner(model)
            if pruner is None:
                return
            masks = [layer.gate() for layer in pruner.layers]
            if any(m is None or m.dtype != torch.bool for m in masks):
                return  # all kept yet, or L0's continuous gates
            if self.big is None:  # the start of pruning: fix "the big weights" then
                self.big = []
                for layer in pruner.layers:
                    w = layer.weight.detach().abs().reshape(-1)
                    self.big.append(w >= torch.quantile(w[:: max(1, w.numel() // 100_000)], 0.9))
                self._warmup_stats(pruner)
            kept = sum(int(m.sum()) for m in masks)
            churn = swapped_in = 0.0
            if self.previous is not None:
                swapped = sum(int((p & ~m).sum()) for p, m in zip(self.previous, masks))
                churn = swapped / max(1, kept)
                # newly kept weights: what the refresh swapped in beyond the schedule's shrink
                swapped_in = sum(int((m & ~p).sum()) for p, m in zip(self.previous, masks)
                                 ) / max(1, kept)
            big_mass = kept_mass = 0.0
            for layer, m, big in zip(pruner.layers, masks, self.big):
                w = layer.weight.detach().abs().reshape(-1)
                big_mass += float(w[big].sum())
                kept_mass += float(w[big & m.reshape(-1)].sum())
            trace.setdefault("refreshes", []).append(
                {"step": state.global_step, "remaining": kept / sum(m.numel() for m in masks),
                 "churn": round(churn, 5), "swapped_in": round(swapped_in, 5),
                 "big_kept": round(kept_mass / big_mass, 5)})
            self.previous = [m.clone() for m in masks]

        def _warmup_stats(self, pruner) -> None:  # noqa: ANN001
            if not pruner.method.has_scores:
                return
            s = torch.cat([layer.scores.detach().reshape(-1) for layer in pruner.layers])
            w = torch.cat([layer.weight.detach().abs().reshape(-1) for layer in pruner.layers])
            idx = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[:200_000]
            rs, rw = s[idx].argsort().argsort().float(), w[idx].argsort().argsort().float()
            rho = float(torch.corrcoef(torch.stack([rs, rw]))[0, 1])
            trace["end_of_warmup"] = {"score_std": float(s.std()), "score_mean": float(s.mean()),
                                      "spearman_with_abs_w": round(rho, 4)}

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                trace.setdefault("loss", []).append((state.global_step, logs["loss"]))

    return Diagnostics()


def run(name: str, seed: int, steps: int, data: str, out_root: Path) -> dict:
    import prune_plugin.integrations.job as job_module

    variant = VARIANTS[name]
    spec = base_job(steps, seed, data, out_root / f"{name}-{seed}")
    spec["pruning"] = pruning_for(variant, steps)
    spec["training"].update(variant.get("training", {}))
    trace: dict = {}
    callbacks = job_module._run_callbacks

    def with_diagnostics(record, pruning):  # noqa: ANN001
        return [*callbacks(record, pruning), diagnostics_callback(trace)]
    job_module._run_callbacks = with_diagnostics
    try:
        t0 = time.time()
        metrics = run_job(load_job(data=spec), overwrite=True, progress=False)
    finally:
        job_module._run_callbacks = callbacks
    losses = [loss for _, loss in trace.get("loss", [])]
    refreshes = trace.get("refreshes", [])
    return {"variant": name, "seed": seed, "steps": steps, "pruning": spec["pruning"],
            "training": spec["training"], "accuracy": metrics["eval"]["accuracy"],
            "remaining": metrics["remaining"], "wall_s": round(time.time() - t0, 1),
            "collapsed": metrics["eval"]["accuracy"] < 0.55,
            "max_churn": max((r["churn"] for r in refreshes), default=None),
            "min_big_kept": min((r["big_kept"] for r in refreshes), default=None),
            "final_loss": losses[-1] if losses else None, "trace": trace}


def summary(rows: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row)
    lines = ["| variant | seeds | accuracy, mean +- std (each) | collapsed | remaining | "
             "rank corr. S vs \\|W\\| at the end of warm-up | min big-\\|W\\| mass kept | "
             "max swapped in per refresh |", "|---|---|---|---|---|---|---|---|"]

    def mean(values: list) -> str:
        values = [v for v in values if v is not None]
        return f"{statistics.mean(values):.3f}" if values else "-"

    for name, group in by.items():
        acc = [100 * r["accuracy"] for r in group]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        rho = [(r["trace"].get("end_of_warmup") or {}).get("spearman_with_abs_w") for r in group]
        swapped = [max((x["swapped_in"] for x in r["trace"].get("refreshes", [])
                        if "swapped_in" in x), default=None) for r in group]
        lines.append(
            f"| {name} | {len(group)} | {statistics.mean(acc):.1f} +- {std:.1f} "
            f"({', '.join(f'{a:.1f}' for a in acc)}) | {sum(r['collapsed'] for r in group)} | "
            f"{100 * statistics.mean(r['remaining'] for r in group):.2f}% | {mean(rho)} | "
            f"{mean([r['min_big_kept'] for r in group])} | {mean(swapped)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["magnitude", "movement",
                                                          "movement-magprior"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--out", default="benchmarks/out/collapse")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = Path(args.results)
    rows = [json.loads(line) for line in results.read_text().splitlines()] \
        if results.is_file() else []
    done = {(r["variant"], r["seed"], r["steps"]) for r in rows}
    for name in args.variants:
        for seed in args.seeds:
            if (name, seed, args.steps) in done:
                continue
            row = run(name, seed, args.steps, args.data, Path(args.out))
            print(f"{name} seed {seed}: {100 * row['accuracy']:.1f} at "
                  f"{100 * row['remaining']:.2f}% in {row['wall_s']:.0f} s; max churn "
                  f"{row['max_churn']}, min big kept {row['min_big_kept']}", flush=True)
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    shown = [r for r in rows if r["variant"] in args.variants and r["steps"] == args.steps]
    print(summary(shown))


if __name__ == "__main__":
    main()
