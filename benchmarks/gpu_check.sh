#!/usr/bin/env bash
# One prepared check for a lent GPU machine (under 8 minutes): training samples/s and MFU per
# precision, serving requests/s and p99 per serve.dtype, batch inference rows/s in bf16, as
# one table (benchmarks/gpu_check.py). Run from the repository root:
#   bash benchmarks/gpu_check.sh            # GPU
#   bash benchmarks/gpu_check.sh --smoke    # tiny model on CPU, seconds (what CI runs)
# Writes the rows to ${OUT:-.}/gpu_check.json as well.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, ray, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| ray', ray.__version__, '| transformers', transformers.__version__)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 470 "$PY" benchmarks/gpu_check.py --json "${OUT:-.}/gpu_check.json" "$@"
