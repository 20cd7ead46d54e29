"""Progress and tables for the long commands (eval, report, replay): rich where a terminal is
attached, plain lines where none is (CI logs, pipes), so the output reads well in both."""

from __future__ import annotations

import io
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Plain mode: a line at most this often (and at the end), so a log is not flooded.
PLAIN_EVERY_S = 5.0


class Advance(Protocol):
    def __call__(self, steps: int = 1, what: str | None = None) -> None: ...


def attached(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _bars(stream: TextIO, transient: bool) -> Progress:
    """rich bars on ``stream``: what each piece is, the bar, done of total, time so far."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=stream),
        transient=transient,
    )


@contextmanager
def steps(description: str, total: int, stream: TextIO | None = None) -> Iterator[Advance]:
    """``advance(n, what)`` after each piece of work; a bar on a terminal, else a line every
    ``PLAIN_EVERY_S`` and one at the end, on stderr (stdout stays the command's answer)."""
    stream = stream or sys.stderr
    if attached(stream):
        with _bars(stream, transient=True) as progress:
            task = progress.add_task(description, total=total)

            def bar(steps: int = 1, what: str | None = None) -> None:
                text = f"{description}: {what}" if what else description
                progress.update(task, advance=steps, description=text)

            yield bar
        return
    started = time.monotonic()
    state = {"done": 0, "said": started}

    def line(steps: int = 1, what: str | None = None) -> None:
        state["done"] += steps
        now = time.monotonic()
        finished = state["done"] >= total and now - started >= 1.0  # a quick one says nothing
        if finished or now - state["said"] >= PLAIN_EVERY_S:
            state["said"] = now
            after = f" ({what})" if what else ""
            print(
                f"{description}: {state['done']}/{total}{after}, {now - started:.1f} s",
                file=stream,
                flush=True,
            )

    yield line


class Update(Protocol):
    def __call__(self, name: str, completed: int) -> None: ...


@contextmanager
def counters(
    description: str, names: Sequence[str], total: int, stream: TextIO | None = None
) -> Iterator[Update]:
    """Several counts toward one ``total`` (``update(name, completed)``): a bar each on a
    terminal, else one line with all of them every ``PLAIN_EVERY_S`` and one at the end."""
    stream = stream or sys.stderr
    if attached(stream):
        width = max(len(n) for n in names)
        with _bars(stream, transient=False) as progress:
            tasks = {n: progress.add_task(n.ljust(width), total=total) for n in names}
            yield lambda name, completed: progress.update(tasks[name], completed=completed)
        return
    started = time.monotonic()
    counts = dict.fromkeys(names, 0)
    said = [started]

    def say() -> None:
        parts = ", ".join(f"{n} {c}/{total}" for n, c in counts.items())
        print(
            f"{description}: {parts}, {time.monotonic() - started:.0f} s", file=stream, flush=True
        )

    def update(name: str, completed: int) -> None:
        counts[name] = completed
        if time.monotonic() - said[0] >= PLAIN_EVERY_S:
            said[0] = time.monotonic()
            say()

    yield update
    say()


TableText = Callable[[Sequence[str], Sequence[Sequence[Any]]], str]


def rich_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """``rows`` drawn as a rich table, for a terminal (numbers right-aligned)."""
    table = Table(header_style="bold", box=box.SIMPLE_HEAD)
    for i, column in enumerate(columns):
        numeric = bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows)
        table.add_column(str(column), justify="right" if numeric else "left")
    for row in rows:
        table.add_row(
            *("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row)
        )
    out = io.StringIO()
    width = shutil.get_terminal_size().columns
    Console(file=out, width=max(width, 80), force_terminal=True, soft_wrap=True).print(table)
    return out.getvalue().rstrip("\n")


def table_text(plain: TableText) -> TableText:
    """What draws a table on stdout: rich on a terminal, ``plain`` elsewhere (and for pipes,
    which parse it)."""
    return rich_table if attached(sys.stdout) else plain


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    plain: TableText,
    title: str | None = None,
) -> None:
    if title:
        print(title)
    print(table_text(plain)(columns, rows))
