"""Every ClickHouse query of the Grafana dashboards, run by the ClickHouse engine (chDB) on the
tables the metrics service's migrations create. tests/unit/test_observability_files.py checks
their names without an engine; this catches the rest: types, aggregate functions, syntax."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from schemas.topics import EVENTS_1M_TABLE, EVENTS_TABLE
from services.metrics.adapters.store import ClickHouseStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

DASHBOARDS = sorted(
    (Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards").glob("*.json")
)


def clickhouse_queries() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets") or []:
                if "rawSql" in target:
                    found.append((f"{path.name}: {panel['title']}", target["rawSql"]))
        for var in dashboard["templating"]["list"]:
            if var["datasource"]["type"] == "grafana-clickhouse-datasource":
                found.append((f"{path.name}: variable {var['name']}", var["query"]))
    return found


def as_grafana_sends(sql: str, database: str) -> str:
    """The query after the ClickHouse plugin's macros and Grafana's variables, with the tables in
    ``database`` (the data source names none: its default database is the metrics service's)."""
    sql = re.sub(
        r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql
    )
    sql = re.sub(
        r"\$__timeFilter\((\w+)\)",
        r"\1 >= toDateTime(1700000000) AND \1 <= toDateTime(1700003600)",
        sql,
    )
    sql = sql.replace("$__interval_s", "60")
    sql = re.sub(r"\$\{(tier|model):singlequote\}", "'fast','balanced'", sql)
    for table in (EVENTS_1M_TABLE, EVENTS_TABLE):  # the longer name first
        sql = re.sub(rf"\bFROM {table}\b", f"FROM {database}.{table}", sql)
    assert "$" not in sql, f"a macro or variable this test does not fill: {sql}"
    return sql


@pytest.fixture
async def store(chdb_data_dir: Path) -> AsyncIterator[ClickHouseStore]:
    store = ClickHouseStore(f"chdb://{chdb_data_dir}", f"dashboards_{uuid.uuid4().hex[:8]}")
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


async def test_every_dashboard_query_runs(store: ClickHouseStore) -> None:
    found = clickhouse_queries()
    assert found, "no ClickHouse query in the dashboards"
    database = store.table.split(".")[0]
    for where, sql in found:
        try:
            await store.query(as_grafana_sends(sql, database))
        except Exception as exc:
            raise AssertionError(f"{where}: {exc}\n{sql}") from exc
