"""Where the command line writes: results on stdout, everything else on stderr."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from rich.console import Console


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


_PIPED_WIDTH = 100_000

# Lines are never wrapped: one message is one line, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True, width=_table_width())
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
# Errors and logs: on stderr like err_console, but --quiet does not silence them.
error_console = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(str, Enum):
    """How a command renders its result rows."""

    table = "table"
    csv = "csv"
    json = "json"


class SummaryFormat(str, Enum):
    """How a command that writes elsewhere renders its summary: no rows to give as CSV."""

    table = "table"
    json = "json"


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
