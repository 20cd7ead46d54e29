"""Prometheus and Grafana of docker-compose.yml, cross-checked against the code they watch.

deploy/prometheus/prometheus.yml must scrape every Switchboard service where its settings serve
/metrics; the Grafana dashboards in deploy/grafana/dashboards must ask only for the series
services/common/telemetry.py defines (with their labels) and only for the ClickHouse tables and
columns the migrations create; the provisioning files must point at files, services and data
source uids that exist. A renamed metric, label, column, port or service fails here rather than
as an empty panel. No Docker engine or Grafana is needed: every file is read as data.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

from schemas.topics import DEFAULT_DATABASE, EVENTS_1M_TABLE, EVENTS_TABLE
from services.common import telemetry
from services.common.runtime import metrics_route
from services.metrics.adapters.migrations import AGGREGATE_DDL
from services.metrics.domain.columns import TABLE_SCHEMA
from tests.unit.test_compose import (
    COMPOSE_FILE,
    HEALTH_ADDRESS_FIELDS,
    ONE_SHOT_COMMANDS,
    REQUIRED_STANDINS,
    ROOT,
    command_of,
    env_of,
    load_compose,
    resolved_env,
    secret_mounts,
    secret_variable,
    settings_of,
)

PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "switchboard.yml"
DASHBOARD_PROVIDERS_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "switchboard.yml"
DASHBOARD_FILES = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

# Series a dashboard may use that no Switchboard module defines: Prometheus' own per target.
PROMETHEUS_SERIES = {"up": frozenset({"job", "instance"})}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# The series names prometheus_client exposes for one metric, by the metric's type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}


# --- what the code defines ------------------------------------------------------------------------


def _metric_families(obj: object) -> list[tuple[Metric, tuple[str, ...]]]:
    """(family, label names) of a prometheus_client metric or custom collector, else []."""
    if isinstance(obj, MetricWrapperBase):
        return [(m, tuple(obj._labelnames)) for m in obj.describe()]
    describe = getattr(obj, "describe", None)
    if isinstance(obj, type) or not callable(describe):
        return []
    try:
        families = list(describe())
    except TypeError:
        return []
    return [(m, tuple(getattr(m, "_labelnames", ()))) for m in families if isinstance(m, Metric)]


def exposed_series() -> dict[str, frozenset[str]]:
    """Every series name services/common/telemetry.py exposes → the labels it carries."""
    series: dict[str, frozenset[str]] = {}
    for obj in vars(telemetry).values():
        for family, labels in _metric_families(obj):
            for suffix in SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                series[family.name + suffix] = frozenset(labels) | extra
    return series


def table_columns() -> dict[str, frozenset[str]]:
    """The columns of the ClickHouse tables the dashboards may read, from the code that makes
    them: llm_events as the writer's Arrow schema, llm_events_1m from its DDL."""
    body = AGGREGATE_DDL.split("(", 1)[1].rsplit(") ENGINE", 1)[0]
    aggregate = {
        m.group(1) for m in re.finditer(r"^\s*([a-z_][a-z0-9_]*)\s+\S", body, re.MULTILINE)
    }
    assert {"minute", "model", "latency_ms", "ttft_ms", "attempts", "cost_usd"} <= aggregate
    return {EVENTS_TABLE: frozenset(TABLE_SCHEMA.names), EVENTS_1M_TABLE: frozenset(aggregate)}


# --- PromQL ---------------------------------------------------------------------------------------

_PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
    | {"unless", "offset", "inf", "nan"}
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\{([^{}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\"")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?\b")
_IDENT = re.compile(r"(?<![\w:])([A-Za-z_:][\w:]*)")


@dataclass
class PromQL:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)  # in matchers and by/without/on clauses
    grouped_by: set[str] = field(default_factory=set)


def parse_promql(expr: str) -> PromQL:
    """The series names and label names an expression uses (enough of PromQL for our dashboards:
    selectors, ranges, aggregations with by/without, binary operators, functions)."""
    out = PromQL()
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "0", expr)  # Grafana's variables ($__rate_interval, ...)
    for m in _SELECTOR.finditer(text):
        out.labels.update(name for name, _ in _MATCHER.findall(m.group(1)))
    text = _SELECTOR.sub(" ", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    for m in _GROUPING.finditer(text):
        names = {n.strip() for n in m.group(2).split(",") if n.strip()}
        out.labels |= names
        if m.group(1) == "by":
            out.grouped_by |= names
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for m in _IDENT.finditer(text):
        name = m.group(1)
        if name in _PROMQL_WORDS or re.match(r"\s*\(", text[m.end() :]):
            continue
        out.metrics.add(name)
    return out


def promql_problems(expr: str, series: Mapping[str, frozenset[str]], legend: str = "") -> list[str]:
    parsed = parse_promql(expr)
    known = {**PROMETHEUS_SERIES, **series}
    problems = [f"no such series: {m}" for m in sorted(parsed.metrics - set(known))]
    if not parsed.metrics:
        problems.append("names no series")
    labels = TARGET_LABELS.union(*(known.get(m, frozenset()) for m in parsed.metrics))
    problems += [f"no series of it has label {lb!r}" for lb in sorted(parsed.labels - labels)]
    shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    result_labels = parsed.grouped_by or labels
    problems += [f"legend shows {lb!r}, not a label of the result" for lb in shown - result_labels]
    return problems


def label_values_query(query: str) -> tuple[str, str]:
    """``label_values(expr, label)`` or ``label_values(label)`` → (expr, label)."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query)
    assert m, f"not a label_values() query: {query!r}"
    return m.group(1) or "", m.group(2)


# --- ClickHouse SQL -------------------------------------------------------------------------------

_SQL_WORDS = frozenset(
    "select from where and or not in as group by order limit having asc desc with case when then "
    "else end null is distinct on join left right inner outer using final like between true "
    "false interval second".split()
)


def sql_problems(sql: str, columns: Mapping[str, frozenset[str]]) -> list[str]:
    """Tables the query reads that do not exist, and identifiers that are neither a column of
    those tables, an alias it defines, a function, nor a keyword. Grafana's macros that take a
    column ($__timeFilter(minute)) count as that column; its variables as literals."""
    text = re.sub(r"\$__\w+\(\s*(\w+)\s*\)", r"\1", sql)
    text = re.sub(r"\$__\w+|\$\{[^}]*\}|\$\w+", "0", text)
    text = re.sub(r"'(?:[^'\\]|\\.|'')*'", "''", text)
    problems = []
    tables = set()
    source = re.compile(r"\b(FROM|JOIN)\s+([A-Za-z_][\w.]*)", re.IGNORECASE)
    for ref in (m.group(2) for m in source.finditer(text)):
        db, _, table = ref.rpartition(".")
        if db and db != DEFAULT_DATABASE:
            problems.append(f"reads database {db!r}, not {DEFAULT_DATABASE!r}")
        if table not in columns:
            problems.append(f"no such table: {table}")
        tables.add(table)
    text = source.sub(r"\1 ", text)
    if not tables:
        problems.append("reads no table")
    aliases = set(re.findall(r"\bAS\s+([A-Za-z_]\w*)", text, re.IGNORECASE))
    known = aliases.union(*(columns.get(t, frozenset()) for t in tables))
    for m in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)", text):
        word = m.group(1)
        if word.lower() in _SQL_WORDS or re.match(r"\s*\(", text[m.end() :]):
            continue
        if word not in known:
            problems.append(f"no column {word!r} in {sorted(tables)}")
    return sorted(set(problems))


# --- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert isinstance(config, dict) and config.get("scrape_configs"), "no scrape_configs"
    return config


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(DATASOURCES_FILE.read_text())
    assert config["apiVersion"] == 1
    uids = [ds["uid"] for ds in config["datasources"]]
    assert len(uids) == len(set(uids)), f"datasource uids repeat: {uids}"
    return {ds["uid"]: ds for ds in config["datasources"]}


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    assert DASHBOARD_FILES, "no dashboards in deploy/grafana/dashboards"
    loaded = {path.name: json.loads(path.read_text()) for path in DASHBOARD_FILES}
    uids = [d["uid"] for d in loaded.values()]
    assert len(uids) == len(set(uids)), f"dashboard uids repeat: {uids}"
    return loaded


@pytest.fixture(scope="module")
def series() -> dict[str, frozenset[str]]:
    found = exposed_series()
    assert found, "services/common/telemetry.py defines no metric"
    return found


def grafana(services: dict[str, dict[str, Any]]) -> dict[str, Any]:
    found = [s for s in services.values() if str(s.get("image", "")).startswith("grafana/")]
    assert len(found) == 1, "expected one grafana service in docker-compose.yml"
    return found[0]


def mounts(service: Mapping[str, Any]) -> dict[PurePosixPath, Path]:
    """A service's bind mounts from the repo: container path → local path."""
    out = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        if source.startswith("."):
            out[PurePosixPath(target)] = (ROOT / source).resolve()
    return out


def local_path(service: Mapping[str, Any], container_path: str) -> Path | None:
    """The repo file or directory a container path of ``service`` shows, or None."""
    target = PurePosixPath(container_path)
    for mounted, local in mounts(service).items():
        if target == mounted or target.is_relative_to(mounted):
            return local / target.relative_to(mounted)
    return None


def published_ports(service: Mapping[str, Any]) -> list[int]:
    return [int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports") or []]


def scrape_targets(config: Mapping[str, Any]) -> Iterator[tuple[str, str, str, int]]:
    """(job, how: static | dns, host, port) of every target of every job."""
    for job in config["scrape_configs"]:
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, _, port = str(target).rpartition(":")
                yield job["job_name"], "static", host, int(port)
        for dns in job.get("dns_sd_configs") or []:
            assert dns.get("type", "SRV") == "A", f"{job['job_name']}: Docker's DNS answers A"
            for name in dns["names"]:
                yield job["job_name"], "dns", name, int(dns["port"])


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # a collapsed row holds its panels


def queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, datasource ref, target) of every query: panel targets and variable queries."""
    for panel in panels(dashboard):
        for target in panel.get("targets") or []:
            ref = target.get("datasource") or panel.get("datasource")
            yield f"panel {panel.get('title')!r} {target.get('refId')}", ref, target
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            target = query if isinstance(query, dict) else {"query": query}
            yield f"variable {var['name']!r}", var["datasource"], target


# --- Prometheus -----------------------------------------------------------------------------------


def test_every_switchboard_service_is_scraped_where_it_serves_metrics(
    services: dict[str, dict[str, Any]],
    prometheus_config: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert metrics_route().path == "/metrics"
    jobs = [job["job_name"] for job in prometheus_config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), f"job names repeat: {jobs}"
    for job in prometheus_config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == metrics_route().path, job["job_name"]
        assert job.get("scheme", "http") == "http", job["job_name"]
    scraped: dict[str, str] = {}
    for job, how, host, port in scrape_targets(prometheus_config):
        assert host in services, f"{job}: scrapes {host}, not a service of docker-compose.yml"
        svc = services[host]
        assert "build" in svc, f"{job}: {host} does not run Switchboard"
        command, settings = settings_of(svc, monkeypatch)
        host_field, port_field = HEALTH_ADDRESS_FIELDS[command]
        assert getattr(settings, port_field) == port, (
            f"{job}: scrapes {host}:{port}, {port_field}={getattr(settings, port_field)}"
        )
        assert getattr(settings, host_field) == "0.0.0.0", (
            f"{job}: {host} binds {getattr(settings, host_field)}, Prometheus cannot reach it"
        )
        assert host not in scraped, f"{host} is scraped by {scraped[host]} and {job}"
        scraped[host] = how
    app_services = {
        name
        for name, svc in services.items()
        if "build" in svc and command_of(svc)[0] not in ONE_SHOT_COMMANDS  # they serve nothing
    }
    assert set(scraped) == app_services, f"not scraped: {sorted(app_services - set(scraped))}"
    for name in app_services:
        if command_of(services[name])[0] == "worker":
            assert scraped[name] == "dns", f"{name}: scaled with --scale, so found by DNS"


def test_prometheus_runs_the_repo_config_unpublished(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    args = dict(a.split("=", 1) for a in command_of(prometheus) if "=" in a)
    assert local_path(prometheus, args["--config.file"]) == PROMETHEUS_FILE
    assert not prometheus.get("ports"), "Prometheus is reached through Grafana, not the host"
    assert "/-/ready" in " ".join(map(str, prometheus["healthcheck"]["test"]))


def test_the_prometheus_data_source_is_the_prometheus_service(
    services: dict[str, dict[str, Any]], datasources: dict[str, dict[str, Any]]
) -> None:
    (source,) = [ds for ds in datasources.values() if ds["type"] == "prometheus"]
    url = urlsplit(source["url"])
    args = dict(a.split("=", 1) for a in command_of(services["prometheus"]) if "=" in a)
    listen = int(args.get("--web.listen-address", ":9090").rpartition(":")[2])
    assert (url.hostname, url.port) == ("prometheus", listen), source["url"]
    scrape = yaml.safe_load(PROMETHEUS_FILE.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the interval"


# --- Grafana --------------------------------------------------------------------------------------


def test_grafana_is_pinned_published_and_needs_its_password(
    services: dict[str, dict[str, Any]],
) -> None:
    svc = grafana(services)
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", svc["image"]), svc["image"]
    assert published_ports(svc) == [3000]
    env = env_of(svc)
    # read from a secret file whose variable compose requires
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    secret = secret_mounts(svc)[env["GF_SECURITY_ADMIN_PASSWORD__FILE"]]
    assert secret_variable(load_compose(), secret) == "GRAFANA_ADMIN_PASSWORD"
    plugins = " ".join(
        v for k, v in env.items() if k in ("GF_PLUGINS_PREINSTALL_SYNC", "GF_PLUGINS_PREINSTALL")
    )
    assert "grafana-clickhouse-datasource" in plugins, "the ClickHouse plugin is not installed"
    for dep in ("prometheus", "clickhouse"):
        assert svc["depends_on"][dep]["condition"] == "service_healthy", dep


def test_grafana_mounts_the_provisioning_and_dashboards(
    services: dict[str, dict[str, Any]],
) -> None:
    svc = grafana(services)
    provisioning = local_path(svc, "/etc/grafana/provisioning")
    assert provisioning == GRAFANA_DIR / "provisioning", provisioning
    providers = yaml.safe_load(DASHBOARD_PROVIDERS_FILE.read_text())["providers"]
    served: set[Path] = set()
    for provider in providers:
        assert provider["type"] == "file", provider["name"]
        local = local_path(svc, provider["options"]["path"])
        assert local is not None and local.is_dir(), (
            f"provider {provider['name']}: {provider['options']['path']} is not a mounted repo dir"
        )
        found = sorted(local.glob("*.json"))
        assert found, f"provider {provider['name']}: no dashboards in {local}"
        served.update(found)
    assert set(DASHBOARD_FILES) <= served, f"not provisioned: {set(DASHBOARD_FILES) - served}"


def test_the_clickhouse_data_source_logs_in_as_the_server_user(
    services: dict[str, dict[str, Any]],
    datasources: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (source,) = [ds for ds in datasources.values() if ds["type"] == "grafana-clickhouse-datasource"]
    data, secure = source["jsonData"], source["secureJsonData"]
    metrics = next(s for s in services.values() if command_of(s)[:1] == ["metrics"])
    store = urlsplit(resolved_env(metrics)["SWITCHBOARD_CLICKHOUSE_URL"])
    assert (data["host"], int(data["port"]), data["protocol"]) == (
        store.hostname,
        store.port,
        store.scheme,
    ), "Grafana reaches ClickHouse elsewhere than the metrics service writes"
    _, settings = settings_of(metrics, monkeypatch)
    assert data["defaultDatabase"] == settings.clickhouse_database  # type: ignore[attr-defined]
    # Grafana fills the user from its environment and the password from a secret file (the one
    # the server's password comes from): no credential in the repo
    password_file = re.fullmatch(r"\$__file\{(/run/secrets/[\w.-]+)\}", secure["password"])
    assert password_file, "password is not read from a secret file"
    grafana_svc = grafana(services)
    server_svc = services["clickhouse"]
    for shell in (REQUIRED_STANDINS, {**REQUIRED_STANDINS, "CLICKHOUSE_USER": "someone"}):
        env = resolved_env(grafana_svc, shell)
        server = resolved_env(server_svc, shell)
        name = re.fullmatch(r"\$\{?([A-Z_]+)\}?", data["username"])
        assert name, "username is not an environment variable"
        assert env[name.group(1)] == server["CLICKHOUSE_USER"]
    server_secret = secret_mounts(server_svc)[resolved_env(server_svc)["CLICKHOUSE_PASSWORD_FILE"]]
    assert secret_mounts(grafana_svc).get(password_file.group(1)) == server_secret


def test_dashboards_use_provisioned_data_sources_and_every_one_is_used(
    dashboards: dict[str, dict[str, Any]], datasources: dict[str, dict[str, Any]]
) -> None:
    used = set()
    for name, dashboard in dashboards.items():
        assert dashboard["title"].startswith("Switchboard — "), name
        for panel in panels(dashboard):
            assert panel.get("type") == "row" or panel.get("targets"), f"{name}: empty panel"
        for where, ref, _ in queries(dashboard):
            assert ref and ref["uid"] in datasources, f"{name} {where}: data source {ref}"
            assert ref["type"] == datasources[ref["uid"]]["type"], f"{name} {where}: {ref}"
            used.add(ref["uid"])
    assert used == set(datasources), f"provisioned, never used: {set(datasources) - used}"
    titles = {d["title"] for d in dashboards.values()}
    assert {"Switchboard — fleet", "Switchboard — models"} <= titles


def test_dashboard_promql_names_only_series_telemetry_defines(
    dashboards: dict[str, dict[str, Any]],
    datasources: dict[str, dict[str, Any]],
    series: dict[str, frozenset[str]],
) -> None:
    checked = 0
    for name, dashboard in dashboards.items():
        for where, ref, target in queries(dashboard):
            if datasources[ref["uid"]]["type"] != "prometheus":
                continue
            if where.startswith("variable"):
                expr, label = label_values_query(target["query"])
                problems = promql_problems(expr, series)
                if label not in TARGET_LABELS.union(
                    *(series.get(m, ()) for m in parse_promql(expr).metrics)
                ):
                    problems.append(f"label_values of {label!r}, not a label of {expr}")
            else:
                problems = promql_problems(target["expr"], series, target.get("legendFormat", ""))
            assert not problems, f"{name} {where}: {problems}\n{target}"
            checked += 1
    assert checked


def test_dashboard_sql_names_only_tables_and_columns_that_exist(
    dashboards: dict[str, dict[str, Any]], datasources: dict[str, dict[str, Any]]
) -> None:
    columns = table_columns()
    checked = 0
    for name, dashboard in dashboards.items():
        for where, ref, target in queries(dashboard):
            if datasources[ref["uid"]]["type"] != "grafana-clickhouse-datasource":
                continue
            sql = target.get("rawSql") or target.get("query")
            assert isinstance(sql, str) and sql.strip(), f"{name} {where}: no SQL"
            problems = sql_problems(sql, columns)
            assert not problems, f"{name} {where}: {problems}\n{sql}"
            checked += 1
    assert checked


# --- the checks above can fail --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "legend", "says"),
    [
        ("rate(switchboard_no_such_total[5m])", "", "no such series: switchboard_no_such_total"),
        ("switchboard_worker_in_flight_bucket", "", "no such series"),  # a gauge has no buckets
        ("rate(switchboard_retries[5m])", "", "no such series: switchboard_retries"),
        ('sum(rate(switchboard_retries_total{colour="x"}[5m]))', "", "label 'colour'"),
        ("sum by (shard) (switchboard_worker_in_flight)", "", "label 'shard'"),
        ("sum by (tier) (switchboard_worker_in_flight)", "{{model}}", "legend shows 'model'"),
    ],
)
def test_the_promql_check_refuses(
    series: dict[str, frozenset[str]], expr: str, legend: str, says: str
) -> None:
    assert any(says in p for p in promql_problems(expr, series, legend)), expr


def test_the_promql_check_accepts_what_prometheus_client_exposes(
    series: dict[str, frozenset[str]],
) -> None:
    for expr in (
        "histogram_quantile(0.95, sum by (le, model) (rate("
        'switchboard_model_call_duration_seconds_bucket{status="ok"}[$__rate_interval])))',
        "sum by (tier) (rate(switchboard_model_call_duration_seconds_count[5m]))",
        "max by (group, topic, partition) (switchboard_kafka_consumer_lag)",
        "sum(rate(switchboard_events_written_total[1m])) * 3600",
        "sum by (job) (up)",
    ):
        assert promql_problems(expr, series) == [], expr


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT model FROM llm_events_2m", "no such table: llm_events_2m"),
        ("SELECT latency_p95 FROM llm_events_1m", "no column 'latency_p95'"),
        ("SELECT minute FROM llm_events WHERE $__timeFilter(ts)", "no column 'minute'"),
        ("SELECT $__timeInterval(tss) AS t FROM llm_events", "no column 'tss'"),
        ("SELECT model FROM other.llm_events", "reads database 'other'"),
    ],
)
def test_the_sql_check_refuses(sql: str, says: str) -> None:
    assert any(says in p for p in sql_problems(sql, table_columns())), sql


def test_the_sql_check_accepts_aliases_functions_and_macros() -> None:
    sql = (
        "SELECT t, q[2] AS p95 FROM (SELECT $__timeInterval(minute) AS t, "
        "quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_ms) AS q FROM switchboard.llm_events_1m "
        "WHERE $__timeFilter(minute) AND tier IN (${tier:singlequote}) AND model != 'x y' "
        "GROUP BY t) ORDER BY t"
    )
    assert sql_problems(sql, table_columns()) == []
