#!/usr/bin/env bash
# GPU figures for benchmarks/serve_throughput.py, as recorded in RESULTS.md.
#
# On a GPU machine with distilray installed and Hub access, the one command is:
#   python benchmarks/serve_throughput.py --gpu --model distilbert-base-uncased
# This script is what ran on the offline machine lent to this project (torch, transformers
# and CUDA preinstalled; no registry): Ray, Serve's web stack and HAProxy arrive as wheels in
# .devcarry/whl (Ray's wheel stripped of its Java jar, dashboard bundle, RLlib and LLM
# packages to fit the 64 MiB carry limit), SST-2 validation in .devcarry/sst2, and two
# checkpoints holding config + uncased tokenizer only (DistilBERT-base and the MiniLM shape
# that offline:minilm has), given seeded random weights there: every system runs the same
# network, and a forward pass costs the same whatever the weights are.
# MODELS, REQUESTS, DURATION, EXTRA (more serve_throughput.py flags) and TAG (log names) vary it.
set -uo pipefail
OUT=${OUT:-/tmp/serve-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/site/ray ] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.devcarry/whl}/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, transformers, ray; from ray import serve; import distilray.serve; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', \
transformers.__version__, 'ray', ray.__version__, 'cpus', len(__import__('os').sched_getaffinity(0)))" \
    || exit 1
for model in ${MODELS:-distilbert-base minilm}; do
    ckpt=/tmp/ckpt-$model
    log=$OUT/gpu-$model${TAG:+-$TAG}
    rm -rf "$ckpt" && cp -r ".devcarry/ckpt-$model" "$ckpt"
    timeout "${PER_MODEL_S:-280}" python3 benchmarks/serve_throughput.py ${GPU_FLAG---gpu} \
        --checkpoint "$ckpt" --random-weights --data .devcarry/sst2 \
        --requests ${REQUESTS:-400 2000 4000} --duration "${DURATION:-10}" --rounds 2 \
        ${EXTRA:-} --json "$log.json" > "$log.log" 2>&1
    echo "$model: exit $?"
    grep -E "^\||^model|^load|Error" "$log.log"
    pkill -f naive_server
    ray stop --force >/dev/null 2>&1 || true
done
