#!/usr/bin/env bash
# The core alone: torch, pydantic and safetensors (with the numpy its torch API needs) in a
# fresh virtual environment (no PyYAML, transformers, zstandard or matplotlib), then every
# core command on a tiny pruned model.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .ci-core-venv
python3 -m venv .ci-core-venv
# shellcheck disable=SC1091
. .ci-core-venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q .
RUN=$(mktemp -d)/run
python - "$RUN" <<'PY'
import importlib.util, json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

for name in ("yaml", "transformers", "datasets", "zstandard", "matplotlib"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed: not a core-only env"
from prune_plugin import PruningOptimizer, PruningPolicy, finalize, sparsity_report

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 4))
policy = PruningPolicy(method="movement", initial_remaining=0.3, final_remaining=0.3,
                       total_steps=3)
opt = PruningOptimizer(torch.optim.AdamW(model.parameters()), policy, model=model)
for _ in range(3):
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    opt.zero_grad()
report = sparsity_report(model)
assert [layer.name for layer in report.layers] == ["0", "2"], report.layers  # head left dense
assert abs(report.remaining - 0.3) < 0.01, report.remaining
finalize(model)
run = Path(sys.argv[1])
(run / "model").mkdir(parents=True)
save_file({k: v.contiguous() for k, v in model.state_dict().items()},
          str(run / "model" / "model.safetensors"), metadata={"format": "pt"})
(run / "model" / "config.json").write_text("{}")
(run / "sparsity.json").write_text(json.dumps(report.as_dict()))
torch.save(model.state_dict(), run / "expected.pt")
PY
prune-plugin schema > /dev/null
prune-plugin report "$RUN"
prune-plugin compress "$RUN" --int8
prune-plugin compress "$RUN"
prune-plugin decompress "$RUN/compressed" "$RUN/plain"
python - "$RUN" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

run = Path(sys.argv[1])
expected, plain = torch.load(run / "expected.pt"), load_file(str(run / "plain" / "model.safetensors"))
assert expected.keys() == plain.keys() and all(torch.equal(expected[k], plain[k]) for k in expected)
print("core-only install: every core command works")
PY
