# darkroom's one image: `darkroom api` (the default), `darkroom worker` and `darkroom migrate` all run
# from it. docker-compose.yml builds it; by hand: `docker build -t darkroom .`
FROM python:3.11-slim

# pip arguments that install torch. PyPI's Linux x86_64 torch wheels are CUDA builds, which a GPU host
# needs; for another CUDA version (or a CPU-only image) name an index, e.g.
#   --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG TORCH_SPEC="torch==2.13.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DARKROOM_DATA_DIR=/data \
    DARKROOM_MODEL_CACHE_DIR=/cache/models/darkroom \
    HF_HOME=/cache/models/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor

# torch before the project, in its own layer: it is by far the largest download and changes least,
# and with it installed pip keeps this build instead of choosing one for the project's `torch>=...`.
# TORCH_SPEC is unquoted on purpose, so it may carry pip options such as --index-url.
RUN pip install ${TORCH_SPEC}

WORKDIR /app
COPY . .
# Editable: `darkroom migrate` finds migrations/ next to the source tree, which a wheel would not carry.
RUN pip install -e ".[worker]"

# Run as a user; the directories that compose mounts volumes on belong to it, and Docker gives a new
# named volume the owner of the directory it is mounted on.
RUN useradd --create-home --uid 1000 darkroom \
    && mkdir -p /data /cache/models /cache/inductor \
    && chown darkroom:darkroom /data /cache/models /cache/inductor
USER darkroom

EXPOSE 8000
CMD ["darkroom", "api", "--host", "0.0.0.0", "--port", "8000"]
