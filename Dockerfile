# syntax=docker/dockerfile:1
#
# One image for the API, the workers, migrations and Flower; docker-compose.yml picks the command.
#
#   docker build -t llmq .                                   # CPU torch (the default)
#   docker build -t llmq-gpu --build-arg TORCH_VARIANT=cu130 .
#
# TORCH_VARIANT names a wheel index under https://download.pytorch.org/whl/ (cpu, cu126, cu128,
# cu130, ...): pick one that the PyTorch index publishes for the pinned torch version. CUDA wheels
# bundle their CUDA libraries, so the slim base also serves the GPU worker; the host only needs
# the NVIDIA driver and Container Toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/app \
    LLMQ_API_HOST=0.0.0.0 \
    LLMQ_API_PORT=8000 \
    LLMQ_WORKER_METRICS_HOST=0.0.0.0 \
    LLMQ_MODELS_FILE=/app/models.yaml \
    LLMQ_DATA_DIR=/data \
    HF_HOME=/data/huggingface

WORKDIR /app

# Run as an unprivileged user that owns only the data directory. A named volume mounted on
# /data starts as a copy of it and so inherits that owner.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/llmq llmq \
    && mkdir -p /data \
    && chown llmq:llmq /data

# torch goes first and alone: it is by far the largest layer and changes least often.
# The constraint keeps later installs from replacing it with a build from PyPI.
ARG TORCH_VARIANT=cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && echo "torch==2.13.0" > /etc/pip-constraints.txt

# The project's dependencies, read from pyproject.toml, so that this layer is rebuilt when they
# change and not on every source edit.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c /etc/pip-constraints.txt \
    && rm /tmp/requirements.txt

# The source: installed for the `llmq` console script and kept in /app (on PYTHONPATH) for what
# runs from the working directory: alembic.ini, migrations/, models.yaml, celeryconfig.py.
COPY . .
RUN pip install --no-cache-dir --no-deps . && rm -rf build ./*.egg-info

USER llmq

# The API; a worker's Prometheus metrics.
EXPOSE 8000 9100

CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000"]
