"""The baseline of the worker benchmark: plain ``litellm.acompletion`` from a bare script.

``python -m bench.bare_litellm --api-base URL --model openai/NAME --calls N --concurrency C``
makes N streamed calls (usage included, as the worker asks for) with at most C in flight and
prints one JSON line: calls/s and CPU milliseconds per call of this process, import excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm

MESSAGES = [{"role": "user", "content": "Summarise this support ticket in one line."}]


async def call(args: argparse.Namespace) -> None:
    kwargs = {
        "model": args.model,
        "api_base": args.api_base,
        "api_key": "not-needed",
        "messages": MESSAGES,
        "num_retries": 0,
        "timeout": 60,
    }
    if args.stream:
        stream = await litellm.acompletion(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        litellm.stream_chunk_builder(chunks, messages=MESSAGES)
    else:
        await litellm.acompletion(**kwargs)


async def main(args: argparse.Namespace) -> dict[str, float]:
    gate = asyncio.Semaphore(args.concurrency)
    errors = 0

    async def one() -> None:
        nonlocal errors
        async with gate:
            try:
                await call(args)
            except Exception:
                errors += 1

    await asyncio.gather(*(one() for _ in range(min(20, args.calls))))  # warm the client pool
    errors = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.calls)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {
        "calls": args.calls,
        "errors": errors,
        "calls_per_s": round(args.calls / wall, 1),
        "cpu_ms_per_call": round(cpu / args.calls * 1000, 3),
        "stream": args.stream,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--no-stream", dest="stream", action="store_false")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
