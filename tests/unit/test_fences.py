"""Write holds between the embedded broker's keeper and a publishing process, through files."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from services.common.fences import FILLER_HEADER, Fences, fence_dir, is_filler, write_file


async def _until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` (a file the other side writes) until it holds; 5 s at most."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        if check():
            return
        assert asyncio.get_running_loop().time() < deadline, f"waited 5 s for {what}"
        await asyncio.sleep(0.005)


async def test_a_hold_waits_for_publishes_under_way_and_stops_new_ones(tmp_path: Path) -> None:
    fences = Fences(tmp_path, "worker-1")
    await fences.start()
    folder = fence_dir(tmp_path)
    assert (folder / "worker-1.member").read_text().isdigit()
    acked = folder / "t.tier.worker-1.held"
    try:
        release_first = asyncio.Event()
        order: list[str] = []

        async def publish(topic: str, name: str, wait: asyncio.Event | None = None) -> None:
            async with fences.writing([topic]):
                order.append(f"{name} in")
                if wait is not None:
                    await wait.wait()
            order.append(f"{name} out")

        first = asyncio.create_task(publish("t.tier", "first", release_first))
        await _until(lambda: "first in" in order, "the first publish to start")
        write_file(folder / "t.tier.hold", "token-1")
        await asyncio.sleep(0.1)
        assert not acked.exists()  # the first publish is still under way
        release_first.set()
        await _until(acked.exists, "the hold to be answered")
        assert acked.read_text() == "token-1"

        held = asyncio.create_task(publish("t.tier", "held"))
        other = asyncio.create_task(publish("t.events", "other"))
        await asyncio.wait_for(other, 5)  # another topic is not held
        await asyncio.sleep(0.1)
        assert not held.done()
        (folder / "t.tier.hold").unlink()
        await asyncio.wait_for(held, 5)
        await asyncio.wait_for(first, 5)
        assert order.index("first out") < order.index("held in")
        await _until(lambda: not acked.exists(), "the answer to be taken back")
        assert fences.holds == 1
    finally:
        await fences.stop()
    assert not (folder / "worker-1.member").exists()


async def test_a_new_hold_token_is_answered_again(tmp_path: Path) -> None:
    fences = Fences(tmp_path, "router-1")
    await fences.start()
    folder = fence_dir(tmp_path)
    try:
        write_file(folder / "t.x.hold", "a")
        await _until(lambda: (folder / "t.x.router-1.held").exists(), "the first answer")
        write_file(folder / "t.x.hold", "b")
        await _until(lambda: (folder / "t.x.router-1.held").read_text() == "b", "the second answer")
        assert fences.holds == 2
    finally:
        await fences.stop()


def test_only_an_empty_record_with_the_header_is_a_filler() -> None:
    def record(value: bytes | None, headers: tuple[tuple[str, bytes], ...]) -> SimpleNamespace:
        return SimpleNamespace(value=value, headers=headers)

    assert is_filler(record(b"", ((FILLER_HEADER, b"1"),)))
    assert is_filler(record(None, ((FILLER_HEADER, b"1"),)))
    assert not is_filler(record(b"{}", ((FILLER_HEADER, b"1"),)))
    assert not is_filler(record(b"", ()))
    assert not is_filler(record(b"", (("content-type", b"application/json"),)))
