"""docker-compose.yml and the Dockerfile, cross-checked against the code they run.

No Docker engine is needed. The compose file is read as YAML, `${VAR:-default}` interpolated the
way Compose does it, and validated against the Compose specification by compose-spec's parser
(Rust's compose_spec crate: an unknown key, a wrong type, a bad duration or size, an undefined
secret each fail). Then each service's environment is checked against the settings class its
command runs (with its secret files where the service would find them), the routing config its
workers serve, the services it points at, the Kafka image's own settings and
deploy/haproxy/haproxy.cfg. A renamed setting, a tier added to the config without a worker, a
typo in a host name or a port: each fails here.

The deployment checks (`check_*`) are plain functions returning their problems. The tests run
them on the real file, and `test_each_breakage_fails_a_check` applies one breakage at a time to a
copy of the parsed file and shows the check meant for it catches it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import tempfile
from collections.abc import Callable, Iterator, Mapping
from fnmatch import fnmatch
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec import PyCompose
from pydantic_settings import BaseSettings

from services.common.routing_config import LoadedConfig, load_config
from services.common.runtime import health_routes
from services.common.settings import ENV_PREFIX, SECRETS_DIR, CommonSettings
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
COMPOSE_DOC = ROOT / "docs" / "compose.md"
HAPROXY_FILE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# `switchboard <command>` → the settings class that command reads (switchboard/cli.py).
SETTINGS_BY_COMMAND: dict[str, type[BaseSettings]] = {
    "router": RouterSettings,
    "worker": WorkerSettings,
    "metrics": MetricsSettings,
    "controller": ControllerSettings,
    "shadow": ShadowSettings,
    "topics": CommonSettings,
}
# Commands that do their work and exit: no /health, no healthcheck; the others wait for them.
ONE_SHOT_COMMANDS = {"topics"}
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
# Stand-in values for the variables compose requires: the sources of the secrets (compose refuses
# to start a service whose secret's variable is unset) and any `${VAR:?message}`.
REQUIRED_STANDINS = {
    "SWITCHBOARD_API_KEY": "test-api-key",
    "SWITCHBOARD_METRICS_TOKEN": "test-metrics-token",
    "CLICKHOUSE_PASSWORD": "test-clickhouse-password",
    "REDIS_PASSWORD": "test-redis-password",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
# The secret files each command's settings must find in /run/secrets (services/common/settings.py:
# the file name is the variable's name in lower case). The metrics service refuses to serve its
# SQL endpoint beyond loopback without the token; its clients must send the same one.
SECRET_FILES_BY_COMMAND = {
    "router": {"switchboard_api_key", "switchboard_metrics_token"},
    "worker": {"switchboard_redis_password"},
    "metrics": {"switchboard_clickhouse_password", "switchboard_metrics_token"},
    "controller": {"switchboard_metrics_token"},
}
# Settings that shape a topic: every service creates the topics it uses with them, so all agree.
TOPIC_SETTINGS = (
    "SWITCHBOARD_TOPIC_PREFIX",
    "SWITCHBOARD_PARTITIONS",
    "SWITCHBOARD_REPLICATION_FACTOR",
    "SWITCHBOARD_MIN_INSYNC_REPLICAS",
    "SWITCHBOARD_RETENTION_HOURS",
    "SWITCHBOARD_REPLY_RETENTION_MINUTES",
    "SWITCHBOARD_MAX_MESSAGE_BYTES",
)

# Image tags checked to exist, with where (checked 2026-12-02), and the form each image's tags
# take. An image or tag not listed fails: add it here with its source once you have checked it.
KNOWN_IMAGES: dict[str, tuple[str, frozenset[str], str]] = {
    "apache/kafka": (
        r"\d+\.\d+\.\d+",
        frozenset({"4.1.0"}),
        "Apache Kafka 4.1.0 (2025-09); the project publishes apache/kafka:<version> "
        "(apache/kafka docker/examples/README.md)",
    ),
    "clickhouse/clickhouse-server": (
        # YY.M for a release branch, YY.M.patch.build for one release, optionally -alpine
        # (ClickHouse docker/server/README.src/content.md, "Versions")
        r"\d\d\.(?:[1-9]|1[0-2])(?:\.\d+\.\d+)?(?:-alpine)?",
        frozenset({"25.8"}),
        "ClickHouse 25.8, an LTS branch; branch tags YY.M point at its latest release",
    ),
    "redis": (
        r"\d+(?:\.\d+){0,2}(?:-alpine|-bookworm)?",
        frozenset({"7-alpine"}),
        "Docker official image redis, tag 7-alpine (the 7.x line on Alpine)",
    ),
    "haproxy": (
        r"\d+\.\d+(?:\.\d+)?(?:-alpine)?",
        frozenset({"3.2.6-alpine"}),
        "docker-library/haproxy 3.2/alpine/Dockerfile, HAPROXY_VERSION 3.2.6 (3.2 is the LTS)",
    ),
    "prom/prometheus": (
        r"v\d+\.\d+\.\d+",
        frozenset({"v3.5.0"}),
        "Prometheus 3.5.0, an LTS release of 2025-07-14 (prometheus/prometheus releases)",
    ),
    "grafana/grafana": (
        r"\d+\.\d+\.\d+",
        frozenset({"12.4.0"}),
        "Grafana 12.4.0 of 2026-02-24 (grafana/grafana CHANGELOG)",
    ),
}

# --- the apache/kafka image's configuration -------------------------------------------------------
# Its start scripts (apache/kafka docker/resources/common-scripts) fill these in when unset or
# empty (configureDefaults), then turn every KAFKA_* variable but the JVM ones into a server
# property: KAFKA_ dropped, `_` → `.`, `__` → `_`, `___` → `-`, lower case.
KAFKA_IMAGE_DEFAULTS = {
    "CLUSTER_ID": "5L6g3nShT-eMCtK--X86sw",
    "KAFKA_NODE_ID": "1",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": (
        "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PLAINTEXT_HOST:PLAINTEXT"
    ),
    "KAFKA_LISTENERS": (
        "PLAINTEXT://localhost:29092,CONTROLLER://localhost:29093,PLAINTEXT_HOST://0.0.0.0:9092"
    ),
    "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://localhost:29092,PLAINTEXT_HOST://localhost:9092",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:29093",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",
}
# KAFKA_* variables that are not properties (kafka-propertiesSpec.json's "excludes").
KAFKA_NOT_PROPERTIES = {
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPT",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
}
# Kafka 4.1's own defaults for the properties the checks read.
BROKER_DEFAULTS = {
    "auto.create.topics.enable": "true",
    "message.max.bytes": "1048588",
    "replica.fetch.max.bytes": "1048576",
    "socket.request.max.bytes": "104857600",
    "group.min.session.timeout.ms": "6000",
    "group.max.session.timeout.ms": "1800000",
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
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


def interpolate_tree(value: Any, env: Mapping[str, str]) -> Any:
    """Every string of a parsed compose file interpolated, as Compose does before it validates."""
    if isinstance(value, dict):
        return {k: interpolate_tree(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_tree(v, env) for v in value]
    if isinstance(value, str):
        return interpolate(value, env)
    return value


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


def compose_bytes(size: object) -> int:
    """A compose size ("512m", "1g", "1280mb", 1024): Docker's binary units."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(size).strip().lower())
    assert m, f"not a size: {size!r}"
    return int(float(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " "))


def redis_bytes(size: str) -> int:
    """A Redis size: 1k is 1000 bytes, 1kb 1024 (redis.conf, "Units")."""
    m = re.fullmatch(r"(\d+)([kmg]b?)?", size.strip().lower())
    assert m, f"not a Redis size: {size!r}"
    unit = m.group(2) or ""
    power = " kmg".index(unit[:1] or " ")
    return int(m.group(1)) * (1024 if unit.endswith("b") else 1000) ** power


def field_name(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    # a plain copy: YAML anchors share objects between services, a breakage must not
    copied: dict[str, Any] = json.loads(json.dumps(data))
    return copied


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def app_services_of(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running our image, i.e. `switchboard <command>`."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def long_running(services: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if command_of(s)[:1] != ["topics"]}


@pytest.fixture(scope="module")
def app_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return app_services_of(compose)


@pytest.fixture(scope="module")
def workers(app_services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in app_services.items() if command_of(s)[:1] == ["worker"]}


def only(services: Mapping[str, dict[str, Any]], command: str) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in services.items() if command_of(s)[:1] == [command]]
    assert len(found) == 1, f"expected one `{command}` service, found {[n for n, _ in found]}"
    return found[0]


def kafka_nodes(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("apache/kafka:")
    }


def setting(svc: Mapping[str, Any], name: str, shell: Mapping[str, str] | None = None) -> str:
    """A common setting of a Switchboard service: its compose value, else the class default."""
    value = resolved_env(svc, shell).get(name)
    if value:
        return value
    return str(CommonSettings.model_fields[field_name(name)].default)


# --- secrets --------------------------------------------------------------------------------------


def secret_mounts(svc: Mapping[str, Any]) -> dict[str, str]:
    """The secret files a service gets: container path → top-level secret name."""
    out = {}
    for entry in svc.get("secrets") or []:
        if isinstance(entry, str):
            source, target = entry, entry
        else:
            source = entry["source"]
            target = entry.get("target") or source
        path = target if target.startswith("/") else f"{SECRETS_DIR}/{target}"
        out[path] = source
    return out


def secret_variable(compose: Mapping[str, Any], secret: str) -> str | None:
    """The variable a top-level secret takes its value from, or None."""
    spec = (compose.get("secrets") or {}).get(secret) or {}
    return spec.get("environment")


def secret_files(svc: Mapping[str, Any], compose: Mapping[str, Any]) -> dict[str, str]:
    """The secret files a service gets, with their stand-in values: container path → value."""
    out = {}
    for path, source in secret_mounts(svc).items():
        variable = secret_variable(compose, source)
        out[path] = REQUIRED_STANDINS.get(variable or "", f"test-{source}")
    return out


def settings_of(
    svc: Mapping[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    compose: Mapping[str, Any] | None = None,
) -> tuple[str, BaseSettings]:
    """The command a service runs and the settings it reads from its compose environment and
    the secret files compose mounts in /run/secrets."""
    command = command_of(svc)[0]
    compose = load_compose() if compose is None else compose
    with monkeypatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                mp.delenv(key)
        for key, value in resolved_env(svc).items():
            mp.setenv(key, value)
        for path, value in secret_files(svc, compose).items():
            if PurePosixPath(path).parent == PurePosixPath(SECRETS_DIR):
                (Path(tmp) / PurePosixPath(path).name).write_text(value)
        settings_cls = SETTINGS_BY_COMMAND[command]
        return command, settings_cls(_secrets_dir=Path(tmp))  # type: ignore[call-arg]


# --- the apache/kafka image -----------------------------------------------------------------------


def kafka_property_name(variable: str) -> str:
    """The server property the apache/kafka image makes of a KAFKA_* variable (utility.go's
    ConvertKey)."""
    key = variable.removeprefix("KAFKA_")
    key = re.sub(r"[^_]_[^_]", lambda m: m.group(0).replace("_", "."), key)
    return key.replace("___", "-").replace("__", "_").lower()


def kafka_env(node: Mapping[str, Any], shell: Mapping[str, str] | None = None) -> dict[str, str]:
    """A node's environment as the image's start scripts see it: defaults for unset or empty."""
    env = resolved_env(node, shell)
    return {**KAFKA_IMAGE_DEFAULTS, **{k: v for k, v in env.items() if v}}


def kafka_properties(
    node: Mapping[str, Any], shell: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The server properties of a node, Kafka's defaults included for those the checks read."""
    props = dict(BROKER_DEFAULTS)
    for name, value in kafka_env(node, shell).items():
        if name.startswith("KAFKA_") and name not in KAFKA_NOT_PROPERTIES:
            props[kafka_property_name(name)] = value
    return props


def listeners(text: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` → {NAME: (host, port)}."""
    out = {}
    for item in text.split(","):
        proto, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[proto] = (host, int(port))
    return out


# --- documented scaling ---------------------------------------------------------------------------


@cache
def documented_replicas() -> dict[str, int]:
    """The most replicas of each service the compose file's and docs/compose.md's
    `--scale <service>=N` examples run."""
    texts = [COMPOSE_FILE.read_text()]
    if COMPOSE_DOC.exists():
        texts.append(COMPOSE_DOC.read_text())
    most: dict[str, int] = {}
    for text in texts:
        for name, count in re.findall(r"--scale\s+([\w-]+)=(\d+)", text):
            most[name] = max(most.get(name, 0), int(count))
    return most


# --- HAProxy --------------------------------------------------------------------------------------


@cache
def haproxy_sections() -> dict[str, list[list[str]]]:
    """deploy/haproxy/haproxy.cfg as {"backend routers": [[directive, args...], ...], ...}."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for raw in HAPROXY_FILE.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
            continue
        assert current is not None, f"a directive outside any section: {raw!r}"
        current.append(line.split())
    return sections


def haproxy_directives(section: str, name: str) -> list[list[str]]:
    """The arguments of every ``name`` directive of ``section`` (two-word names allowed)."""
    words = name.split()
    return [
        d[len(words) :] for d in haproxy_sections().get(section, []) if d[: len(words)] == words
    ]


def haproxy_seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", text)
    assert m, f"not an HAProxy time: {text!r}"
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    return int(m.group(1)) * unit[m.group(2) or "ms"]


def lb_service(compose: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The service that runs deploy/haproxy/haproxy.cfg."""
    for name, svc in compose["services"].items():
        for entry in svc.get("volumes") or []:
            source, _, target = str(entry).partition(":")
            if source.startswith(".") and (ROOT / source).resolve() == HAPROXY_FILE:
                if target.split(":")[0] == "/usr/local/etc/haproxy/haproxy.cfg":
                    return name, svc
    return None


def published(svc: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(host port, container port) of every port a service publishes."""
    out = []
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            out.append((str(entry.get("published", "")), int(entry["target"])))
        else:
            parts = str(entry).split("/")[0].split(":")
            out.append((parts[-2] if len(parts) > 1 else "", int(parts[-1])))
    return out


# --- the deployment checks ------------------------------------------------------------------------
# Each returns its problems (empty: none). The tests below run every one on the real file and
# apply breakages to copies of it.

Problems = list[str]


def check_compose_spec(compose: Mapping[str, Any]) -> Problems:
    """Valid by the Compose specification once interpolated (compose-spec's parser: unknown keys,
    types, durations, sizes, depends_on conditions, secrets, networks and volumes named)."""
    try:
        doc = interpolate_tree(compose, REQUIRED_STANDINS)
        parsed = PyCompose.from_json(json.dumps(doc))
        parsed.validate()
    except (ValueError, KeyError) as exc:
        return [f"not valid by the Compose specification: {exc}"]
    return []


def check_kafka_cluster(compose: Mapping[str, Any]) -> Problems:
    """Three or more KRaft nodes, each broker and controller, sharing one explicit CLUSTER_ID and
    one voter list, each with its log dir on a named volume of its own, advertised where the
    services' bootstrap list reaches them."""
    nodes = kafka_nodes(compose)
    problems = []
    if len(nodes) < 3:
        problems.append(f"{len(nodes)} Kafka nodes: three replicas and a quorum need three")
    if len({svc["image"] for svc in nodes.values()}) > 1:
        problems.append("Kafka nodes run different images")
    volumes = compose.get("volumes") or {}
    cluster_ids: dict[str, str] = {}
    voter_lists: set[str] = set()
    ids: dict[str, int] = {}
    used_volumes: dict[str, str] = {}
    advertised: set[tuple[str, int]] = set()
    for name, node in nodes.items():
        env = kafka_env(node)
        if not resolved_env(node).get("CLUSTER_ID"):
            problems.append(f"{name}: CLUSTER_ID is not set (the image's default id would do)")
        cluster_ids[name] = env["CLUSTER_ID"]
        props = kafka_properties(node)
        if set(props["process.roles"].split(",")) != {"broker", "controller"}:
            problems.append(f"{name}: process.roles {props['process.roles']}")
        ids[name] = int(props["node.id"])
        voter_lists.add(props["controller.quorum.voters"])
        listening = listeners(props["listeners"])
        for proto, (host, port) in listeners(props["advertised.listeners"]).items():
            if host != name:
                problems.append(f"{name}: advertises {proto} on {host}, not its service name")
            if listening.get(proto, ("", -1))[1] != port:
                problems.append(f"{name}: advertises {proto} on {port}, listens on {listening}")
            advertised.add((host, port))
        mounts = {}
        for entry in node.get("volumes") or []:
            source, _, target = str(entry).partition(":")
            mounts[PurePosixPath(target.split(":")[0])] = source
        for log_dir in props["log.dirs"].split(","):
            path = PurePosixPath(log_dir.strip())
            on = [s for t, s in mounts.items() if path == t or path.is_relative_to(t)]
            if not on or on[0] not in volumes:
                problems.append(
                    f"{name}: log dir {path} is not on a named volume: a new container starts "
                    "with no data and no cluster metadata"
                )
                continue
            if on[0] in used_volumes:
                problems.append(f"{name}: shares volume {on[0]} with {used_volumes[on[0]]}")
            used_volumes[on[0]] = name
    if len(set(cluster_ids.values())) > 1:
        problems.append(f"Kafka nodes disagree on CLUSTER_ID: {cluster_ids}")
    if len(set(ids.values())) < len(ids):
        problems.append(f"Kafka node ids repeat: {ids}")
    if len(voter_lists) > 1:
        problems.append(f"Kafka nodes disagree on controller.quorum.voters: {voter_lists}")
    for voters in voter_lists:
        wanted = set()
        for name, node in nodes.items():
            port = listeners(kafka_properties(node)["listeners"]).get("CONTROLLER", ("", 0))[1]
            wanted.add(f"{ids[name]}@{name}:{port}")
        if set(voters.split(",")) != wanted:
            problems.append(f"controller.quorum.voters {voters} is not every node: {wanted}")
    for name, svc in compose["services"].items():
        bootstrap = resolved_env(svc).get("SWITCHBOARD_KAFKA_BOOTSTRAP")
        if bootstrap is None:
            continue
        servers = set()
        for server in bootstrap.split(","):
            host, _, port_text = server.strip().rpartition(":")
            servers.add((host, int(port_text)))
        if not servers <= advertised:
            problems.append(f"{name}: bootstraps from {servers - advertised}, not advertised")
        if servers != advertised:
            problems.append(f"{name}: bootstrap list {bootstrap} is not every node")
    return problems


def check_message_sizes(compose: Mapping[str, Any]) -> Problems:
    """Every broker takes and replicates a record as large as SWITCHBOARD_MAX_MESSAGE_BYTES, with
    the default and with another value of the variable (they must follow the same one)."""
    problems = []
    for shell in (
        REQUIRED_STANDINS,
        {**REQUIRED_STANDINS, "SWITCHBOARD_MAX_MESSAGE_BYTES": "20971520"},
    ):
        for name, svc in app_services_of(compose).items():
            limit = int(setting(svc, "SWITCHBOARD_MAX_MESSAGE_BYTES", shell))
            for node_name, node in kafka_nodes(compose).items():
                props = kafka_properties(node, shell)
                for prop in (
                    "message.max.bytes",
                    "replica.fetch.max.bytes",
                    "socket.request.max.bytes",
                ):
                    if int(props[prop]) < limit:
                        problems.append(
                            f"{node_name}: {prop}={props[prop]} is below {name}'s "
                            f"SWITCHBOARD_MAX_MESSAGE_BYTES={limit} (with the shell's "
                            f"SWITCHBOARD_MAX_MESSAGE_BYTES={shell.get('SWITCHBOARD_MAX_MESSAGE_BYTES', 'unset')})"
                        )
    return sorted(set(problems))


def check_topic_auto_creation(compose: Mapping[str, Any]) -> Problems:
    return [
        f"{name}: auto.create.topics.enable={value}: a client touching a missing topic would "
        "create it with one partition, or bring back a deleted reply topic"
        for name, node in kafka_nodes(compose).items()
        if (value := kafka_properties(node)["auto.create.topics.enable"]) != "false"
    ]


def check_replication(compose: Mapping[str, Any]) -> Problems:
    """Replicas fit the nodes, and a node can be lost without losing or refusing a write."""
    nodes = len(kafka_nodes(compose))
    problems = []
    for name, svc in app_services_of(compose).items():
        rf = int(setting(svc, "SWITCHBOARD_REPLICATION_FACTOR"))
        isr = int(setting(svc, "SWITCHBOARD_MIN_INSYNC_REPLICAS"))
        if rf > nodes:
            problems.append(f"{name}: replication factor {rf} > {nodes} Kafka nodes")
        if isr > rf:
            problems.append(f"{name}: min.insync.replicas {isr} > replication factor {rf}")
        elif isr >= rf:
            problems.append(
                f"{name}: min.insync.replicas {isr} = replicas: a node's loss stops writes"
            )
        if isr < 2:
            problems.append(f"{name}: min.insync.replicas {isr}: a write could live on one node")
    for name, node in kafka_nodes(compose).items():
        props = kafka_properties(node)
        for topic, rf_prop, isr_prop in (
            ("consumer offsets", "offsets.topic.replication.factor", None),
            (
                "transactions",
                "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr",
            ),
            (
                "share groups",
                "share.coordinator.state.topic.replication.factor",
                "share.coordinator.state.topic.min.isr",
            ),
            ("topics made by hand", "default.replication.factor", "min.insync.replicas"),
        ):
            rf = int(props[rf_prop])
            if rf > nodes:
                problems.append(f"{name}: {rf_prop}={rf} > {nodes} Kafka nodes ({topic})")
            if isr_prop and int(props[isr_prop]) > rf:
                problems.append(f"{name}: {isr_prop}={props[isr_prop]} > {rf_prop}={rf}")
    return problems


def check_topic_settings_agree(compose: Mapping[str, Any]) -> Problems:
    """Every service creates the topics it uses on start: they must all create the same topics."""
    problems = []
    for variable in TOPIC_SETTINGS:
        values = {name: setting(svc, variable) for name, svc in app_services_of(compose).items()}
        if len(set(values.values())) > 1:
            problems.append(f"services disagree on {variable}: {values}")
    return problems


def check_partitions(compose: Mapping[str, Any]) -> Problems:
    """Enough partitions for the most replicas the docs run of any Switchboard service (a consumer
    group has at most one busy member per partition), and never fewer than two."""
    apps = app_services_of(compose)
    most = max((n for name, n in documented_replicas().items() if name in apps), default=1)
    wanted = max(most, 2)
    return [
        f"{name}: SWITCHBOARD_PARTITIONS={partitions}: the docs scale a service to {most} "
        f"replicas, which needs at least {wanted} partitions"
        for name, svc in apps.items()
        if (partitions := int(setting(svc, "SWITCHBOARD_PARTITIONS"))) < wanted
    ]


def check_session_timeout(compose: Mapping[str, Any]) -> Problems:
    """The brokers refuse a group member whose session timeout is outside
    group.min/max.session.timeout.ms: that member would never join."""
    problems = []
    for name, svc in app_services_of(compose).items():
        timeout = int(setting(svc, "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS"))
        for node_name, node in kafka_nodes(compose).items():
            props = kafka_properties(node)
            low = int(props["group.min.session.timeout.ms"])
            high = int(props["group.max.session.timeout.ms"])
            if not low <= timeout <= high:
                problems.append(
                    f"{name}: SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS={timeout} is outside "
                    f"{node_name}'s group.min/max.session.timeout.ms [{low}, {high}]"
                )
    return problems


def check_image_tags(compose: Mapping[str, Any]) -> Problems:
    problems = []
    for name, svc in compose["services"].items():
        if "build" in svc:
            continue
        image = interpolate(svc.get("image", ""), REQUIRED_STANDINS)
        repo, _, tag = image.rpartition(":")
        if repo not in KNOWN_IMAGES:
            problems.append(f"{name}: image {image}: {repo or image} is not an image checked here")
            continue
        pattern, tags, _source = KNOWN_IMAGES[repo]
        if not re.fullmatch(pattern, tag):
            problems.append(
                f"{name}: {image}: {tag!r} is not a {repo} tag (tags look like {pattern})"
            )
        elif tag not in tags:
            problems.append(
                f"{name}: {image}: not a tag checked to exist (KNOWN_IMAGES has {sorted(tags)})"
            )
    return problems


def check_no_credentials_in_the_open(compose: Mapping[str, Any]) -> Problems:
    """No password inside a URL, and no secret's value anywhere `docker inspect` or `ps` shows:
    environment, command, entrypoint, labels, healthcheck."""
    problems = []
    secrets = {v: k for k, v in REQUIRED_STANDINS.items()}
    for name, svc in compose["services"].items():
        for key, value in resolved_env(svc).items():
            for word in value.split(","):
                if "://" in word:
                    try:
                        password = urlsplit(word.strip()).password
                    except ValueError:
                        password = None
                    if password:
                        problems.append(f"{name}: {key} carries a credential inside a URL")
        shown = json.dumps(interpolate_tree(svc, REQUIRED_STANDINS))
        for value, variable in secrets.items():
            if value in shown:
                problems.append(
                    f"{name}: the value of {variable} is in its definition, where `docker "
                    "inspect` shows it; mount it as a secret file instead"
                )
    return problems


def check_secrets(compose: Mapping[str, Any]) -> Problems:
    """Each service gets the secret files its settings need, from variables compose requires;
    the servers read the same secrets their clients do."""
    problems = []
    defined = compose.get("secrets") or {}
    for secret, spec in defined.items():
        if not (spec or {}).get("environment") and not (spec or {}).get("external"):
            problems.append(f"secret {secret}: not from an environment variable")
    apps = app_services_of(compose)
    sources: dict[str, dict[str, str]] = {}  # secret file → {service: secret it comes from}
    for name, svc in apps.items():
        mounted = secret_mounts(svc)
        for file in SECRET_FILES_BY_COMMAND.get(command_of(svc)[0], set()):
            path = f"{SECRETS_DIR}/{file}"
            if path not in mounted:
                why = " (the metrics SQL endpoint's token)" if "metrics_token" in file else ""
                problems.append(f"{name}: no secret file {path}{why}")
            else:
                sources.setdefault(file, {})[name] = mounted[path]
    for file, by_service in sources.items():
        if len(set(by_service.values())) > 1:
            problems.append(f"services read {file} from different secrets: {by_service}")
    clickhouse_password = set(sources.get("switchboard_clickhouse_password", {}).values())
    redis_password = set(sources.get("switchboard_redis_password", {}).values())
    for name, svc in compose["services"].items():
        image = str(svc.get("image", ""))
        mounted = secret_mounts(svc)
        if image.startswith("clickhouse/clickhouse-server:"):
            env = resolved_env(svc)
            path = env.get("CLICKHOUSE_PASSWORD_FILE", "")
            if mounted.get(path) is None or {mounted[path]} != clickhouse_password:
                problems.append(
                    f"{name}: CLICKHOUSE_PASSWORD_FILE={path or 'unset'} is not the secret the "
                    f"metrics service reads ({clickhouse_password})"
                )
        if image.startswith("redis:"):
            shown = json.dumps([svc.get("entrypoint"), svc.get("command"), svc.get("healthcheck")])
            files = set(re.findall(r"/run/secrets/[\w.-]+", shown))
            if not files or any({mounted.get(f)} != redis_password for f in files):
                problems.append(f"{name}: does not require the workers' Redis password")
            if "REDISCLI_AUTH" not in json.dumps(svc.get("healthcheck")):
                problems.append(f"{name}: its healthcheck does not authenticate")
    return problems


def check_limits_and_logging(compose: Mapping[str, Any]) -> Problems:
    """Every container has a memory and CPU limit and rotated logs; a Redis reaches its
    maxmemory before its container's limit."""
    problems = []
    for name, svc in compose["services"].items():
        limits = ((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        memory = interpolate(limits.get("memory", ""), REQUIRED_STANDINS)
        if not memory or compose_bytes(memory) <= 0:
            problems.append(f"{name}: no memory limit (deploy.resources.limits.memory)")
        cpus = interpolate(limits.get("cpus", ""), REQUIRED_STANDINS)
        if not cpus or float(cpus) <= 0:
            problems.append(f"{name}: no CPU limit (deploy.resources.limits.cpus)")
        logging = svc.get("logging") or {}
        options = logging.get("options") or {}
        if logging.get("driver") != "json-file" or not {"max-size", "max-file"} <= set(options):
            problems.append(f"{name}: logs are not rotated (json-file with max-size and max-file)")
        if str(svc.get("image", "")).startswith("redis:") and memory:
            flags = redis_flags(svc, REQUIRED_STANDINS)
            if "maxmemory" not in flags:
                problems.append(f"{name}: no maxmemory: the container's limit would kill Redis")
            elif redis_bytes(flags["maxmemory"]) >= compose_bytes(memory):
                problems.append(
                    f"{name}: maxmemory {flags['maxmemory']} is not below its limit {memory}"
                )
    return problems


def check_router_behind_the_load_balancer(compose: Mapping[str, Any]) -> Problems:
    """The routers publish no port (so they scale); HAProxy publishes the API, finds every router
    replica through Docker's DNS, asks each one's /ready, and waits as long as the slowest tier."""
    problems = []
    router_name, router = only(app_services_of(compose), "router")
    if router.get("ports"):
        problems.append(f"{router_name}: publishes {router['ports']}: `--scale router=N` cannot")
    if "container_name" in router:
        problems.append(f"{router_name}: container_name breaks `--scale router=N`")
    port = int(resolved_env(router)["SWITCHBOARD_PORT"])
    found = lb_service(compose)
    if found is None:
        return [*problems, "no service runs deploy/haproxy/haproxy.cfg"]
    lb_name, lb = found
    binds = {int(args[0].rpartition(":")[2]) for args in haproxy_directives("frontend api", "bind")}
    targets = {target for _, target in published(lb)}
    if not binds or targets != binds:
        problems.append(f"{lb_name}: publishes {targets}, the api frontend binds {binds}")
    templates = haproxy_directives("backend routers", "server-template")
    hosts = {tuple(args[2].rpartition(":")[::2]) for args in templates}
    if hosts != {(router_name, str(port))}:
        problems.append(f"haproxy sends to {hosts}, the routers listen on {router_name}:{port}")
    slots = sum(int(args[1]) for args in templates)
    if slots < documented_replicas().get(router_name, 1):
        problems.append(f"haproxy has {slots} router slots, the docs scale to more")
    checks = haproxy_directives("backend routers", "http-check send")
    paths = {args[args.index("uri") + 1] for args in checks if "uri" in args}
    if paths != {"/ready"}:
        problems.append(f"haproxy checks the routers at {paths or 'no path'}, not /ready")
    nameservers = {args[1] for args in haproxy_directives("resolvers docker", "nameserver")}
    if nameservers != {"127.0.0.11:53"}:
        problems.append(f"haproxy resolves with {nameservers}, not Docker's DNS 127.0.0.11:53")
    routing = load_config(
        ROOT / "config" / PurePosixPath(resolved_env(router)["SWITCHBOARD_CONFIG"]).name
    )
    grace = RouterSettings.model_fields["reply_grace_s"].default
    longest = max(routing.tier(t).request_timeout_s for t in routing.tier_names) + grace
    for which in ("client", "server"):
        values = [
            haproxy_seconds(a[1])
            for a in haproxy_directives("defaults", "timeout")
            if a[0] == which
        ]
        if not values or values[0] < longest:
            problems.append(f"haproxy timeout {which} {values} s < the slowest answer, {longest} s")
    maxconn = [int(args[0]) for args in haproxy_directives("global", "maxconn")]
    nofile = ((lb.get("ulimits") or {}).get("nofile") or {}).get("soft", 0)
    if maxconn and int(nofile) < 2 * maxconn[0] + 20:
        problems.append(f"{lb_name}: nofile {nofile} < 2 x maxconn {maxconn[0]}: HAProxy exits")
    if (lb.get("depends_on") or {}).get(router_name, {}).get("condition") != "service_healthy":
        problems.append(f"{lb_name}: does not wait for a healthy router")
    return problems


def check_waits_for_topics(compose: Mapping[str, Any]) -> Problems:
    """`topics` creates every topic once the Kafka nodes are up, then exits; every Switchboard
    service starts only once it has succeeded."""
    apps = app_services_of(compose)
    one_shots = [n for n, s in apps.items() if command_of(s) == ["topics"]]
    if len(one_shots) != 1:
        return [f"expected one service running `topics`, found {one_shots}"]
    (topics,) = one_shots
    problems = []
    svc = apps[topics]
    if str(svc.get("restart", "no")) != "no":
        problems.append(f"{topics}: restart {svc.get('restart')}: a one-shot must not restart")
    deps = svc.get("depends_on") or {}
    for node in kafka_nodes(compose):
        if (deps.get(node) or {}).get("condition") != "service_healthy":
            problems.append(f"{topics}: does not wait for {node} to be healthy")
    for name, other in apps.items():
        if name == topics:
            continue
        condition = ((other.get("depends_on") or {}).get(topics) or {}).get("condition")
        if condition != "service_completed_successfully":
            problems.append(
                f"{name}: does not wait for `{topics}` to complete successfully ({condition})"
            )
    return problems


CHECKS: list[Callable[[Mapping[str, Any]], Problems]] = [
    check_compose_spec,
    check_kafka_cluster,
    check_message_sizes,
    check_topic_auto_creation,
    check_replication,
    check_topic_settings_agree,
    check_partitions,
    check_session_timeout,
    check_image_tags,
    check_no_credentials_in_the_open,
    check_secrets,
    check_limits_and_logging,
    check_router_behind_the_load_balancer,
    check_waits_for_topics,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_the_compose_file_passes(
    compose: dict[str, Any], check: Callable[[Mapping[str, Any]], Problems]
) -> None:
    assert check(compose) == []


# --- breakages each check must catch ---------------------------------------------------------------


def for_apps(compose: dict[str, Any], variable: str, value: str) -> None:
    for svc in app_services_of(compose).values():
        svc["environment"][variable] = value


def for_nodes(compose: dict[str, Any], variable: str, value: str | None, only: str = "") -> None:
    for name, node in kafka_nodes(compose).items():
        if only and name != only:
            continue
        if value is None:
            node["environment"].pop(variable, None)
        else:
            node["environment"][variable] = value


def svc(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def drop_kafka_3(compose: dict[str, Any]) -> None:
    del compose["services"]["kafka-3"]
    voters = "1@kafka-1:9093,2@kafka-2:9093"
    for_nodes(compose, "KAFKA_CONTROLLER_QUORUM_VOTERS", voters)
    for name in ("topics", *app_services_of(compose)):
        svc(compose, name).get("depends_on", {}).pop("kafka-3", None)
    for_apps(compose, "SWITCHBOARD_KAFKA_BOOTSTRAP", "kafka-1:9092,kafka-2:9092")


Breakage = Callable[[dict[str, Any]], None]
BREAKAGES: list[Any] = [
    # Kafka's data
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_LOG_DIRS", None, only="kafka-2"),
        check_kafka_cluster,
        "kafka-2: log dir /tmp/kraft-combined-logs is not on a named volume",
        id="kafka-log-dir-unset",
    ),
    pytest.param(
        lambda c: svc(c, "kafka-1").update(volumes=["kafka-1-data:/var/lib/kafka/other"]),
        check_kafka_cluster,
        "kafka-1: log dir /var/lib/kafka/data is not on a named volume",
        id="kafka-volume-elsewhere",
    ),
    pytest.param(
        lambda c: svc(c, "kafka-3").update(volumes=["/srv/kafka:/var/lib/kafka/data"]),
        check_kafka_cluster,
        "kafka-3: log dir /var/lib/kafka/data is not on a named volume",
        id="kafka-bind-mount",
    ),
    pytest.param(
        lambda c: svc(c, "kafka-3").update(volumes=["kafka-1-data:/var/lib/kafka/data"]),
        check_kafka_cluster,
        "shares volume kafka-1-data",
        id="kafka-shared-volume",
    ),
    pytest.param(
        lambda c: for_nodes(c, "CLUSTER_ID", None, only="kafka-1"),
        check_kafka_cluster,
        "kafka-1: CLUSTER_ID is not set",
        id="cluster-id-removed",
    ),
    pytest.param(
        lambda c: for_nodes(c, "CLUSTER_ID", None),
        check_kafka_cluster,
        "CLUSTER_ID is not set",
        id="cluster-id-removed-everywhere",
    ),
    pytest.param(
        lambda c: for_nodes(c, "CLUSTER_ID", "otherClusterId0000000A", only="kafka-3"),
        check_kafka_cluster,
        "Kafka nodes disagree on CLUSTER_ID",
        id="cluster-id-differs",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_CONTROLLER_QUORUM_VOTERS", "1@kafka-1:9093", only="kafka-1"),
        check_kafka_cluster,
        "disagree on controller.quorum.voters",
        id="voters-differ",
    ),
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_KAFKA_BOOTSTRAP", "kafka-1:9092"),
        check_kafka_cluster,
        "is not every node",
        id="bootstrap-one-node",
    ),
    # partitions
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_PARTITIONS", "1"),
        check_partitions,
        "SWITCHBOARD_PARTITIONS=1",
        id="partitions-1",
    ),
    pytest.param(
        lambda c: svc(c, "worker-fast")["environment"].update(SWITCHBOARD_PARTITIONS="3"),
        check_topic_settings_agree,
        "services disagree on SWITCHBOARD_PARTITIONS",
        id="partitions-differ",
    ),
    # image tags
    pytest.param(
        lambda c: svc(c, "clickhouse").update(image="clickhouse/clickhouse-server:25.13"),
        check_image_tags,
        "'25.13' is not a clickhouse/clickhouse-server tag",
        id="clickhouse-month-13",
    ),
    pytest.param(
        lambda c: svc(c, "clickhouse").update(image="clickhouse/clickhouse-server:25.8.1"),
        check_image_tags,
        "is not a clickhouse/clickhouse-server tag",
        id="clickhouse-three-part",
    ),
    pytest.param(
        lambda c: svc(c, "clickhouse").update(image="clickhouse/clickhouse-server:26.4"),
        check_image_tags,
        "clickhouse/clickhouse-server:26.4: not a tag checked to exist",
        id="clickhouse-unchecked",
    ),
    pytest.param(
        lambda c: svc(c, "clickhouse").update(image="clickhouse/clickhouse-server:latest"),
        check_image_tags,
        "'latest' is not a clickhouse/clickhouse-server tag",
        id="clickhouse-latest",
    ),
    pytest.param(
        lambda c: svc(c, "kafka-2").update(image="apache/kafka:4.1"),
        check_image_tags,
        "'4.1' is not a apache/kafka tag",
        id="kafka-tag",
    ),
    pytest.param(
        lambda c: svc(c, "redis").update(image="redis:7-alpne"),
        check_image_tags,
        "'7-alpne' is not a redis tag",
        id="redis-tag",
    ),
    pytest.param(
        lambda c: svc(c, "lb").update(image="haproxy:3.2.99-alpine"),
        check_image_tags,
        "not a tag checked to exist",
        id="haproxy-tag",
    ),
    pytest.param(
        lambda c: svc(c, "prometheus").update(image="prom/prometheus:3.5.0"),
        check_image_tags,
        "'3.5.0' is not a prom/prometheus tag",
        id="prometheus-tag",
    ),
    pytest.param(
        lambda c: svc(c, "grafana").update(image="grafana/grafana:12.4"),
        check_image_tags,
        "'12.4' is not a grafana/grafana tag",
        id="grafana-tag",
    ),
    pytest.param(
        lambda c: svc(c, "redis").update(image="bitnami/redis:7.4"),
        check_image_tags,
        "bitnami/redis is not an image checked here",
        id="unknown-image",
    ),
    # session timeout
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS", "5000"),
        check_session_timeout,
        "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS=5000 is outside",
        id="session-timeout-below-min",
    ),
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS", "1800001"),
        check_session_timeout,
        "SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS=1800001 is outside",
        id="session-timeout-above-max",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS", "10000", only="kafka-2"),
        check_session_timeout,
        "kafka-2's group.min/max.session.timeout.ms [10000, 1800000]",
        id="broker-min-session-raised",
    ),
    # message sizes
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_MAX_MESSAGE_BYTES", "20971520"),
        check_message_sizes,
        "message.max.bytes=10485760 is below",
        id="max-message-bytes-over-broker",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_REPLICA_FETCH_MAX_BYTES", None, only="kafka-1"),
        check_message_sizes,
        "kafka-1: replica.fetch.max.bytes=1048576 is below",
        id="replica-fetch-default",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_MESSAGE_MAX_BYTES", "10485760"),
        check_message_sizes,
        "message.max.bytes=10485760 is below router's SWITCHBOARD_MAX_MESSAGE_BYTES=20971520",
        id="broker-size-not-from-the-variable",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_SOCKET_REQUEST_MAX_BYTES", "1048576"),
        check_message_sizes,
        "socket.request.max.bytes=1048576 is below",
        id="socket-request-too-small",
    ),
    # auto topic creation
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true", only="kafka-2"),
        check_topic_auto_creation,
        "kafka-2: auto.create.topics.enable=true",
        id="auto-create-on",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_AUTO_CREATE_TOPICS_ENABLE", None, only="kafka-3"),
        check_topic_auto_creation,
        "kafka-3: auto.create.topics.enable=true",
        id="auto-create-default",
    ),
    # replication
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_REPLICATION_FACTOR", "4"),
        check_replication,
        "replication factor 4 > 3 Kafka nodes",
        id="replication-over-nodes",
    ),
    pytest.param(
        drop_kafka_3,
        check_replication,
        "replication factor 3 > 2 Kafka nodes",
        id="a-node-removed",
    ),
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_MIN_INSYNC_REPLICAS", "4"),
        check_replication,
        "min.insync.replicas 4 > replication factor 3",
        id="min-isr-over-replicas",
    ),
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_MIN_INSYNC_REPLICAS", "3"),
        check_replication,
        "a node's loss stops writes",
        id="min-isr-equals-replicas",
    ),
    pytest.param(
        lambda c: for_apps(c, "SWITCHBOARD_MIN_INSYNC_REPLICAS", "1"),
        check_replication,
        "a write could live on one node",
        id="min-isr-1",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "4"),
        check_replication,
        "offsets.topic.replication.factor=4 > 3 Kafka nodes",
        id="offsets-replication-over-nodes",
    ),
    pytest.param(
        lambda c: for_nodes(c, "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "4"),
        check_replication,
        "transaction.state.log.min.isr=4 > transaction.state.log.replication.factor=3",
        id="transactions-min-isr",
    ),
    # credentials
    pytest.param(
        lambda c: svc(c, "metrics")["environment"].update(
            SWITCHBOARD_CLICKHOUSE_URL="http://${CLICKHOUSE_USER:-switchboard}:${CLICKHOUSE_PASSWORD}@clickhouse:8123"
        ),
        check_no_credentials_in_the_open,
        "metrics: SWITCHBOARD_CLICKHOUSE_URL carries a credential inside a URL",
        id="clickhouse-password-in-url",
    ),
    pytest.param(
        lambda c: svc(c, "worker-fast")["environment"].update(
            SWITCHBOARD_OUTCOME_REDIS_URL="redis://:hunter2@redis-outcomes:6379/0"
        ),
        check_no_credentials_in_the_open,
        "worker-fast: SWITCHBOARD_OUTCOME_REDIS_URL carries a credential inside a URL",
        id="redis-password-in-url",
    ),
    pytest.param(
        lambda c: svc(c, "clickhouse")["environment"].update(
            CLICKHOUSE_PASSWORD="${CLICKHOUSE_PASSWORD}"
        ),
        check_no_credentials_in_the_open,
        "clickhouse: the value of CLICKHOUSE_PASSWORD is in its definition",
        id="password-in-environment",
    ),
    pytest.param(
        lambda c: svc(c, "redis")["command"].extend(["--requirepass", "${REDIS_PASSWORD}"]),
        check_no_credentials_in_the_open,
        "redis: the value of REDIS_PASSWORD is in its definition",
        id="password-on-the-command-line",
    ),
    # the metrics endpoint's token and the other secrets
    pytest.param(
        lambda c: svc(c, "metrics").update(secrets=["switchboard_clickhouse_password"]),
        check_secrets,
        "metrics: no secret file /run/secrets/switchboard_metrics_token (the metrics SQL endpoint's token)",
        id="metrics-without-token",
    ),
    pytest.param(
        lambda c: svc(c, "controller").update(secrets=[]),
        check_secrets,
        "controller: no secret file /run/secrets/switchboard_metrics_token",
        id="controller-without-token",
    ),
    pytest.param(
        lambda c: svc(c, "router").update(secrets=["switchboard_metrics_token"]),
        check_secrets,
        "router: no secret file /run/secrets/switchboard_api_key",
        id="router-without-api-key",
    ),
    pytest.param(
        lambda c: svc(c, "clickhouse")["environment"].pop("CLICKHOUSE_PASSWORD_FILE"),
        check_secrets,
        "clickhouse: CLICKHOUSE_PASSWORD_FILE=unset",
        id="clickhouse-server-without-password",
    ),
    pytest.param(
        lambda c: svc(c, "redis-outcomes").update(entrypoint=None, secrets=[]),
        check_secrets,
        "redis-outcomes: does not require the workers' Redis password",
        id="redis-without-password",
    ),
    pytest.param(
        lambda c: c["secrets"]["switchboard_api_key"].update(
            environment=None, file="./api-key.txt"
        ),
        check_secrets,
        "secret switchboard_api_key: not from an environment variable",
        id="secret-from-a-file",
    ),
    # limits and log rotation
    pytest.param(
        lambda c: svc(c, "grafana").pop("deploy"),
        check_limits_and_logging,
        "grafana: no memory limit",
        id="no-limits",
    ),
    pytest.param(
        lambda c: svc(c, "kafka-1")["deploy"]["resources"]["limits"].pop("cpus"),
        check_limits_and_logging,
        "kafka-1: no CPU limit",
        id="no-cpu-limit",
    ),
    pytest.param(
        lambda c: svc(c, "redis").pop("logging"),
        check_limits_and_logging,
        "redis: logs are not rotated",
        id="no-log-rotation",
    ),
    pytest.param(
        lambda c: svc(c, "router")["logging"]["options"].pop("max-size"),
        check_limits_and_logging,
        "router: logs are not rotated",
        id="log-size-unbounded",
    ),
    pytest.param(
        lambda c: svc(c, "redis-outcomes")["command"].__setitem__(1, "2gb"),
        check_limits_and_logging,
        "redis-outcomes: maxmemory 2gb is not below its limit",
        id="redis-maxmemory-over-limit",
    ),
    # the router behind the load balancer
    pytest.param(
        lambda c: svc(c, "router").update(ports=["8080:8080"]),
        check_router_behind_the_load_balancer,
        "router: publishes ['8080:8080']",
        id="router-fixed-host-port",
    ),
    pytest.param(
        lambda c: svc(c, "router").update(container_name="router"),
        check_router_behind_the_load_balancer,
        "container_name breaks",
        id="router-container-name",
    ),
    pytest.param(
        lambda c: svc(c, "router")["environment"].update(SWITCHBOARD_PORT="8000"),
        check_router_behind_the_load_balancer,
        "the routers listen on router:8000",
        id="router-port-moved",
    ),
    pytest.param(
        lambda c: svc(c, "lb").pop("ulimits"),
        check_router_behind_the_load_balancer,
        "lb: nofile 0 < 2 x maxconn 10000",
        id="lb-descriptors",
    ),
    pytest.param(
        lambda c: svc(c, "lb").update(ports=["80:80"]),
        check_router_behind_the_load_balancer,
        "lb: publishes {80}, the api frontend binds {8080}",
        id="lb-publishes-another-port",
    ),
    # start-up order
    pytest.param(
        lambda c: svc(c, "worker-fast")["depends_on"].pop("topics"),
        check_waits_for_topics,
        "worker-fast: does not wait for `topics` to complete successfully",
        id="worker-not-waiting-for-topics",
    ),
    pytest.param(
        lambda c: svc(c, "metrics")["depends_on"]["topics"].update(condition="service_started"),
        check_waits_for_topics,
        "metrics: does not wait for `topics` to complete successfully (service_started)",
        id="metrics-waits-for-start-only",
    ),
    pytest.param(
        lambda c: svc(c, "topics").update(restart="unless-stopped"),
        check_waits_for_topics,
        "topics: restart unless-stopped",
        id="topics-restarts",
    ),
    pytest.param(
        lambda c: svc(c, "topics")["depends_on"].pop("kafka-2"),
        check_waits_for_topics,
        "topics: does not wait for kafka-2",
        id="topics-not-waiting-for-a-node",
    ),
]


@pytest.mark.parametrize(("breakage", "check", "says"), BREAKAGES)
def test_each_breakage_fails_a_check(
    compose: dict[str, Any],
    breakage: Breakage,
    check: Callable[[Mapping[str, Any]], Problems],
    says: str,
) -> None:
    broken = json.loads(json.dumps(compose))
    breakage(broken)
    problems = check(broken)
    assert any(says in p for p in problems), f"{check.__name__} did not say {says!r}: {problems}"
    assert check(compose) == [], "the breakage changed the original"


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        pytest.param(
            lambda c: svc(c, "router").update(environmnet={}), "environmnet", id="unknown-key"
        ),
        pytest.param(
            lambda c: svc(c, "router")["depends_on"]["topics"].update(condition="completed"),
            "completed",
            id="bad-condition",
        ),
        pytest.param(
            lambda c: svc(c, "router")["deploy"]["resources"]["limits"].update(memory="lots"),
            "unit",
            id="bad-memory",
        ),
        pytest.param(
            lambda c: svc(c, "router").update(stop_grace_period="100 seconds"),
            "duration",
            id="bad-duration",
        ),
        pytest.param(
            lambda c: svc(c, "metrics")["secrets"].append("switchboard_nothing"),
            "switchboard_nothing",
            id="undefined-secret",
        ),
        pytest.param(
            lambda c: svc(c, "clickhouse").update(ulimits={"nofile": {"soft": "many"}}),
            '"many", expected u64',
            id="bad-ulimit",
        ),
    ],
)
def test_the_specification_check_refuses(
    compose: dict[str, Any], breakage: Breakage, says: str
) -> None:
    broken = json.loads(json.dumps(compose))
    breakage(broken)
    problems = check_compose_spec(broken)
    assert problems and says in problems[0], problems


def test_the_check_helpers_read_the_kafka_image_and_the_docs_as_they_are() -> None:
    """The checks above are only as good as these helpers."""
    # apache/kafka docker/examples/README.md: "For abc.def, use KAFKA_ABC_DEF; for abc-def, use
    # KAFKA_ABC___DEF; for abc_def, use KAFKA_ABC__DEF"
    assert kafka_property_name("KAFKA_ABC_DEF") == "abc.def"
    assert kafka_property_name("KAFKA_ABC___DEF") == "abc-def"
    assert kafka_property_name("KAFKA_ABC__DEF") == "abc_def"
    assert kafka_property_name("KAFKA_MESSAGE_MAX_BYTES") == "message.max.bytes"
    assert kafka_property_name("KAFKA_LOG_DIRS") == "log.dirs"
    for repo, (pattern, tags, source) in KNOWN_IMAGES.items():
        assert source and all(re.fullmatch(pattern, t) for t in tags), repo
    assert compose_bytes("1280m") == 1280 * 1024**2 and compose_bytes("1g") == 1024**3
    assert redis_bytes("1gb") == 1024**3 and redis_bytes("1g") == 10**9
    assert haproxy_seconds("910s") == 910 and haproxy_seconds("500") == 0.5
    # the scaling the docs show is what the partition and load-balancer checks hold to
    scaled = documented_replicas()
    assert scaled.get("router", 0) >= 2 and scaled.get("worker-fast", 0) >= 2, scaled


# --- routing config and image ---------------------------------------------------------------------


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
    from switchboard import topics_cmd

    started: list[tuple[str, str | None]] = []

    def fake_run_service(name: str, tier: str | None = None) -> int:
        started.append((name, tier))
        return 0

    def fake_topics(check: bool = False) -> int:
        started.append(("topics", "--check" if check else None))
        return 0

    monkeypatch.setattr(cli, "_run_service", fake_run_service)
    monkeypatch.setattr(topics_cmd, "main", fake_topics)
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
    compose: dict[str, Any],
    app_services: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The values, not just the names: each service's settings build from its compose env and
    its secret files (each file read as the setting it names)."""
    for name, svc in app_services.items():
        command, settings = settings_of(svc, monkeypatch, compose)
        settings_cls = SETTINGS_BY_COMMAND[command]
        for key, value in resolved_env(svc).items():
            field = field_name(key)
            if key.startswith(ENV_PREFIX) and value and field in settings_cls.model_fields:
                assert getattr(settings, field) is not None, f"{name}: {key} ignored"
        for path, value in secret_files(svc, compose).items():
            field = field_name(PurePosixPath(path).name.upper())
            assert field in settings_cls.model_fields, f"{name}: {path} is no setting"
            secret = getattr(settings, field)
            assert secret is not None and secret.get_secret_value() == value, f"{name}: {path}"


def test_compose_requires_the_secrets_instead_of_defaulting_them(
    compose: dict[str, Any],
) -> None:
    """Every secret comes from a variable with no default (compose refuses to start a service
    whose secret's variable is unset), and every variable a test stands in for is one of them."""
    sources = {secret_variable(compose, name) for name in compose.get("secrets") or {}}
    assert sources == set(REQUIRED_STANDINS), sources
    text = COMPOSE_FILE.read_text()
    for variable in REQUIRED_STANDINS:
        assert not re.search(r"\$\{" + variable + r"\b", text), f"{variable} is interpolated"


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
    """The router on every interface, unpublished (the load balancer reaches it:
    check_router_behind_the_load_balancer); the metrics endpoint on every interface too."""
    name, router = only(services, "router")
    env = resolved_env(router)
    assert env["SWITCHBOARD_HOST"] == "0.0.0.0", f"{name}: must bind all interfaces"
    assert int(env["SWITCHBOARD_PORT"]) > 0
    assert not router.get("ports"), f"{name}: reached through the load balancer only"
    found = lb_service({"services": services})
    assert found is not None and published(found[1]) == [("8080", 8080)], found

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
    token = f"{SECRETS_DIR}/switchboard_metrics_token"
    assert secret_mounts(service)[token] == secret_mounts(metrics)[token], f"{name}: other token"


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


def test_kafka_address_is_one_the_broker_advertises(compose: dict[str, Any]) -> None:
    problems = check_kafka_cluster(compose)
    assert not [p for p in problems if "advertis" in p or "bootstrap" in p], problems


def test_kafka_runs_three_kraft_nodes_without_topic_auto_creation(
    compose: dict[str, Any],
) -> None:
    nodes = kafka_nodes(compose)
    assert sorted(nodes) == ["kafka-1", "kafka-2", "kafka-3"]
    for name, node in nodes.items():
        assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", node["image"]), node["image"]
        assert "kafka-broker-api-versions.sh" in " ".join(map(str, node["healthcheck"]["test"]))
        assert "container_name" not in node and not node.get("ports"), name
    # the production shape the settings and docs describe
    _, router = only(app_services_of(compose), "router")
    assert (
        setting(router, "SWITCHBOARD_REPLICATION_FACTOR"),
        setting(router, "SWITCHBOARD_MIN_INSYNC_REPLICAS"),
    ) == ("3", "2")
    assert check_topic_auto_creation(compose) == []


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
    compose: dict[str, Any],
    app_services: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Apache Kafka has idempotent producers; only the embedded broker lacks them
    for name, svc in app_services.items():
        _, settings = settings_of(svc, monkeypatch, compose)
        assert settings.idempotent_producer, name  # type: ignore[attr-defined]


def redis_flags(svc: Mapping[str, Any], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A Redis service's `--flag value` arguments to redis-server."""
    args = [interpolate(a, os.environ if env is None else env) for a in svc.get("command") or []]
    return {a[2:]: b for a, b in itertools.pairwise(args) if a.startswith("--")}


def test_leases_and_notes_never_evict_and_outcomes_have_a_bounded_redis(
    services: dict[str, dict[str, Any]], workers: dict[str, dict[str, Any]]
) -> None:
    # a Redis that evicts may hold only outcomes (a cache); leases and delivery notes must stay
    main, outcomes = redis_flags(services["redis"]), redis_flags(services["redis-outcomes"])
    assert main.get("maxmemory-policy") == "noeviction"
    assert outcomes.get("maxmemory-policy") == "allkeys-lru" and outcomes.get("maxmemory")
    for name, svc in workers.items():
        env = resolved_env(svc)
        url = urlsplit(env["SWITCHBOARD_OUTCOME_REDIS_URL"])
        assert (url.hostname, url.port or 6379) == ("redis-outcomes", 6379), name
        assert int(env["SWITCHBOARD_OUTCOME_TTL_S"]) == WorkerSettings().outcome_ttl_s, name
        assert svc["depends_on"]["redis-outcomes"]["condition"] == "service_healthy", name


def test_redis_takes_its_password_from_the_secret_file_on_stdin(
    services: dict[str, dict[str, Any]],
) -> None:
    """The wrapper hands redis-server its config on stdin and keeps the image's entrypoint (which
    drops to the redis user); `command` stays redis-server's own arguments."""
    for name in ("redis", "redis-outcomes"):
        entrypoint = [interpolate(w, {}) for w in services[name]["entrypoint"]]
        assert entrypoint[:2] == ["sh", "-c"], name
        script = entrypoint[2]
        assert script.startswith('exec docker-entrypoint.sh redis-server - "$@" <<EOF\n'), script
        assert "requirepass $(cat /run/secrets/switchboard_redis_password)" in script, script
        assert not command_of(services[name])[0].startswith("redis-server"), name


def test_clickhouse_url_points_at_the_clickhouse_service(
    services: dict[str, dict[str, Any]],
) -> None:
    clickhouse = services["clickhouse"]
    assert str(clickhouse["image"]).startswith("clickhouse/clickhouse-server:")
    name, metrics = only(services, "metrics")
    for shell in (REQUIRED_STANDINS, {**REQUIRED_STANDINS, "CLICKHOUSE_USER": "someone"}):
        env = resolved_env(metrics, shell)
        url = urlsplit(env["SWITCHBOARD_CLICKHOUSE_URL"])
        server = resolved_env(clickhouse, shell)
        assert url.scheme == "http" and (url.hostname, url.port) == ("clickhouse", 8123), url
        assert url.username is None and url.password is None, f"{name}: credentials in the URL"
        assert env["SWITCHBOARD_CLICKHOUSE_USER"] == server["CLICKHOUSE_USER"], name
    for other, svc in services.items():
        if other != name:
            assert "SWITCHBOARD_CLICKHOUSE_URL" not in env_of(svc), other


# --- start-up order and health --------------------------------------------------------------------


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if command_of(svc)[:1] == ["topics"] and "build" in svc:
            continue  # a one-shot: the services wait for it to exit successfully instead
        check = svc.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


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
    for name, svc in long_running(app_services).items():
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


def dependencies(services: Mapping[str, dict[str, Any]], name: str) -> Iterator[str]:
    """Every service ``name`` waits for, directly or through another."""
    seen: set[str] = set()
    todo = list(services[name].get("depends_on") or {})
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            yield dep
            todo.extend(services[dep].get("depends_on") or {})


def test_services_wait_for_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    kafka = set(kafka_nodes({"services": services}))
    needs = {
        "router": kafka | {"topics"},
        "worker": kafka | {"topics", "redis", "redis-outcomes"},
        "metrics": kafka | {"topics", "clickhouse"},
        "controller": kafka | {"topics", "metrics"},
        "shadow": kafka | {"topics"},
        "topics": kafka,
    }
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on must name a condition"
        for dep, spec in deps.items():
            assert dep in services, f"{name}: depends on unknown service {dep}"
            one_shot = command_of(services[dep])[:1] == ["topics"]
            wanted = "service_completed_successfully" if one_shot else "service_healthy"
            assert spec.get("condition") == wanted, f"{name}: {dep} not {wanted}"
            if not one_shot:
                assert services[dep].get("healthcheck"), f"{name}: {dep} has no healthcheck"
        if "build" in svc:
            wanted_deps = needs[command_of(svc)[0]]
            assert wanted_deps <= set(dependencies(services, name)), (
                f"{name}: must wait for {wanted_deps}"
            )


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
