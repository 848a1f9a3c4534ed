#!/usr/bin/env bash
# On the GPU machine, from the project's root, with .gpu/ taken along (benchmarks/gpu/prepare.sh):
#   bash benchmarks/gpu/run.sh [test] [bench]        (default: both; results in $OUT or /tmp/out)
# test:  the CUDA tests: every method's optimizer.step() silent under
#        torch.cuda.set_sync_debug_mode("error"), and the device path's masks exact.
# bench: BERT-base step vs dense and the two peers, memory, selection alone
#        (benchmarks/step_overhead.py --device cuda).
PARTS=${*:-test bench}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, pydantic; print(torch.__version__, transformers.__version__, pydantic.__version__)"
for part in $PARTS; do
  case $part in
  test) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_device_path.py ;;
  bench) timeout 420 python3 benchmarks/step_overhead.py --device cuda --models bert-base \
           --repeats 5 --steps 10 --out "$OUT/step_overhead.cuda.json" ;;
  esac
  echo "$part done"
done
