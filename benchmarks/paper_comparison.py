"""The paper's comparison (Tables 2 and 3), scaled to this machine.

    python benchmarks/paper_comparison.py --variant full    # the table: ~2 h on 2 cores
    python benchmarks/paper_comparison.py --variant short   # a quick check: ~15 min

all-MiniLM-L6-v2 on GLUE SST-2 (a fixed training subset, the full validation split), the same
step budget for every method: dense fine-tuning, then magnitude, movement, soft movement and
L0 at 10% and 3% remaining encoder Linear weights, without and (full variant) with
distillation from the dense model. Writes benchmarks/out/paper_comparison.json and prints a
Markdown table. Soft movement and L0 reach whatever sparsity their lambda gives: the table
reports the remaining fraction actually reached.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from prune_plugin.integrations.job import load_job, run_job

GLUE = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
VARIANTS = {
    "full": dict(steps=1000, train=32000, remaining=(0.10, 0.03), distill=True),
    "short": dict(steps=300, train=9600, remaining=(0.10,), distill=False),
}
# Per-method policy settings (the schedule's warm-up / cool-down scale with the budget).
METHODS = {
    "magnitude": {"method": "magnitude", "scope": "local"},
    "movement": {"method": "movement", "scope": "local"},
    "soft_movement": {"method": "soft_movement", "final_threshold": 0.1},
    "l0": {"method": "l0"},
}
# lambda per target remaining fraction for the regularised methods: to be calibrated.
LAMBDAS = {"soft_movement": {0.10: 400.0, 0.03: 1200.0}, "l0": {0.10: 125.0, 0.03: 400.0}}


def job(name: str, steps: int, train: int, pruning: dict | None, teacher: str | None,
        out_root: Path) -> dict:
    return {"model": "minilm",
            "data": {"path": GLUE, "name": "sst2", "text_columns": ["sentence"],
                     "max_train_samples": train},
            "training": {"max_steps": steps, "batch_size": 32, "max_length": 64,
                         "learning_rate": 1.0e-4, "warmup_ratio": 0.1, "logging_steps": 100,
                         "seed": 42},
            "pruning": pruning,
            "teacher": {"model": teacher, "alpha": 0.9, "temperature": 2.0} if teacher else None,
            "output_dir": str(out_root / name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=list(VARIANTS), default="short")
    parser.add_argument("--out", default="benchmarks/out/paper_comparison")
    args = parser.parse_args()
    v = VARIANTS[args.variant]
    out_root = Path(args.out)
    steps, warm, cool = v["steps"], v["steps"] // 10, v["steps"] // 5
    rows = []

    def run(name: str, pruning: dict | None, teacher: str | None = None) -> None:
        t0 = time.time()
        metrics = run_job(load_job(data=job(name, steps, v["train"], pruning, teacher, out_root)),
                          overwrite=True, progress=False)
        rows.append({"run": name, "accuracy": metrics["eval"]["accuracy"],
                     "remaining": metrics["remaining"], "wall_s": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)

    run("dense", None)
    teachers = [None] + ([str(out_root / "dense" / "model")] if v["distill"] else [])
    for teacher in teachers:
        for target in v["remaining"]:
            for method, fields in METHODS.items():
                pruning = {**fields, "warmup_steps": warm, "cooldown_steps": cool}
                if method in LAMBDAS:
                    pruning["final_lambda"] = LAMBDAS[method][target]
                else:
                    pruning["final_remaining"] = target
                suffix = "-distil" if teacher else ""
                run(f"{method}-{round(100 * target)}{suffix}", pruning, teacher)
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root.parent / "paper_comparison.json").write_text(json.dumps(
        {"variant": args.variant, "steps": steps, "train_examples": v["train"], "seed": 42,
         "rows": rows}, indent=2))
    dense = rows[0]["accuracy"]
    print("\n| run | SST-2 acc | vs dense | remaining | wall |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {100 * r['accuracy']:.1f} | {r['accuracy'] / dense:.1%} | "
              f"{100 * r['remaining']:.1f}% | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()
