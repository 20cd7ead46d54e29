"""SQL text for the metrics query endpoint, which takes a query and no parameters."""

from __future__ import annotations

import hashlib


def literal(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def tenant_hash(tenant: str | None) -> str:
    """How llm_events keeps a tenant: the first 16 hex of sha256 ('' for none)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16] if tenant else ""
