"""The LiteLLM proxy, our peer in the benchmarks, started as its users start it.

``litellm --config cfg.yaml --host 127.0.0.1 --port P`` from this venv, default settings (one
uvicorn process, no database, no cache), a master key from the environment, and a model list
pointing at our provider simulator, so it calls the same upstream as Switchboard does. The only
deviations from a stock start are the ones it needs offline and on a shared machine: the local
price map (it would fetch one from the internet), and binding loopback instead of 0.0.0.0.

``workers=N`` adds ``--num_workers N``, as its users run it on an N-core machine: uvicorn's
supervisor process and N worker processes sharing the port (and multiprocessing's resource
tracker). It needs nothing more offline than one process does: no database, no Redis (each
worker then keeps its own in-memory state, which a benchmark with one key and no budgets never
reads). Its CPU and memory are those of the whole process tree (``pids``), and stopping it makes
sure no worker outlives the supervisor.

It boots in 20-30 s, so ``start_proxy`` returns at once and ``wait_ready`` blocks later: a
scenario can start its other parts while the proxy imports.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.common import Bench, base_env, http_ok, process_tree
from switchboard.embedded import Child, free_port, wait_for

READY_PATH = "/health/readiness"  # public, answers once the config and model list are loaded
# Each uvicorn worker logs this once its app has started; the readiness route is answered by
# whichever worker is up first, so a proxy of N workers is ready once the log holds N of these.
STARTED_LINE = "Application startup complete."


class ProxyChild(Child):
    """The proxy's process; stopping it also stops any of its descendants still running.

    uvicorn's supervisor stops its workers on SIGTERM, but a supervisor that had to be killed
    would leave them serving the port: each one left is stopped by its pid.
    """

    def stop(self, timeout_s: float = 20.0) -> int:
        left = [psutil.Process(pid) for pid in process_tree(self.pid)[1:]]
        code = super().stop(timeout_s)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return code


@dataclass
class LiteLLMProxy:
    """A started proxy: where it listens, its bearer key, and how it was configured."""

    child: Child
    url: str
    key: str
    config_path: Path
    workers: int = 1

    @property
    def pid(self) -> int:
        return self.child.pid

    def pids(self) -> list[int]:
        """The proxy's process and its descendants (the supervisor's workers), as of now."""
        return process_tree(self.pid)

    @property
    def settings(self) -> dict[str, Any]:
        """What the report states about the peer's configuration."""
        return {
            "version": _litellm_version(),
            "workers": self.workers,
            "database": None,
            "cache": None,
            "config": yaml.safe_load(self.config_path.read_text()),
            "command": " ".join(self.child.argv[1:]),
        }

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the readiness route answers 200 and every worker has started; fail at
        once if the process exits."""

        def ready() -> bool:
            return self._started() >= self.workers and http_ok(self.url + READY_PATH)

        try:
            wait_for(f"litellm proxy x{self.workers}", ready, timeout_s, self.child.alive)
        except Exception as exc:
            raise RuntimeError(f"{exc}; last log lines:\n{self.child.tail()}") from exc

    def _started(self) -> int:
        try:
            return self.child.log_path.read_text(errors="replace").count(STARTED_LINE)
        except OSError:
            return 0


def _litellm_version() -> str:
    from importlib.metadata import version

    return version("litellm")


def proxy_config(simulator_url: str, models: Sequence[str]) -> dict[str, Any]:
    """A model list with each simulated model under its own name, upstream the simulator."""
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": f"{simulator_url}/v1",
                    "api_key": "not-needed",
                },
            }
            for name in models
        ]
    }


def start_proxy(
    bench: Bench, simulator_url: str, models: Sequence[str], workers: int = 1
) -> LiteLLMProxy:
    """Launch the proxy as a child adopted by ``bench`` (stopped with its scope); do not wait.

    ``workers`` above 1 adds ``--num_workers``; 1 is the stock command, without the flag.
    """
    port = free_port()
    path = bench.work_dir / f"litellm-proxy-{port}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(proxy_config(simulator_url, models), sort_keys=False))
    # The console script beside this interpreter: the proxy from this venv, not one on PATH.
    binary = Path(sys.executable).parent / "litellm"
    key = "sk-bench-" + secrets.token_urlsafe(32)
    env = base_env(LITELLM_MASTER_KEY=key, LITELLM_LOCAL_MODEL_COST_MAP="True")
    argv = [str(binary), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        argv += ["--num_workers", str(workers)]
    child = bench.adopt(ProxyChild(f"litellm-proxy-x{workers}-{port}", argv, env, bench.log_dir))
    return LiteLLMProxy(child, f"http://127.0.0.1:{port}", key, path, workers)


@contextlib.contextmanager
def litellm_proxy(
    bench: Bench,
    simulator_url: str,
    models: Sequence[str],
    timeout_s: float = 120.0,
    workers: int = 1,
) -> Iterator[LiteLLMProxy]:
    """A ready proxy for the block; stopped when the block ends."""
    proxy = start_proxy(bench, simulator_url, models, workers)
    try:
        proxy.wait_ready(timeout_s)
        yield proxy
    finally:
        bench.stop(proxy.child)
