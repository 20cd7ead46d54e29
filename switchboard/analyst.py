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
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from schemas.topics import PAYLOADS_HEADER, PAYLOADS_TABLE
from services.metrics.config import MetricsSettings
from services.metrics.domain import report
from services.metrics.domain.report import ReportError, parse_when
from switchboard import progress

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
            settings.store_url,
            settings.clickhouse_database,
            settings.payload_retention_days,
            settings.store_credentials,
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


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows) and rows
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
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


@dataclass(frozen=True)
class ReportArgs:
    since: str = "24h"
    until: str | None = None
    tenant: str | None = None
    fmt: str = "table"
    output: str | None = None
    source: str = "auto"
    cascades: bool = False


def _answers(asked: dict[str, str], settings: MetricsSettings) -> report.Results:
    results: report.Results = {}
    with progress.steps("report", len(asked)) as advance:
        for name, sql in asked.items():
            results[name] = run_query(sql, settings)
            advance(what=name)
    return results


def _write(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    Path(output).write_text(text, encoding="utf-8")
    print(f"report: wrote {output} ({len(text.encode()) / 1e6:.1f} MB)", file=sys.stderr)


def _csv(found: report.Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(found.columns)
    writer.writerows([["" if v is None else v for v in row] for row in found.rows()])
    return out.getvalue()


def report_command(args: ReportArgs) -> int:
    """The decision matrix (table, csv, json, or an html page with charts); in a table, then
    the cascades' figures when there are any. ``cascades``: only those."""
    settings = MetricsSettings()
    db = settings.clickhouse_database
    now = datetime.now(UTC)
    try:
        window = report.Window(
            parse_when(args.since, now),
            parse_when(args.until, now) if args.until else now,
            args.tenant,
        )
        source = report.choose_source(window, args.source, now)
        if args.cascades:
            columns, rows = run_query(report.cascade_sql(db, window), settings)
            if args.fmt == "table":
                print(f"Cascades, {window.describe()} (cost and time per request, all its calls):")
            _print(columns, rows, "json" if args.fmt == "json" else "table")
            return 0
        asked = report.queries(db, window, source, charts=args.fmt == "html")
        if args.fmt == "table":
            asked["cascades"] = report.cascade_sql(db, window)
        results = _answers(asked, settings)
    except (QueryFailed, ReportError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 1
    found = report.assemble(window, source, results)
    if args.fmt == "html":
        from services.metrics.domain.report_html import render

        _write(render(found), args.output)
    elif args.fmt == "csv":
        _write(_csv(found), args.output)
    elif args.fmt == "json":
        _write(json.dumps(found.matrix, default=str, indent=2), args.output)
    else:
        _print_matrix(found, results["cascades"])
    return 0


def _print_matrix(found: report.Report, cascades: tuple[list[str], list[list[Any]]]) -> None:
    title = f"Decision matrix, {found.window.describe()}, from {found.source}:"
    columns = [c for c in found.columns if c != "notes"]
    rows = [row[:-1] for row in found.rows()]
    progress.print_table(columns, rows, format_table, title)
    notes = [(i, row["notes"]) for i, row in enumerate(found.matrix, 1) if row["notes"]]
    if notes:
        print("Blank figures, by row:")
        for i, note in notes:
            print(f"  {i}: {note}")
    cascade_columns, cascade_rows = cascades
    if cascade_rows:
        print(
            "\nCascades: drafts rejected and escalated, and cost and time per request (all its "
            "calls) against the strong model alone (from the escalated requests):"
        )
        _print(cascade_columns, cascade_rows, "table")
