"""Building dead letters: what to keep of a message a consumer could not process."""

from __future__ import annotations

from typing import Protocol

from pydantic import ValidationError

from schemas.v1 import DeadLetter

PAYLOAD_KEEP_BYTES = 64 * 1024


def describe(exc: Exception) -> str:
    """A reason a person can act on; for validation errors, the fields and what is wrong."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "(message)"
            parts.append(f"{loc}: {err['msg']}")
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        return "; ".join(parts) + more
    return str(exc)[:1000] or type(exc).__name__  # the type is the letter's error_type


def dead_letter(
    *, payload: bytes | None, topic: str, partition: int, offset: int, consumer: str, exc: Exception
) -> DeadLetter:
    raw = payload or b""
    kept = raw[:PAYLOAD_KEEP_BYTES]
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        consumer=consumer,
        reason=describe(exc),
        error_type=type(exc).__name__,
        payload=kept.decode("utf-8", errors="replace"),
        payload_bytes=len(raw),
        truncated=len(raw) > len(kept),
    )


class _Record(Protocol):
    topic: str
    partition: int
    offset: int
    value: bytes | None


def from_record(record: _Record, consumer: str, exc: Exception) -> DeadLetter:
    """The dead letter for a Kafka record (aiokafka's ``ConsumerRecord``)."""
    return dead_letter(
        payload=record.value,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        consumer=consumer,
        exc=exc,
    )
