"""Stopping a loop that swallowed a cancellation (as asyncio.wait_for can on Python 3.11)."""

from __future__ import annotations

import asyncio

from services.common.retry import cancel_and_wait


async def test_a_task_that_swallows_one_cancellation_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # what a wait_for racing its inner call's end does

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, again_s=0.05), 5)
    assert task.cancelled() and swallowed == 1


async def test_a_task_that_failed_is_waited_for_without_raising() -> None:
    async def broken() -> None:
        raise RuntimeError("loop died")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)
