# syntax=docker/dockerfile:1
# The distilray application image: the official Ray image + torch + this package (and its
# configs/ and tune/ presets under /app, the working directory).
#
#   CPU: docker build -t registry.example.com/distilray/distilray:0.1.0-cpu .
#   GPU: docker build -t registry.example.com/distilray/distilray:0.1.0-gpu \
#          --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#
# The Ray tag (2.60.0) must equal `rayVersion` in k8s/ and the Ray that submits jobs to it;
# tests/unit/test_k8s.py checks the three agree. py311 matches the package's Python.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# CPU wheels by default; for GPU pick the CUDA wheel index matching the base image's CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# The Ray images run as the non-root user `ray` (uid 1000, gid 100) with HOME=/home/ray.
# Caches go under ~/.cache, which the k8s manifests mount as a writable emptyDir because the
# root filesystem is read-only there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/ray/.cache/huggingface \
    DISTILRAY_CACHE=/home/ray/.cache/distilray

USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 distilray ./distilray
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 tune ./tune

# Pin ray to the base image's version so pip never swaps it for another release.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir "./[offline,onnx]" "ray[train,serve,tune]==2.60.0" \
 && distilray --help >/dev/null
