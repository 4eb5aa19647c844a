# Detour: one image for the caching proxy (`detour serve`) and the admission webhook
# (`detour webhook`). `docker run` of it with no arguments serves a plain pull-through cache on
# port 7439 (deploy/detour.default.yaml); mount your own /etc/detour/detour.yaml for rules.
#
# Build: docker build -t detour:local .
# Any builder builds it: the classic one (Docker 20.10, as Debian 12 ships it) and BuildKit, with
# nothing fetched beyond the base image and, in the build stage, the wheels from PyPI.
# For the Linux machines it runs on, amd64 and arm64 (edge nodes), in one multi-arch image:
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/detour:0.1.0 --push .
# (.github/workflows/image.yml does that on a v* tag.) Nothing here is per-architecture: the
# base image is multi-arch, and each platform's build stage installs that platform's wheels
# from PyPI (no compiler, nothing downloaded by hand), under QEMU for the one that is not the
# builder's own.

# --- build: detour and its dependencies in a virtual environment ---------------------------
FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# (DL3013, "pin versions in pip": the versions are pyproject.toml's.)
# hadolint ignore=DL3013
RUN python -m venv /opt/detour \
 && /opt/detour/bin/pip install /src

# --- run: slim Python, the environment copied over, no compilers, no pip cache --------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/detour/bin:$PATH
# Only the environment comes over from the build stage: no sources, no wheels.
COPY --from=build /opt/detour /opt/detour
# The default configuration, so the image serves as it is. Kubernetes mounts its ConfigMap over
# /etc/detour, compose its own file over this one.
COPY deploy/detour.default.yaml /etc/detour/detour.yaml
# UID/GID 10001 is fixed: the Kubernetes manifests (runAsUser, the cache-directory chown) use it.
# The configuration is root's, readable by the image's user.
RUN groupadd --system --gid 10001 detour \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin detour \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/detour \
 && chmod 0755 /etc/detour \
 && chmod 0644 /etc/detour/detour.yaml
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
