# Image for nsa-train on Kubernetes (k8s/): CUDA PyTorch + this package + Ray, running as uid 1000.
#
#   docker build -t registry.example.com/nsa-parallel:0.1.0 .
#   docker push registry.example.com/nsa-parallel:0.1.0
#
# The base image is pinned by tag (pin a digest, @sha256:..., for fully reproducible builds).
# It ships torch, triton and a C compiler (Triton builds its launcher at run time); torch 2.8 is
# the first with Triton 3.4 (pyproject.toml's floors), so pip keeps the image's CUDA build.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# Must equal rayClusterSpec.rayVersion in k8s/base/rayjob.yaml (the tests check it).
ARG RAY_VERSION=2.60.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# KubeRay's default readiness/liveness probes run `wget` against the Ray health endpoints.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Non-root user with uid/gid 1000 (the RayJob's securityContext runs as 1000). Some base
# images already have a uid-1000 user (e.g. `ubuntu`); replace it.
RUN if getent passwd 1000 >/dev/null; then userdel -r "$(getent passwd 1000 | cut -d: -f1)" || true; fi \
    && if ! getent group 1000 >/dev/null; then groupadd -g 1000 nsa; fi \
    && useradd -m -u 1000 -g 1000 -s /bin/bash nsa

WORKDIR /workspace

# Dependencies first (cached across source edits): ray[default] brings the dashboard and job
# server KubeRay submits the job through.
COPY pyproject.toml README.md ./
RUN pip install "ray[default,train]==${RAY_VERSION}"

COPY nsa_parallel/ nsa_parallel/
COPY kernels/ kernels/
COPY launch/ launch/
RUN pip install ".[train]" && rm -rf build *.egg-info

COPY configs/ configs/

RUN mkdir -p /checkpoints && chown -R 1000:1000 /workspace /checkpoints
USER 1000:1000
ENV HOME=/home/nsa

# KubeRay overrides the command (ray start ...); the RayJob's entrypoint runs nsa-train.
CMD ["nsa-train", "--help"]
