"""Versioned contracts shared by every Switchboard service."""

from schemas.topics import DEFAULT_DATABASE, EVENTS_TABLE, Topics
from schemas.v1 import (
    AUTO_MODEL,
    SCHEMA_VERSION,
    AttemptEvent,
    CancelRequest,
    ChatError,
    ChatMessage,
    ChatRequest,
    ChatResult,
    DeadLetter,
    Outcome,
    Reply,
    RequestMetadata,
    RoutedRequest,
    StreamChunk,
    Usage,
)

__all__ = [
    "AUTO_MODEL",
    "DEFAULT_DATABASE",
    "EVENTS_TABLE",
    "SCHEMA_VERSION",
    "AttemptEvent",
    "CancelRequest",
    "ChatError",
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "DeadLetter",
    "Outcome",
    "Reply",
    "RequestMetadata",
    "RoutedRequest",
    "StreamChunk",
    "Topics",
    "Usage",
]
