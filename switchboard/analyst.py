"""``switchboard sql`` and ``switchboard report``: read-only questions to the metrics store.

Where the answer comes from, in order:
1. a ClickHouse server, when ``SWITCHBOARD_CLICKHOUSE_URL`` is an http(s) URL;
2. the running metrics service's query endpoint, found in ``<data_dir>/run/stack.json``
   (an embedded chDB store can be opened by one process only: while `switchboard up` runs, the
   metrics service owns it);
3. the chDB directory itself, when nothing runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from schemas.topics import EVENTS_TABLE, PAYLOADS_HEADER, PAYLOADS_TABLE
from services.metrics.config import MetricsSettings
from services.metrics.domain.report import cascade_sql, decision_matrix_sql

STACK_FILE = "stack.json"


class QueryFailed(RuntimeError):
    pass


def stack_file(data_dir: Path) -> Path:
    return data_dir / "run" / STACK_FILE


def _via_endpoint(
    state: dict[str, Any], sql: str, payloads: bool = False
) -> tuple[list[str], list[list[Any]]] | None:
    url, token = state.get("metrics_url"), state.get("metrics_token")
    if not url:
        return None
    headers = {"authorization": f"Bearer {token}"} if token else {}
    if payloads:
        headers[PAYLOADS_HEADER] = "read"
    try:
        resp = httpx.post(
            f"{url}/query",
            json={"sql": sql},
            timeout=120,
            headers=headers,
        )
    except httpx.TransportError:
        return None  # stale state file: the stack is gone
    try:
        body = resp.json()
    except ValueError as exc:
        raise QueryFailed(
            f"metrics service answered {resp.status_code}: {resp.text[:500]}"
        ) from exc
    if resp.status_code != 200:
        raise QueryFailed(body.get("error", {}).get("message", resp.text))
    return body["columns"], body["rows"]


def _direct(settings: MetricsSettings, sql: str) -> tuple[list[str], list[list[Any]]]:
    from services.metrics.adapters.store import ClickHouseStore

    async def go() -> tuple[list[str], list[list[Any]]]:
        store = ClickHouseStore(
            settings.store_url, settings.clickhouse_database, settings.payload_retention_days
        )
        try:
            await store.migrate()
            return await store.query(sql)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except Exception as exc:
        raise QueryFailed(
            str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        ) from exc


def run_query(
    sql: str, settings: MetricsSettings | None = None, payloads: bool = False
) -> tuple[list[str], list[list[Any]]]:
    """``sql``'s answer. A query of llm_payloads (captured prompts and answers) is refused
    unless ``payloads`` says the caller means it (``switchboard sql --payloads``)."""
    settings = settings or MetricsSettings()
    if PAYLOADS_TABLE in sql.lower() and not payloads:
        raise QueryFailed(
            f"{PAYLOADS_TABLE} holds captured prompts and answers (redacted); "
            "add --payloads to query it"
        )
    url = settings.clickhouse_url or ""
    if not url.startswith(("http://", "https://")):
        path = stack_file(settings.data_dir)
        if path.exists():
            answer = _via_endpoint(json.loads(path.read_text()), sql, payloads)
            if answer is not None:
                return answer
    return _direct(settings, sql)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float | Decimal):
        return f"{value:.6g}" if abs(float(value)) < 1e15 else str(value)
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds")
    return str(value)


def format_table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows) and rows
        for i in range(len(columns))
    ]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _print(columns: list[str], rows: list[list[Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=2))
    else:
        print(format_table(columns, rows))


def sql_command(sql: str, fmt: str = "table", payloads: bool = False) -> int:
    try:
        columns, rows = run_query(sql, payloads=payloads)
    except QueryFailed as exc:
        print(f"sql: {exc}", file=sys.stderr)
        return 1
    _print(columns, rows, fmt)
    return 0


def report_command(hours: float, fmt: str = "table", cascades: bool = False) -> int:
    """The decision matrix; in a table, then the cascades' figures when there are any.
    ``cascades``: only those (the way to have them as JSON)."""
    settings = MetricsSettings()
    table = f"{settings.clickhouse_database}.{EVENTS_TABLE}"
    try:
        if not cascades:
            columns, rows = run_query(decision_matrix_sql(table, hours), settings)
        if cascades or fmt == "table":
            cascade_columns, cascade_rows = run_query(cascade_sql(table, hours), settings)
    except QueryFailed as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    if cascades:
        if fmt == "table":
            print(f"Cascades, last {hours:g} h (cost and time per request, all its calls):")
        _print(cascade_columns, cascade_rows, fmt)
        return 0
    if fmt == "table":
        print(f"Decision matrix, last {hours:g} h (latency over successful attempts, ms):")
    _print(columns, rows, fmt)
    if fmt == "table" and cascade_rows:
        print(
            f"\nCascades, last {hours:g} h: drafts rejected and escalated, and cost and time per "
            "request (all its calls) against the strong model alone (from the escalated requests):"
        )
        _print(cascade_columns, cascade_rows, fmt)
    return 0
