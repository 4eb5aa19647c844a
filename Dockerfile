# syntax=docker/dockerfile:1
# Detour: one image for the caching proxy (`detour serve`) and the admission webhook
# (`detour webhook`). `docker run` of it with no arguments serves a plain pull-through cache on
# port 7439 (deploy/detour.default.yaml); mount your own /etc/detour/detour.yaml for rules.
#
# Build: docker build -t detour:local .
# For the Linux machines it runs on, amd64 and arm64 (edge nodes), in one multi-arch image:
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/detour:0.1.0 --push .
# (.github/workflows/image.yml does that on a v* tag.) Nothing here is per-architecture: the
# base image is multi-arch, and each platform's build stage installs that platform's wheels
# from PyPI (no compiler, nothing downloaded by hand), under QEMU for the one that is not the
# builder's own.

# --- build: the detour wheel and a wheel of every dependency --------------------------------
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --wheel-dir /wheels .

# --- run: slim Python, the wheels installed, no compilers, no pip cache ---------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
# UID/GID 10001 is fixed: the Kubernetes manifests (runAsUser, the cache-directory chown) use it.
# (DL3013, "pin versions in pip": --no-index installs the wheels just built, nothing else.)
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels detour \
 && groupadd --system --gid 10001 detour \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin detour \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/detour \
 && install -d -m 0755 /etc/detour
# The default configuration, so the image serves as it is. Kubernetes mounts its ConfigMap over
# /etc/detour, compose its own file over this one.
COPY --chmod=0644 deploy/detour.default.yaml /etc/detour/detour.yaml
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
# 7439: the proxy (registry API, /metrics, /healthz, /readyz); 8443: the webhook (TLS).
EXPOSE 7439 8443
# For `docker run` and compose; Kubernetes ignores it and uses the manifests' probes.
# The proxy's port: a container running `detour webhook` instead reports unhealthy here.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:7439/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["detour"]
CMD ["serve", "--config", "/etc/detour/detour.yaml"]
