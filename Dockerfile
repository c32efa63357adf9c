# svcproxy container image: the node proxy that deploy/ runs as a DaemonSet.
#
#   docker build -t svcproxy:dev .
#
# The base is pinned by tag. Pin it by digest as well (FROM python:3.11-slim-bookworm@sha256:...)
# where a registry is reachable: the digest could not be looked up where this file was written
# (no registry access, no container engine), so it is left to the first real build.
# RUN --mount needs BuildKit (the default builder since Docker 23).

FROM python:3.11-slim-bookworm AS builder
WORKDIR /src
# Only what the wheel needs (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# svcproxy and every dependency as wheels (uvloop, aiohttp, ... come as manylinux wheels).
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="svcproxy" \
      org.opencontainers.image.description="A userspace kube-proxy on asyncio and uvloop" \
      org.opencontainers.image.licenses="Apache-2.0"
# nft: the VIP guard's table and --transparent's reply steering (without it both turn themselves off).
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables=1.0.6-* \
    && rm -rf /var/lib/apt/lists/*
# Install from the builder's wheels only: no index, no compiler, and no wheel files left in a layer.
# pip compiles the .pyc files here, so the read-only root filesystem at run time costs nothing.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/svcproxy-*.whl
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# No USER: a node proxy adds service addresses (netlink, CAP_NET_ADMIN) and binds ports below
# 1024 (CAP_NET_BIND_SERVICE). Kubernetes gives capabilities only to uid 0 (it sets no ambient
# capabilities), so the process runs as root, and the DaemonSet drops every capability but
# those two, forbids privilege escalation and mounts the root filesystem read-only.
ENTRYPOINT ["svcproxy"]
