#!/usr/bin/env bash
# Regenerate the RayService's serveConfigV2 sources with `distilray serve --emit-config`.
# Run from anywhere after changing serve settings; then `kubectl apply -k k8s/overlays/<x>`.
# tests/unit/test_k8s.py replays each `distilray serve` command below and checks that the
# rendered RayService carries exactly what it writes.
# The app serves model sst2 of the store on the claim at its `production` alias (written by
# `distilray pipeline` / `distilray promote`); the alias is resolved each time Serve builds
# the app, so promoting a new version needs no edit here (k8s/README.md: how it gets there).
set -euo pipefail
cd "$(dirname "$0")/.."

# CPU replicas (base, used by overlays/cpu): 1 CPU each, 1 to 8 replicas.
distilray serve --model /mnt/distilray/models/sst2@production \
  --host 0.0.0.0 --port 8000 \
  --set serve.min_replicas=1 --set serve.max_replicas=8 --set serve.num_cpus=1 \
  --emit-config k8s/base/serve-config.yaml

# GPU replicas (components/gpu, used by overlays/gpu): one GPU each, 1 to 4 replicas; four
# Ingress replicas, since on a GPU one Ingress's Python work is the limit (H200: 1.4x the
# requests/s at concurrency 32, 2.2x at 128 over one Ingress; benchmarks/RESULTS.md).
distilray serve --model /mnt/distilray/models/sst2@production \
  --host 0.0.0.0 --port 8000 \
  --set serve.min_replicas=1 --set serve.max_replicas=4 --set serve.num_cpus=1 \
  --set serve.num_gpus=1 --set serve.max_batch_size=64 --set serve.ingress_replicas=4 \
  --emit-config k8s/components/gpu/serve-config.yaml
