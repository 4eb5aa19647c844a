# Detour: one image for the caching proxy (`detour serve`) and the admission webhook
# (`detour webhook`). Build: docker build -t detour:local .

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
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels detour \
 && groupadd --system --gid 10001 detour \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin detour \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/detour \
 && install -d -m 0755 /etc/detour
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
