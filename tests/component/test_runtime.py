"""The HTTP listening socket every service uses."""

from __future__ import annotations

import asyncio
import socket

from services.common.runtime import PortInUse, bind


async def test_accepted_connections_send_small_responses_at_once() -> None:
    """TCP_NODELAY on accepted sockets: no ~40 ms Nagle stall per keep-alive response."""
    flags: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    listener = bind("127.0.0.1", 0)
    server = await asyncio.start_server(on_connect, sock=listener)
    try:
        port = listener.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()  # the server closes once it has looked
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert flags and flags[0] != 0


def test_a_busy_port_is_reported() -> None:
    first = bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        try:
            bind("127.0.0.1", port).close()
        except PortInUse as exc:
            assert str(port) in str(exc)
        else:
            raise AssertionError("binding a port in use succeeded")
    finally:
        first.close()
