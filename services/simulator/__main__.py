"""``python -m services.simulator``: serve the provider simulator until SIGINT/SIGTERM.

``serve(settings)`` is what the project CLI calls; ``build_server(settings)`` gives tests the
same server to run in a thread. The "listening" line is printed only once the socket is bound,
so a supervisor can wait for it.
"""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from services.simulator.app import create_app, release_hanging_requests
from services.simulator.config import SimulatorSettings

# Seconds a shutdown waits for in-flight answers before cancelling them.
GRACEFUL_SHUTDOWN_S = 10


class SimulatorServer(uvicorn.Server):
    """uvicorn that announces itself as a simulator and releases hung requests on shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0); only valid once started."""
        port: int = self.servers[0].sockets[0].getsockname()[1]
        return port

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            models = ", ".join(self.app.state.simulator.profiles)
            host = self.config.host if sockets is None else sockets[0].getsockname()[0]
            print(
                f"switchboard provider simulator listening on http://{host}:{self.port} "
                f"(simulated models: {models})",
                flush=True,
            )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        release_hanging_requests(self.app)
        await super().shutdown(sockets)


def build_server(settings: SimulatorSettings) -> SimulatorServer:
    """A simulator server for ``settings``; run it with ``.run()`` (blocking) or ``.serve()``."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        server_header=False,  # the app sends `server: switchboard-simulator` itself
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return SimulatorServer(config, app)


def serve(settings: SimulatorSettings) -> None:
    """Serve until SIGINT/SIGTERM (blocking)."""
    build_server(settings).run()


def main() -> None:
    serve(SimulatorSettings())


if __name__ == "__main__":
    main()
