#!/usr/bin/env bash
# Regenerate the RayService's serveConfigV2 sources with `distilray serve --emit-config`.
# Run from anywhere after changing serve settings; then `kubectl apply -k k8s/overlays/<x>`.
# tests/unit/test_k8s.py replays each `distilray serve` command below and checks that the
# rendered RayService carries exactly what it writes.
set -euo pipefail
cd "$(dirname "$0")/.."

# CPU replicas (base, used by overlays/cpu): 1 CPU each, 1 to 8 replicas.
distilray serve --checkpoint /mnt/distilray/results/sst2-search/best \
  --host 0.0.0.0 --port 8000 \
  --set serve.min_replicas=1 --set serve.max_replicas=8 --set serve.num_cpus=1 \
  --emit-config k8s/base/serve-config.yaml

# GPU replicas (components/gpu, used by overlays/gpu): one GPU each, 1 to 4 replicas; four
# Ingress replicas, since on a GPU one Ingress's Python work is the limit (H200: 1.4x the
# requests/s at concurrency 32, 2.2x at 128 over one Ingress; benchmarks/RESULTS.md).
distilray serve --checkpoint /mnt/distilray/results/sst2-search/best \
  --host 0.0.0.0 --port 8000 \
  --set serve.min_replicas=1 --set serve.max_replicas=4 --set serve.num_cpus=1 \
  --set serve.num_gpus=1 --set serve.max_batch_size=64 --set serve.ingress_replicas=4 \
  --emit-config k8s/components/gpu/serve-config.yaml
