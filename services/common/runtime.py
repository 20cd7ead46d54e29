"""Process plumbing shared by the services: logging, signals, the HTTP server, health routes,
``GET /metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import uvicorn
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common import retry

# Why a service should get no work now, or None when it is ready (``GET /ready``).
NotReady = Callable[[], Awaitable[str | None]]


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("aiokafka", "LiteLLM", "litellm", "httpx", "faststream"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


async def serve_until_signal() -> None:
    """Return when the process gets SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class HttpServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the process (``serve_until_signal``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop, the event loop every service uses.

    uvloop's socket and timer handling in C cut the per-request CPU of the router and the
    workers (many small Kafka, Redis and HTTP exchanges); it is what uvicorn picks by default.
    """
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
    if retry.failed():  # a consumer loop died: exit non-zero so the supervisor starts it again
        sys.exit(1)


def bind(host: str, port: int) -> socket.socket:
    """Bind now, so a busy port fails at once with ``PortInUse`` (port 0 picks a free one).

    The protocol is named (IPPROTO_TCP, not 0) because asyncio sets TCP_NODELAY only on
    sockets whose ``proto`` says TCP, and accepted connections inherit it: without it, Nagle's
    algorithm holds each small response back until the client's delayed ACK (docs/hot-path.md).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(host, port) from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


KEEP_ALIVE_S = 75


async def start_http(
    app: Any, host: str, port: int, *, lifespan: bool = False
) -> tuple[HttpServer, asyncio.Task[None]]:
    """Serve ``app`` on ``host:port``; returns once it accepts connections."""
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="on" if lifespan else "off",
        access_log=False,
        http="httptools",  # the C parser: h11 (pure Python) costs far more CPU a request
        # Longer than any client keeps an idle connection (httpx and the OpenAI SDK: 5 s,
        # aiohttp: 15 s): at uvicorn's default of 5 s the server could close a connection just
        # as a client sent a request on it, and that request failed with a reset.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = HttpServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    server.bound_port = sock.getsockname()[1]  # type: ignore[attr-defined]
    return server, task


async def stop_http(server: HttpServer, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    await task


def health_routes(not_ready: NotReady) -> list[Route]:
    """``GET /health``: alive (the process and its event loop answer), always 200.
    ``GET /ready``: 200 ``{"status": "ready"}``, or 503 ``{"status": "not ready", "reason": ...}``.

    Kept apart, so an orchestrator restarts a process that hangs (health) but only waits for one
    whose dependencies are away (ready): a restart would not bring them back.
    """

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        reason = await not_ready()
        if reason:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    return [Route("/health", health), Route("/ready", ready)]


async def metrics(request: Request) -> Response:
    """``GET /metrics``: this process's series in Prometheus' text format (docs/metrics.md).
    No key, like ``/health``: it carries counts and timings, never a request's content."""
    return Response(generate_latest(REGISTRY), headers={"content-type": CONTENT_TYPE_LATEST})


def metrics_route() -> Route:
    """The ``/metrics`` route every service's HTTP app mounts beside ``health_routes``."""
    return Route("/metrics", metrics)


class PortInUse(OSError):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"cannot listen on {host}:{port}: the port is in use or not allowed")
        self.port = port
