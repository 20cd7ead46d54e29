"""``python -m bench.publish_cost``: what one publish of a stream chunk costs, through FastStream's
``BrokerPublisher`` and through ``ProducerPublisher`` (a plain aiokafka producer), on a Tansu broker
of its own. Each sends ``--count`` chunks one after another, each awaited, as a stream's chunks
are; it prints the CPU and wall time per publish of this process (docs/hot-path.md)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from schemas.v1 import StreamChunk
from services.common.kafka import (
    BrokerPublisher,
    ProducerPublisher,
    Publisher,
    ensure_topics,
    make_broker,
)
from switchboard.embedded import free_port, start_broker

TOPIC = "publish-cost.chunks"
WARMUP = 100


async def _timed(publisher: Publisher, chunk: StreamChunk, count: int) -> tuple[float, float]:
    for _ in range(WARMUP):
        await publisher.publish(TOPIC, chunk, key=chunk.request_id)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await publisher.publish(TOPIC, chunk, key=chunk.request_id)
    return (time.process_time() - cpu) / count, (time.perf_counter() - wall) / count


async def measure(bootstrap: str, count: int) -> dict[str, tuple[float, float]]:
    await ensure_topics(bootstrap, [TOPIC], 4)
    choice = {"index": 0, "delta": {"content": " tokens"}, "logprobs": None, "finish_reason": None}
    chunk = StreamChunk(request_id="sbr-cost", stream="s", seq=1, model="m", choices=[choice])
    broker = make_broker(bootstrap, "publish-cost")
    await broker.start()
    try:
        faststream = await _timed(BrokerPublisher(broker), chunk, count)
    finally:
        await broker.stop()
    plain = ProducerPublisher(bootstrap, "publish-cost-plain")
    await plain.start()
    try:
        aiokafka = await _timed(plain, chunk, count)
    finally:
        await plain.stop()
    return {"BrokerPublisher (FastStream)": faststream, "ProducerPublisher (aiokafka)": aiokafka}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.publish_cost", description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="publishes measured (2000)")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="switchboard-publish-cost-"))
    port = free_port()
    child = start_broker(port, logs)
    try:
        results = asyncio.run(measure(f"127.0.0.1:{port}", args.count))
    finally:
        child.stop()
    for name, (cpu_s, wall_s) in results.items():
        print(f"{name}: {cpu_s * 1e6:.0f} µs CPU, {wall_s * 1e6:.0f} µs wall per publish")


if __name__ == "__main__":
    main()
