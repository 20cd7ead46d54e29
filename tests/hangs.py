"""Say where a hung test waits: pytest-timeout shows thread stacks only, and a test stuck on an
await shows just the event loop's select()."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path


def awaiting(task: asyncio.Task[object]) -> str:
    """Where ``task`` waits: its coroutine and each one it awaits, outermost first."""
    steps = []
    coro: object = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            name = Path(frame.f_code.co_filename).name
            steps.append(f"{frame.f_code.co_name} ({name}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " -> ".join(steps) or repr(task)


def print_tasks(why: str) -> None:
    """Print, to stderr (pytest shows it with the failure), what every task of this loop awaits."""
    print(f"--- asyncio tasks: {why} ---", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"{task.get_name()}: {awaiting(task)}", file=sys.stderr)
