"""The migration list's own rules: numbered in order, every statement safe to run twice, and
an applied migration that changed refused by name."""

from __future__ import annotations

import re

import pytest

from services.metrics.adapters.migrations import MIGRATIONS, Migration, MigrationEdited, pending


def test_versions_run_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len({m.name for m in MIGRATIONS}) == len(MIGRATIONS)


@pytest.mark.parametrize(
    "statement", [s for m in MIGRATIONS for s in m.statements], ids=lambda s: s.split("(")[0][:60]
)
def test_every_statement_is_safe_to_run_twice(statement: str) -> None:
    text = " ".join(statement.split())
    if text.startswith(("CREATE", "ALTER TABLE {db}.")) and "MATERIALIZE INDEX" not in text:
        assert re.search(r"\bIF NOT EXISTS\b", text), text
    elif text.startswith("INSERT"):
        assert "insert_deduplication_token" in text, text  # a second run inserts nothing
    else:
        assert "MATERIALIZE INDEX" in text, text  # a mutation: it builds the same index again


def test_the_checksum_is_the_statements_not_the_database() -> None:
    first = MIGRATIONS[0]
    assert first.sql("a") != first.sql("b")
    assert Migration(1, "renamed", first.statements).checksum == first.checksum
    assert Migration(1, first.name, (*first.statements, "SELECT 1")).checksum != first.checksum


def test_pending_skips_the_applied_and_leaves_unknown_versions_alone() -> None:
    applied = {m.version: m.checksum for m in MIGRATIONS[:3]} | {999: "from a newer release"}
    assert pending(applied) == list(MIGRATIONS[3:])
    assert pending({}) == list(MIGRATIONS)


def test_an_edited_applied_migration_is_named() -> None:
    applied = {m.version: m.checksum for m in MIGRATIONS}
    applied[2] = "0" * 64
    with pytest.raises(MigrationEdited, match=f"migration 2 '{MIGRATIONS[1].name}' was edited"):
        pending(applied)
