"""Long commands' progress where no terminal is attached: plain lines, never a bar."""

from __future__ import annotations

import io

import pytest

from switchboard import progress


def test_counters_print_plain_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line on every update
    out = io.StringIO()
    with progress.counters("replay", ["sent", "compared"], 3, out) as update:
        update("sent", 1)
        update("compared", 1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("replay: sent 1/3, compared 0/3, ")
    assert lines[-1].startswith("replay: sent 1/3, compared 1/3, ")
    assert "\x1b" not in out.getvalue()  # no terminal codes in a log


def test_steps_say_nothing_for_quick_work_and_count_slow_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quiet = io.StringIO()
    with progress.steps("report", 2, quiet) as advance:
        advance(what="matrix")
        advance(what="cascades")
    assert quiet.getvalue() == ""
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    said = io.StringIO()
    with progress.steps("eval", 2, said) as advance:
        advance()
    assert said.getvalue().startswith("eval: 1/2, ")


def test_tables_are_plain_in_a_pipe(capsys: pytest.CaptureFixture[str]) -> None:
    progress.print_table(["a"], [[1]], lambda c, r: "PLAIN", title="T")
    assert capsys.readouterr().out == "T\nPLAIN\n"
    assert "\x1b" in progress.rich_table(["a", "b"], [[1, "x"]])  # drawn for a terminal
