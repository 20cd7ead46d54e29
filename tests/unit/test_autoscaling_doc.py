"""docs/autoscaling.md's manifests, cross-checked against the names and settings they must match.

Every ```yaml block of the page is parsed (multi-document). Each KEDA ScaledObject must scale a
Deployment the page defines, that Deployment must run the worker of a tier of
config/switchboard.yaml, and the trigger must watch that tier's topic and consumer group as
schemas/topics.py names them, with no more replicas than the partitions the page creates. A
renamed topic, a tier dropped from the config or a copy-paste slip between tiers fails here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.topics import DEFAULT_PREFIX, Topics
from services.common.routing_config import LoadedConfig, load_config
from services.common.settings import ENV_PREFIX
from services.workers.config import WorkerSettings
from tests.unit.test_observability_files import exposed_series, parse_promql, promql_problems

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "autoscaling.md"
ROUTING_CONFIG = ROOT / "config" / "switchboard.yaml"


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def manifests(text: str) -> list[dict[str, Any]]:
    docs = [d for block in yaml_blocks(text) for d in yaml.safe_load_all(block)]
    return [d for d in docs if d is not None]


def by_kind(found: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for manifest in found:
        if manifest.get("kind") == kind:
            name = manifest["metadata"]["name"]
            assert name not in out, f"two {kind}s named {name}"
            out[name] = manifest
    return out


def container_env(
    deployment: Mapping[str, Any], config_maps: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """The worker container's environment: its ConfigMaps (envFrom), then its own env."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            assert name in config_maps, f"envFrom names ConfigMap {name}, not on the page"
            env.update({k: str(v) for k, v in config_maps[name]["data"].items()})
    env.update({e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e})
    return env


def scaled_object_problems(
    scaled: Mapping[str, Any],
    deployments: Mapping[str, Mapping[str, Any]],
    config_maps: Mapping[str, Mapping[str, Any]],
    routing: LoadedConfig,
) -> list[str]:
    """What is wrong with one ScaledObject of the page, by the checks the module names."""
    spec = scaled["spec"]
    ref = spec["scaleTargetRef"]
    if ref.get("kind", "Deployment") != "Deployment" or ref["name"] not in deployments:
        return [f"scales {ref.get('kind', 'Deployment')} {ref['name']}, not defined on the page"]
    deployment = deployments[ref["name"]]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container.get("args") or []]
    if args[:2] != ["worker", "--tier"] or len(args) != 3:
        return [f"{ref['name']} runs {args}, not `worker --tier T`"]
    tier = args[2]
    problems = []
    if tier not in routing.tier_names:
        problems.append(f"{ref['name']} serves tier {tier!r}, not in {ROUTING_CONFIG.name}")
    env = container_env(deployment, config_maps)
    prefix = env.get(f"{ENV_PREFIX}TOPIC_PREFIX", DEFAULT_PREFIX)
    if prefix != DEFAULT_PREFIX:
        problems.append(f"topic prefix {prefix!r}, not the default {DEFAULT_PREFIX!r}")
    topics = Topics()
    partitions = int(env.get(f"{ENV_PREFIX}PARTITIONS", WorkerSettings().partitions))
    low, high = spec.get("minReplicaCount", 0), spec["maxReplicaCount"]
    if not 0 <= low <= high <= partitions:
        problems.append(f"replicas {low}..{high}: must stay within {partitions} partitions")
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        if trigger["type"] == "kafka":
            if meta["topic"] != topics.tier(tier):
                problems.append(f"topic {meta['topic']}, the tier's is {topics.tier(tier)}")
            if meta["consumerGroup"] != topics.worker_group(tier):
                problems.append(
                    f"consumerGroup {meta['consumerGroup']}, "
                    f"the tier's is {topics.worker_group(tier)}"
                )
            if meta["bootstrapServers"] != env.get(f"{ENV_PREFIX}KAFKA_BOOTSTRAP"):
                problems.append(f"bootstrapServers {meta['bootstrapServers']} not the workers'")
            if str(meta.get("allowIdleConsumers", "false")).lower() != "false":
                problems.append("allowIdleConsumers lets replicas pass the partitions")
            if int(meta["lagThreshold"]) > (
                routing.tier(tier).concurrency if tier in routing.tier_names else 0
            ):
                problems.append(f"lagThreshold {meta['lagThreshold']} > the tier's concurrency")
        elif trigger["type"] == "prometheus":
            problems += promql_problems(meta["query"], exposed_series())
            wanted = {"group": topics.worker_group(tier), "topic": topics.tier(tier)}
            for label, value in wanted.items():
                if f'{label}="{value}"' not in meta["query"]:
                    problems.append(f'query does not select {label}="{value}"')
            if low < 1:
                problems.append("at zero replicas no worker reports the lag")
            if "switchboard_kafka_consumer_lag" not in parse_promql(meta["query"]).metrics:
                problems.append("query does not read switchboard_kafka_consumer_lag")
        else:
            problems.append(f"trigger type {trigger['type']}")
    return problems


def deployment_problems(
    deployment: Mapping[str, Any],
    config_maps: Mapping[str, Mapping[str, Any]],
    routing: LoadedConfig,
) -> list[str]:
    """The Deployment runs the worker as docker-compose.yml does: settings that exist, probes
    where the worker serves them, a drain that outlasts the tier's calls."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(deployment, config_maps)
    problems = [
        f"{k} is not a WorkerSettings field"
        for k in env
        if k.startswith(ENV_PREFIX)
        and k.removeprefix(ENV_PREFIX).lower() not in WorkerSettings.model_fields
    ]
    port = int(env[f"{ENV_PREFIX}WORKER_PORT"])
    if env.get(f"{ENV_PREFIX}WORKER_HOST") != "0.0.0.0":
        problems.append("the kubelet and Prometheus cannot reach a worker bound to loopback")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        if get["path"] != path or ports.get(get["port"], get["port"]) != port:
            problems.append(
                f"{probe} asks {get['port']}{get['path']}, the worker serves {port}{path}"
            )
    tier = str(container["args"][2])
    drain = float(env.get(f"{ENV_PREFIX}DRAIN_TIMEOUT_S", WorkerSettings().drain_timeout_s))
    grace = float(pod.get("terminationGracePeriodSeconds", 30))
    if tier in routing.tier_names and not routing.tier(tier).timeout_s <= drain < grace:
        problems.append(
            f"timeout_s {routing.tier(tier).timeout_s} <= drain {drain} < grace {grace}"
        )
    return problems


@pytest.fixture(scope="module")
def page() -> list[dict[str, Any]]:
    found = manifests(DOC.read_text())
    assert found, f"no YAML blocks in {DOC}"
    return found


@pytest.fixture(scope="module")
def routing() -> LoadedConfig:
    return load_config(ROUTING_CONFIG)


def test_every_scaled_object_watches_its_tier_within_its_partitions(
    page: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    deployments = by_kind(page, "Deployment")
    config_maps = by_kind(page, "ConfigMap")
    scaled_objects = by_kind(page, "ScaledObject")
    assert scaled_objects, "the page defines no ScaledObject"
    kafka = [
        t for s in scaled_objects.values() for t in s["spec"]["triggers"] if t["type"] == "kafka"
    ]
    assert kafka, "no ScaledObject uses KEDA's kafka scaler"
    for name, scaled in scaled_objects.items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1", name
        problems = scaled_object_problems(scaled, deployments, config_maps, routing)
        assert not problems, f"ScaledObject {name}: {problems}"


def test_every_deployment_runs_a_worker_as_compose_does(
    page: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    deployments = by_kind(page, "Deployment")
    config_maps = by_kind(page, "ConfigMap")
    assert deployments
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in by_kind(page, "ScaledObject").values()}
    for name, deployment in deployments.items():
        assert name in targets, f"Deployment {name} is not scaled by any ScaledObject"
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        problems = deployment_problems(deployment, config_maps, routing)
        assert not problems, f"Deployment {name}: {problems}"


# --- the checks above can fail --------------------------------------------------------------------


def _broken(page: list[dict[str, Any]], edit: str, old: str, new: str) -> list[dict[str, Any]]:
    """The page with one text edit in the YAML block that holds ``edit``."""
    text = DOC.read_text()
    blocks = [b for b in yaml_blocks(text) if edit in b]
    assert blocks, edit
    return manifests(text.replace(blocks[0], blocks[0].replace(old, new, 1)))


@pytest.mark.parametrize(
    ("edit", "old", "new", "says"),
    [
        (
            "name: switchboard-worker-fast\n  namespace",
            "topic: switchboard.tier.fast.v1",
            "topic: switchboard.tier.fast.v2",
            "topic switchboard.tier.fast.v2",
        ),
        (
            "name: switchboard-worker-reasoning\n  namespace",
            "consumerGroup: switchboard-worker-reasoning",
            "consumerGroup: switchboard-worker-fast",
            "consumerGroup switchboard-worker-fast",
        ),
        (
            "name: switchboard-worker-fast\n  namespace",
            "maxReplicaCount: 12",
            "maxReplicaCount: 16",
            "within 12 partitions",
        ),
        (
            "name: switchboard-worker-fast\n  namespace",
            "scaleTargetRef:\n    name: switchboard-worker-fast",
            "scaleTargetRef:\n    name: switchboard-worker-quick",
            "not defined on the page",
        ),
        (
            "name: switchboard-worker-reasoning\n  namespace",
            '["worker", "--tier", "reasoning"]',
            '["worker", "--tier", "thinking"]',
            "not in switchboard.yaml",
        ),
        (
            "switchboard-worker-fast-prometheus",
            'topic="switchboard.tier.fast.v1"',
            'topic="switchboard.tier.balanced.v1"',
            "does not select topic=",
        ),
        (
            "switchboard-worker-fast-prometheus",
            "switchboard_kafka_consumer_lag",
            "switchboard_kafka_lag",
            "no such series",
        ),
    ],
)
def test_the_scaled_object_check_refuses(
    page: list[dict[str, Any]], routing: LoadedConfig, edit: str, old: str, new: str, says: str
) -> None:
    broken = _broken(page, edit, old, new)
    deployments, config_maps = by_kind(broken, "Deployment"), by_kind(broken, "ConfigMap")
    problems = [
        p
        for s in by_kind(broken, "ScaledObject").values()
        for p in scaled_object_problems(s, deployments, config_maps, routing)
    ]
    assert any(says in p for p in problems), problems


def test_the_deployment_check_refuses_a_short_grace_and_a_wrong_probe(
    page: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    for old, new, says in (
        ("terminationGracePeriodSeconds: 330", "terminationGracePeriodSeconds: 200", "< grace"),
        ("path: /ready", "path: /readyz", "readinessProbe asks"),
    ):
        broken = _broken(page, "name: switchboard-worker-reasoning\n  namespace", old, new)
        deployment = by_kind(broken, "Deployment")["switchboard-worker-reasoning"]
        problems = deployment_problems(deployment, by_kind(broken, "ConfigMap"), routing)
        assert any(says in p for p in problems), problems
