"""Where the command line writes: results on stdout, everything else on stderr."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console

# The width of a table on a pipe: wider than any row, so that none is folded.
_PIPED_WIDTH = 100_000


def _table_width() -> int | None:
    """The width stdout's tables are laid out in: a terminal's own, or COLUMNS where set.

    Piped with no COLUMNS, a table is as wide as it needs: each row stays one line, whole, for
    ``grep`` and ``cut`` (Rich would otherwise fold it into 80 columns).
    """
    if "COLUMNS" in os.environ:
        return None
    try:
        return None if sys.stdout.isatty() else _PIPED_WIDTH
    except (AttributeError, ValueError):  # no stdout, or a closed one
        return None


class _StderrConsole(Console):
    """A console on stderr that falls silent when stderr is closed, and lets the work go on.

    Rich's own answer to a closed pipe is to exit; on stderr that could come from a thread of
    Dask's that logs (``spectrum -v analyze … 2>&1 | head``) and leave the command waiting.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True


# Lines are never wrapped: one message is one line, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True, width=_table_width())
err_console = _StderrConsole(stderr=True, highlight=False, soft_wrap=True)
# Errors and logs: on stderr like err_console, but --quiet does not silence them.
error_console = _StderrConsole(stderr=True, highlight=False, soft_wrap=True)


class Format(str, Enum):
    """How a command renders its result rows."""

    table = "table"
    csv = "csv"
    json = "json"


class SummaryFormat(str, Enum):
    """How a command that writes elsewhere renders its summary: no rows to give as CSV."""

    table = "table"
    json = "json"


def shape_text(shape: Any) -> str:
    """A shape as tables and CSV cells write it, ``64x288``: ASCII, so ``grep 64x288`` finds it."""
    return "x".join(map(str, shape))


def print_json(value: Any) -> None:
    """Write JSON to stdout, plain (no colour, no wrapping), one document.

    NaN and ±Inf, which JSON cannot hold, are written as null.
    """
    text = json.dumps(_finite(value), indent=2, allow_nan=False)
    sys.stdout.write(text + "\n")


def print_csv(rows: list[dict[str, Any]]) -> None:
    """Write rows as CSV to stdout, the header from the first row's keys."""
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sys.stdout.write(buffer.getvalue())


def figure_path(value: Path | None) -> Path | None:
    """The ``--plot`` callback: check, before any work, that the figure file can be written.

    The suffix names the format (png, pdf or svg); the folder is created if missing.
    """
    if value is None:
        return None
    from spectrum_cli.errors import UsageError
    from spectrum_cli.plots import check_figure_path

    try:
        return check_figure_path(value)
    except UsageError as error:
        raise UsageError(f"--plot {value}: {error}") from None


def show_progress() -> bool:
    """Progress bars only when stderr is a terminal and the user did not ask for quiet."""
    return err_console.is_terminal and not err_console.quiet


@contextmanager
def progress(description: str, *, label: bool = False) -> Iterator[tuple[Any, Any]]:
    """Callbacks that drive a progress bar on stderr, where :func:`show_progress` allows one.

    Yields ``found(total)``, called once the number of items is known, and ``done(item)``,
    called as each finishes; with ``label`` the bar names the last item done. The bar leaves
    no trace when the block ends.
    """
    bar = None
    if show_progress():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        )
    task = None

    def found(total: int) -> None:
        nonlocal task
        if bar is not None:
            bar.start()
            task = bar.add_task(description, total=total)

    def done(item: object) -> None:
        if bar is not None and task is not None:
            text = f"{description}: {item}" if label else description
            bar.update(task, advance=1, description=text)

    try:
        yield found, done
    finally:
        if bar is not None:
            bar.stop()


def _finite(value: Any) -> Any:
    """A copy of plain data with numpy values made plain and non-finite floats made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if hasattr(value, "tolist"):
        return _finite(value.tolist())
    return value


#: Columns of names, which may fold; every other column is a number and never wraps.
_NAMES = ("run", "layer", "next layer", "via")


def print_summary_table(title: str, headers: tuple[str, ...], table: list[tuple[str, ...]]) -> None:
    """A table of one line per layer, each run named on a line of its own above its layers.

    Meant for an 80-column terminal: numbers, steps and trends never wrap, and only names
    (the columns in ``_NAMES``) fold, after their separators, when they are too long. ``table``
    holds one tuple per layer, its run first; ``headers`` name the tuple's entries.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text

    summary = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    columns = headers[1:]
    for header in columns:
        name = header in _NAMES
        summary.add_column(
            header, justify="left" if name else "right", overflow="fold", no_wrap=not name
        )

    # Names break after their separators, in the width the numbers leave them.
    cells = [(f"  {line[1]}", *line[2:]) for line in table]
    heads = [line[0] for line in table]
    widths = _name_widths(columns, cells, heads, console.width)
    for i, (line, row) in enumerate(zip(table, cells, strict=True)):
        # A line naming the run heads its layers; a blank line ends them.
        if i == 0 or table[i - 1][0] != line[0]:
            summary.add_row(Text(_fold(line[0], widths[0]), style="bold"))
        last_of_run = i + 1 == len(table) or table[i + 1][0] != line[0]
        folded = [
            _fold(cell, widths[j], "    " if j == 0 else "  ") if j in widths else cell
            for j, cell in enumerate(row)
        ]
        summary.add_row(*folded, end_section=last_of_run)
    console.print(summary)


#: Where a run or layer name may break: after any of these characters.
_SEPARATORS = re.compile(r"[^/._:\-]+[/._:\-]*|[/._:\-]+")


def _name_widths(
    columns: tuple[str, ...], cells: list[tuple[str, ...]], heads: list[str], width: int
) -> dict[int, int]:
    """The width each name column gets: what the other columns leave, shared out fairly.

    A name column narrower than its share keeps its own width and leaves the rest to the
    others. The table has a space at each edge, and a padding space and a divider between
    columns (``box.SIMPLE_HEAD``, no edge padding).
    """
    from rich.cells import cell_len

    def natural(j: int) -> int:
        texts = [row[j] for row in cells] + (heads if j == 0 else [])
        return max([cell_len(columns[j]), *(cell_len(text) for text in texts)])

    names = [j for j, header in enumerate(columns) if header in _NAMES]
    numbers = sum(natural(j) for j, header in enumerate(columns) if header not in _NAMES)
    free = width - 2 - 2 * (len(columns) - 1) - numbers
    widths: dict[int, int] = {}
    for j in sorted(names, key=natural):
        share = max(free // (len(names) - len(widths)), 8)
        widths[j] = min(natural(j), share)
        free -= widths[j]
    return widths


def _fold(name: str, width: int, indent: str = "") -> str:
    """``name`` in lines of at most ``width`` cells, broken after ``/ . _ - :`` where it can be.

    Lines after the first start with ``indent``; a piece longer than a whole line is cut.
    """
    from rich.cells import cell_len

    indent = indent if width > cell_len(indent) + 1 else ""
    lines = [""]
    for piece in _SEPARATORS.findall(name):
        if lines[-1].strip() and cell_len(lines[-1] + piece) > width:
            lines.append(indent)
        lines[-1] += piece
        while cell_len(lines[-1]) > width:
            # Cut a piece that fills more than a line: as many characters as fit.
            line = lines[-1]
            start = len(indent) if len(lines) > 1 else 0
            cut = len(line)
            while cut > start + 1 and cell_len(line[:cut]) > width:
                cut -= 1
            if cut == len(line):
                break
            lines[-1:] = [line[:cut], indent + line[cut:]]
    return "\n".join(lines)
