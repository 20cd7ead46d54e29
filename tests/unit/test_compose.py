"""docker-compose.yml and the Dockerfile, cross-checked against the code they run.

No Docker engine is needed: the compose file is read as YAML, `${VAR:-default}` interpolated the
way Compose does it, and each service's environment checked against the settings class its command
runs, the routing config its workers serve and the services it points at. A renamed setting, a
tier added to the config without a worker, a typo in a host name or a port: each fails here.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
from collections.abc import Mapping
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from services.common.routing_config import LoadedConfig, load_config
from services.common.runtime import health_routes
from services.common.settings import ENV_PREFIX
from services.controller.config import ControllerSettings
from services.metrics import app as metrics_app
from services.metrics.config import MetricsSettings
from services.router.config import RouterSettings
from services.shadow.config import ShadowSettings
from services.workers import app as worker_app
from services.workers.config import WorkerSettings
from switchboard import cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# `switchboard <command>` → the settings class that command reads (switchboard/cli.py).
SETTINGS_BY_COMMAND: dict[str, type[BaseSettings]] = {
    "router": RouterSettings,
    "worker": WorkerSettings,
    "metrics": MetricsSettings,
    "controller": ControllerSettings,
    "shadow": ShadowSettings,
}
# `switchboard <command>` → the settings fields of the host and port its /health and /ready answer on.
HEALTH_ADDRESS_FIELDS = {
    "router": ("host", "port"),
    "worker": ("worker_host", "worker_port"),
    "metrics": ("metrics_host", "metrics_port"),
    "controller": ("controller_host", "controller_port"),
    "shadow": ("shadow_host", "shadow_port"),
}
# The longest a service's /ready takes to answer before it says "not ready" (its own probe bound):
# a Docker timeout shorter than that would turn a clear reason into a bare timeout.
READY_PROBE_S = {
    "router": 0.0,  # the router reads its broker watch's last verdict
    "worker": worker_app.PROBE_TIMEOUT_S,
    "metrics": metrics_app.STORE_PROBE_S,
    "controller": 0.0,  # the controller reads its own flags
    "shadow": 0.0,  # the shadow worker reads its consumer's flags
}
# Values for the variables compose requires (`${VAR:?message}`), when a test must resolve them.
REQUIRED_STANDINS = {
    "SWITCHBOARD_API_KEY": "test-api-key",
    "CLICKHOUSE_PASSWORD": "test-password",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: object, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, $$."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        set_ = name in env and (env[name] != "" or op is None or not op.startswith(":"))
        if set_:
            return env[name]
        if op in (":?", "?"):
            raise KeyError(f"compose requires {name}: {arg}")
        return arg if op in (":-", "-") else ""

    text = str(value).lower() if isinstance(value, bool) else str(value)
    return _VAR.sub(sub, text)


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as written (uninterpolated), list or mapping form."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        out: dict[str, str] = {}
        for item in raw:
            name, _, value = str(item).partition("=")
            out[name] = value
        return out
    return {
        k: "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in raw.items()
    }


def resolved_env(
    service: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    shell = REQUIRED_STANDINS if env is None else env
    return {k: interpolate(v, shell) for k, v in env_of(service).items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def seconds(duration: object) -> float:
    """A compose duration ("90s", "5m30s", "1h", "300ms") in seconds."""
    text = str(duration).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {duration!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def field_name(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services running our image, i.e. `switchboard <command>`."""
    return {name: svc for name, svc in services.items() if "build" in svc}


@pytest.fixture(scope="module")
def workers(app_services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in app_services.items() if command_of(s)[:1] == ["worker"]}


def only(services: dict[str, dict[str, Any]], command: str) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in services.items() if command_of(s)[:1] == [command]]
    assert len(found) == 1, f"expected one `{command}` service, found {[n for n, _ in found]}"
    return found[0]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    out = []
    for line in lines:
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def image_copies() -> list[tuple[list[str], PurePosixPath]]:
    """The Dockerfile's COPY/ADD from the build context: (sources, absolute destination)."""
    workdir = PurePosixPath("/")
    copies = []
    for instr, args in dockerfile_instructions():
        if instr == "WORKDIR":
            workdir = workdir / args
        elif instr in ("COPY", "ADD"):
            words = shlex.split(args)
            if any(w.startswith("--from") for w in words):
                continue
            words = [w for w in words if not w.startswith("--")]
            *sources, dest = words
            copies.append((sources, workdir / dest))
    return copies


def image_path_source(container_path: str) -> Path | None:
    """The file of the build context that ends up at ``container_path`` in the image."""
    target = PurePosixPath(container_path)
    for sources, dest in image_copies():
        for src in sources:
            local = ROOT / src.rstrip("/")
            if local.is_dir():
                # COPY dir/ dest/ copies the directory's contents into dest.
                if target.is_relative_to(dest) and target != dest:
                    candidate = local / target.relative_to(dest)
                    if candidate.exists():
                        return candidate
            elif len(sources) == 1 and not str(dest).endswith("/") and dest == target:
                return local
            elif dest / local.name == target:
                return local
    return None


def ignored_by_dockerignore(rel: str) -> bool:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = PurePosixPath(rel).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch(prefix, pattern.rstrip("/")) or fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        if not pattern.startswith("!")
        for prefix in prefixes
    )


@pytest.fixture(scope="module")
def routing(app_services: dict[str, dict[str, Any]]) -> LoadedConfig:
    """The routing config the containers load, read from where the image copies it from."""
    paths = {resolved_env(s).get("SWITCHBOARD_CONFIG") for s in app_services.values()}
    assert len(paths) == 1, f"services disagree on SWITCHBOARD_CONFIG: {paths}"
    (path,) = paths
    assert path, "SWITCHBOARD_CONFIG is not set for the services"
    local = image_path_source(path)
    assert local is not None, f"{path} is not a file the Dockerfile copies into the image"
    return load_config(local)


# --- settings -------------------------------------------------------------------------------------


def test_every_app_service_runs_a_known_command(app_services: dict[str, dict[str, Any]]) -> None:
    assert app_services, "no service builds the Switchboard image"
    for name, svc in app_services.items():
        cmd = command_of(svc)
        assert cmd and cmd[0] in SETTINGS_BY_COMMAND, f"{name}: unknown command {cmd}"
        assert svc.get("entrypoint") is None, f"{name}: the image's ENTRYPOINT is `switchboard`"


def test_the_cli_accepts_every_service_command(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`switchboard <command>` parses and starts the service the compose file means."""
    started: list[tuple[str, str | None]] = []

    def fake_run_service(name: str, tier: str | None = None) -> int:
        started.append((name, tier))
        return 0

    monkeypatch.setattr(cli, "_run_service", fake_run_service)
    for name, svc in app_services.items():
        cmd = command_of(svc)
        started.clear()
        assert cli.main(cmd) == 0, name
        tier = cmd[2] if cmd[0] == "worker" else None
        assert started == [(cmd[0], tier)], f"{name}: `switchboard {' '.join(cmd)}` -> {started}"


def test_switchboard_variables_are_fields_of_the_service_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        names = [k for k in env_of(svc) if k.startswith(ENV_PREFIX)]
        if not names:
            continue
        cmd = command_of(svc)
        assert "build" in svc and cmd[:1], f"{name}: sets {names} but does not run Switchboard"
        settings = SETTINGS_BY_COMMAND[cmd[0]]
        unknown = sorted(n for n in names if field_name(n) not in settings.model_fields)
        assert not unknown, f"{name}: {unknown} are not fields of {settings.__name__}"


def test_service_environment_parses_into_its_settings(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values, not just the names: each service's settings build from its compose env."""
    for name, svc in app_services.items():
        command, settings = settings_of(svc, monkeypatch)
        settings_cls = SETTINGS_BY_COMMAND[command]
        for key, value in resolved_env(svc).items():
            field = field_name(key)
            if key.startswith(ENV_PREFIX) and value and field in settings_cls.model_fields:
                assert getattr(settings, field) is not None, f"{name}: {key} ignored"


def test_compose_requires_the_secrets_instead_of_defaulting_them(
    services: dict[str, dict[str, Any]],
) -> None:
    router = only(services, "router")[1]
    with pytest.raises(KeyError, match="SWITCHBOARD_API_KEY"):
        resolved_env(router, {})
    with pytest.raises(KeyError, match="CLICKHOUSE_PASSWORD"):
        resolved_env(services["clickhouse"], {})
    with pytest.raises(KeyError, match="GRAFANA_ADMIN_PASSWORD"):
        resolved_env(services["grafana"], {})


# --- workers and tiers ----------------------------------------------------------------------------


def test_one_worker_service_per_tier(
    workers: dict[str, dict[str, Any]], routing: LoadedConfig
) -> None:
    served: dict[str, list[str]] = {}
    for name, svc in workers.items():
        cmd = command_of(svc)
        assert len(cmd) == 3 and cmd[1] == "--tier", (
            f"{name}: expected `worker --tier T`, got {cmd}"
        )
        served.setdefault(cmd[2], []).append(name)
        assert name == f"worker-{cmd[2]}", f"{name} serves tier {cmd[2]}: name it worker-{cmd[2]}"
        assert "SWITCHBOARD_TIER" not in env_of(svc), f"{name}: the tier comes from --tier"
    assert set(served) == set(routing.tier_names), (
        f"worker tiers {sorted(served)} != config tiers {sorted(routing.tier_names)}"
    )
    assert all(len(names) == 1 for names in served.values()), served


def test_workers_can_be_scaled(workers: dict[str, dict[str, Any]]) -> None:
    for name, svc in workers.items():
        assert "container_name" not in svc, f"{name}: container_name breaks --scale"
        assert not svc.get("ports"), f"{name}: a published port breaks --scale"
        assert svc.get("restart") in ("unless-stopped", "always"), name


def test_workers_drain_before_docker_kills_them(
    workers: dict[str, dict[str, Any]], routing: LoadedConfig
) -> None:
    default_drain = WorkerSettings.model_fields["drain_timeout_s"].default
    for name, svc in workers.items():
        tier = routing.tier(command_of(svc)[2])
        assert "stop_grace_period" in svc, f"{name}: Docker's default 10 s grace cuts calls short"
        grace = seconds(svc["stop_grace_period"])
        drain = float(resolved_env(svc).get("SWITCHBOARD_DRAIN_TIMEOUT_S", default_drain))
        assert grace >= tier.timeout_s, f"{name}: stop_grace_period {grace}s < timeout_s"
        assert drain >= tier.timeout_s, f"{name}: drain {drain}s < timeout_s {tier.timeout_s}s"
        assert grace > drain, f"{name}: stop_grace_period {grace}s <= drain {drain}s"


def test_workers_get_the_provider_keys_the_config_names(
    workers: dict[str, dict[str, Any]], routing: LoadedConfig
) -> None:
    for name, svc in workers.items():
        tier = routing.tier(command_of(svc)[2])
        wanted = {m.api_key_env for m in tier.models if m.api_key_env}
        env = env_of(svc)
        missing = sorted(wanted - set(env))
        assert not missing, f"{name}: does not pass {missing} through"
        for key in wanted:
            assert interpolate(env[key], {key: "k"}) == "k", f"{name}: {key} is not `${{{key}}}`"
            assert interpolate(env[key], {}) == "", f"{name}: {key} has a default value"


# --- addresses ------------------------------------------------------------------------------------


def test_router_and_metrics_listen_where_they_are_reached(
    services: dict[str, dict[str, Any]],
) -> None:
    name, router = only(services, "router")
    env = resolved_env(router)
    assert env["SWITCHBOARD_HOST"] == "0.0.0.0", f"{name}: must bind all interfaces"
    port = int(env["SWITCHBOARD_PORT"])
    published = []
    for entry in router.get("ports") or []:
        if isinstance(entry, dict):
            published.append(int(entry["target"]))
        else:
            published.append(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    assert published == [port], f"{name}: publishes {published}, listens on {port}"

    name, metrics = only(services, "metrics")
    env = resolved_env(metrics)
    assert env["SWITCHBOARD_METRICS_HOST"] == "0.0.0.0", f"{name}: must bind all interfaces"
    assert int(env["SWITCHBOARD_METRICS_PORT"]) > 0


@pytest.mark.parametrize("command", ["controller", "router"])
def test_the_metrics_query_endpoint_is_reached_where_it_listens(
    services: dict[str, dict[str, Any]], command: str
) -> None:
    """The controller reads figures there; the router checks feedback's requests there."""
    name, service = only(services, command)
    env = resolved_env(service)
    url = urlsplit(env["SWITCHBOARD_METRICS_URL"])
    _, metrics = only(services, "metrics")
    metrics_env = resolved_env(metrics)
    assert url.hostname == "metrics", f"{name}: {url.geturl()} is not the metrics service"
    assert url.port == int(metrics_env["SWITCHBOARD_METRICS_PORT"]), f"{name}: wrong port"
    assert env["SWITCHBOARD_METRICS_TOKEN"] == metrics_env["SWITCHBOARD_METRICS_TOKEN"]


def test_dockerfile_builds_the_image_compose_expects() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11-slim")
    entrypoint = [args for instr, args in instructions if instr == "ENTRYPOINT"]
    assert entrypoint and yaml.safe_load(entrypoint[-1]) == ["switchboard"]
    users = [args.split(":")[0] for instr, args in instructions if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the services must not run as root"
    copied = {src.rstrip("/") for sources, _ in image_copies() for src in sources}
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repo"
        assert not ignored_by_dockerignore(src), f".dockerignore excludes {src}, which is copied"
    for package in ("schemas", "services", "switchboard", "config"):
        assert package in copied, f"the Dockerfile does not copy {package}/"


def test_every_config_path_maps_to_a_shipped_file(
    app_services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in app_services.items():
        path = resolved_env(svc)["SWITCHBOARD_CONFIG"]
        assert path.startswith("/app/config/"), f"{name}: {path} is outside /app/config"
        local = image_path_source(path)
        assert local == ROOT / "config" / PurePosixPath(path).name, f"{name}: {path} -> {local}"
        assert not ignored_by_dockerignore(str(local.relative_to(ROOT)))
        load_config(local)


def test_kafka_address_is_one_the_broker_advertises(services: dict[str, dict[str, Any]]) -> None:
    kafka_env = resolved_env(services["kafka"])
    advertised = {}
    for listener in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        proto, _, address = listener.partition("://")
        host, _, port = address.rpartition(":")
        advertised[(host, int(port))] = proto
    listening = {}
    for listener in kafka_env["KAFKA_LISTENERS"].split(","):
        proto, _, address = listener.partition("://")
        listening[proto] = int(address.rpartition(":")[2])
    for (host, port), proto in advertised.items():
        assert host == "kafka", f"advertised host {host} is not the kafka service"
        assert listening.get(proto) == port, f"advertises {proto} on {port}, listens on {listening}"
    for name, svc in services.items():
        bootstrap = resolved_env(svc).get("SWITCHBOARD_KAFKA_BOOTSTRAP")
        if bootstrap is None:
            continue
        for server in bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            assert (host, int(port)) in advertised, f"{name}: {server} is not advertised"


def test_kafka_runs_single_node_kraft_without_topic_auto_creation(
    services: dict[str, dict[str, Any]],
) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    env = resolved_env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    controller_port = next(
        int(lsn.rpartition(":")[2])
        for lsn in env["KAFKA_LISTENERS"].split(",")
        if lsn.startswith(f"{controller}://")
    )
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{controller_port}"
    )
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "kafka-broker-api-versions.sh" in " ".join(map(str, kafka["healthcheck"]["test"]))


def test_redis_url_points_at_the_redis_service(services: dict[str, dict[str, Any]]) -> None:
    assert str(services["redis"]["image"]).startswith("redis:")
    for name, svc in services.items():
        url = resolved_env(svc).get("SWITCHBOARD_REDIS_URL")
        if url is None:
            continue
        parts = urlsplit(url)
        assert parts.scheme == "redis", f"{name}: {url}"
        assert (parts.hostname, parts.port or 6379) == ("redis", 6379), f"{name}: {url}"


def test_producers_are_idempotent_on_kafka(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Apache Kafka has idempotent producers; only the embedded broker lacks them
    for name, svc in app_services.items():
        _, settings = settings_of(svc, monkeypatch)
        assert settings.idempotent_producer, name  # type: ignore[attr-defined]


def _redis_flags(svc: Mapping[str, Any]) -> dict[str, str]:
    args = [interpolate(a, os.environ) for a in svc.get("command") or []]
    return {a[2:]: b for a, b in itertools.pairwise(args) if a.startswith("--")}


def test_leases_and_notes_never_evict_and_outcomes_have_a_bounded_redis(
    services: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]
) -> None:
    # a Redis that evicts may hold only outcomes (a cache); leases and delivery notes must stay
    main, outcomes = _redis_flags(services["redis"]), _redis_flags(services["redis-outcomes"])
    assert main.get("maxmemory-policy") == "noeviction"
    assert outcomes.get("maxmemory-policy") == "allkeys-lru" and outcomes.get("maxmemory")
    for name, svc in workers.items():
        env = resolved_env(svc)
        url = urlsplit(env["SWITCHBOARD_OUTCOME_REDIS_URL"])
        assert (url.hostname, url.port or 6379) == ("redis-outcomes", 6379), name
        assert int(env["SWITCHBOARD_OUTCOME_TTL_S"]) == WorkerSettings().outcome_ttl_s, name
        assert svc["depends_on"]["redis-outcomes"]["condition"] == "service_healthy", name


def test_clickhouse_url_points_at_the_clickhouse_service(
    services: dict[str, dict[str, Any]],
) -> None:
    clickhouse = services["clickhouse"]
    assert str(clickhouse["image"]).startswith("clickhouse/clickhouse-server:")
    name, metrics = only(services, "metrics")
    for shell in (REQUIRED_STANDINS, {**REQUIRED_STANDINS, "CLICKHOUSE_USER": "someone"}):
        url = urlsplit(resolved_env(metrics, shell)["SWITCHBOARD_CLICKHOUSE_URL"])
        server = resolved_env(clickhouse, shell)
        assert url.scheme == "http" and (url.hostname, url.port) == ("clickhouse", 8123), url
        assert url.username == server["CLICKHOUSE_USER"], f"{name}: user differs from the server's"
        assert url.password == server["CLICKHOUSE_PASSWORD"], f"{name}: password differs"
    for other, svc in services.items():
        if other != name:
            assert "SWITCHBOARD_CLICKHOUSE_URL" not in env_of(svc), other


# --- start-up order and health --------------------------------------------------------------------


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def settings_of(
    svc: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, BaseSettings]:
    """The command a service runs and the settings it reads from its compose environment."""
    command = command_of(svc)[0]
    with monkeypatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                mp.delenv(key)
        for key, value in resolved_env(svc).items():
            mp.setenv(key, value)
        return command, SETTINGS_BY_COMMAND[command]()


def probed_url(check: Mapping[str, Any]) -> str:
    """The one URL a healthcheck asks, which must be an exec form the image can run."""
    test = [str(word) for word in check["test"]]
    assert test[:3] == ["CMD", "python", "-c"], f"expected [CMD, python, -c, <code>]: {test}"
    urls = re.findall(r"https?://[^\s'\"]+", test[3])
    assert len(urls) == 1, f"expected one URL in {test[3]!r}"
    return urls[0]


async def _ready() -> None:
    return None


HEALTH_PATHS = {route.path for route in health_routes(_ready)}


def check_healthcheck(name: str, svc: Mapping[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``svc``'s healthcheck asks its own /ready or /health, from inside its container, on the
    port its settings serve them on, and waits longer than that answer may take."""
    check = svc.get("healthcheck")
    assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
    command, settings = settings_of(svc, monkeypatch)
    host_field, port_field = HEALTH_ADDRESS_FIELDS[command]
    port, host = getattr(settings, port_field), getattr(settings, host_field)
    assert port > 0, f"{name}: {port_field} is 0, so it serves no /health or /ready"
    assert host in ("0.0.0.0", "127.0.0.1"), f"{name}: binds {host}, loopback cannot reach it"
    url = urlsplit(probed_url(check))
    assert (url.scheme, url.hostname) == ("http", "127.0.0.1"), f"{name}: asks {url.geturl()}"
    assert url.port == port, f"{name}: healthcheck asks port {url.port}, {port_field}={port}"
    assert url.path in HEALTH_PATHS, f"{name}: healthcheck asks {url.path}, not {HEALTH_PATHS}"
    timeout = seconds(check.get("timeout", "30s"))
    assert timeout > READY_PROBE_S[command], f"{name}: timeout {timeout}s < its /ready's bound"
    assert seconds(check.get("start_period", "0s")) > 0, f"{name}: no start_period"


def test_app_healthchecks_ask_the_service_where_its_settings_serve(
    app_services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renamed setting, a changed port or a typo in the path fails here, not as a container
    that never turns healthy."""
    assert HEALTH_PATHS == {"/health", "/ready"}
    for name, svc in app_services.items():
        check_healthcheck(name, svc, monkeypatch)


def test_the_healthcheck_check_fails_on_a_wrong_port_or_path_or_none(
    workers: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, worker = next(iter(workers.items()))
    port = settings_of(worker, monkeypatch)[1].worker_port  # type: ignore[attr-defined]
    for old, new, says in (
        (f":{port}/", f":{port + 1}/", f"asks port {port + 1}"),
        ("/ready'", "/readyz'", "asks /readyz"),
    ):
        broken = {**worker, "healthcheck": dict(worker["healthcheck"])}
        broken["healthcheck"]["test"] = [
            str(w).replace(old, new) for w in worker["healthcheck"]["test"]
        ]
        with pytest.raises(AssertionError, match=says):
            check_healthcheck(name, broken, monkeypatch)
    with pytest.raises(AssertionError, match="no healthcheck"):
        check_healthcheck(
            name, {k: v for k, v in worker.items() if k != "healthcheck"}, monkeypatch
        )


def test_services_wait_for_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    needs = {
        "router": {"kafka", "redis"},
        "worker": {"kafka", "redis"},
        "metrics": {"kafka", "clickhouse"},
        "controller": {"kafka", "metrics"},
        "shadow": {"kafka"},
    }
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name a condition"
        for dep, spec in deps.items():
            assert dep in services, f"{name}: depends on unknown service {dep}"
            assert spec.get("condition") == "service_healthy", f"{name}: {dep} not service_healthy"
            assert services[dep].get("healthcheck"), f"{name}: {dep} has no healthcheck"
        cmd = command_of(svc)
        if "build" in svc:
            assert needs[cmd[0]] <= set(deps), f"{name}: must wait for {needs[cmd[0]]}"


def test_helpers_interpolate_like_compose() -> None:
    """The checks above are only as good as these helpers."""
    assert interpolate("${A:-x}", {}) == "x"
    assert interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == ""
    assert interpolate("${A}-$$B", {"A": "1"}) == "1-$B"
    with pytest.raises(KeyError):
        interpolate("${A:?need A}", {"A": ""})
    assert seconds("5m30s") == 330 and seconds("90s") == 90 and seconds("1h") == 3600
    assert field_name("SWITCHBOARD_KAFKA_BOOTSTRAP") == "kafka_bootstrap"
