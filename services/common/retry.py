"""The one retry policy of every consumer: retry what is transient, hand on what is not.

::

    an exception raised while handling a record
    ├── transient: the broker or a store is away (``is_transient``)
    │       retried with capped exponential backoff and jitter until it works or the process stops
    └── anything else: the record itself cannot be handled
            dead-lettered with its reason (and answered with a ChatError where a caller waits);
            the partition moves on

A handler that retried every exception turned one bad record into a stalled partition: nothing
behind it was handled and nothing was committed again.

A consumer's fetch loop that dies takes the process down (``stop_process``): a process whose
heartbeat keeps its partitions while nothing reads them would stall them silently. The process
exits non-zero and its supervisor (``switchboard up``, compose's restart policy) starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from aiokafka.errors import KafkaError, KafkaTimeoutError, UnknownError
from clickhouse_connect.driver.exceptions import OperationalError

log = logging.getLogger(__name__)


class Transient(Exception):
    """Raised by our own code for a condition that passes by itself (a store not ready yet)."""


def is_transient(exc: BaseException) -> bool:
    """Is ``exc`` the broker or a store being away, so that the same call may work later?"""
    if isinstance(exc, Transient | TimeoutError | ConnectionError):
        return True
    if isinstance(exc, KafkaError):
        # KafkaTimeoutError: a send that found no broker in time. UnknownError: the embedded
        # broker's answer while it re-creates a topic (services/common/kafka.py)
        return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError | UnknownError)
    return isinstance(
        exc,
        redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OperationalError,
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: the n-th wait is between half and all of
    ``min(max_s, first_s * 2**(n-1))``, so processes that failed together do not retry together."""

    first_s: float = 0.1
    max_s: float = 5.0

    def delay_s(self, failures: int) -> float:
        ceiling = min(self.max_s, self.first_s * 2 ** max(failures - 1, 0))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


BACKOFF = Backoff()


async def retry_transient(
    what: str,
    call: Callable[[], Awaitable[None]],
    stopping: asyncio.Event,
    backoff: Backoff = BACKOFF,
) -> bool:
    """Run ``call`` until it succeeds (True), or until shutdown begins while it keeps failing
    transiently (False). A permanent error is raised at once, for the caller to dead-letter."""
    failures = 0
    while True:
        try:
            await call()
            return True
        except Exception as exc:
            if not is_transient(exc):
                raise
            failures += 1
            delay = backoff.delay_s(failures)
            if failures == 1:
                log.warning("%s failed (%s); retrying", what, describe_error(exc), exc_info=exc)
            else:
                log.warning(
                    "%s failed %d times (%s); retrying in %.1fs",
                    what,
                    failures,
                    describe_error(exc),
                    delay,
                )
        if stopping.is_set():
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), delay)


def describe_error(exc: BaseException) -> str:
    """Type and message, cut: what a dead letter or a log line says (never a payload)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text[:500]}" if text else type(exc).__name__


# --- fetch loops that must not die quietly ---------------------------------------------------------

_failures: list[str] = []


def stop_process(reason: str) -> None:
    """Log ``reason`` and stop this process as SIGTERM would, marking the exit as a failure."""
    log.critical("%s; stopping the process", reason)
    _failures.append(reason)
    os.kill(os.getpid(), signal.SIGTERM)


def failed() -> bool:
    """Did ``stop_process`` stop this process (so it must exit non-zero)?"""
    return bool(_failures)


async def cancel_and_wait(task: asyncio.Task[Any], again_s: float = 1.0) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again every ``again_s``.

    Once is not always enough on Python 3.11: ``asyncio.wait_for`` swallows a cancellation that
    arrives as the call it waits for finishes, and a loop around it then goes on for good (a
    router's stop hung so in CI). Its outcome (an error, a cancellation) is not raised here."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=again_s)
    if not task.cancelled():
        task.exception()  # retrieved: a loop's error is logged where it happens


def supervise(task: asyncio.Task[None], what: str, stopping: asyncio.Event) -> None:
    """Stop the process if ``task`` ends with an error, or ends at all before ``stopping``."""

    def ended(t: asyncio.Task[None]) -> None:
        if t.cancelled() or stopping.is_set():
            return
        exc = t.exception()
        reason = f"{what} stopped" + (f": {describe_error(exc)}" if exc else " unexpectedly")
        if exc is not None:
            log.error("%s", reason, exc_info=exc)
        stop_process(reason)

    task.add_done_callback(ended)
