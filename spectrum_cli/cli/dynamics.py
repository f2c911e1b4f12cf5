"""``spectrum rank``, ``stability``, ``align`` and ``report``: spectral dynamics from a store.

Each command selects runs and layers, asks :mod:`spectrum_cli.dynamics` for one series per
run and layer, and renders them: a summary table that fits a terminal (one line per run and
layer), every (run, layer, step) row as CSV or JSON, and figures on request.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from spectrum_cli.cli.output import (
    Format,
    SummaryFormat,
    console,
    err_console,
    figure_path,
    print_csv,
    print_json,
    progress,
)

_STORE = typer.Argument(Path("spectrum.zarr"), help="The spectra store `spectrum analyze` wrote.")
_RUNS = typer.Option(None, "--run", "-r", metavar="RUN", help="Only this run (repeat for more).")
_LAYERS = typer.Option(
    None,
    "--layers",
    "-l",
    metavar="REGEX",
    help="Only layers whose name matches this regular expression.",
)
_FORMAT = typer.Option(
    Format.table, "--format", help="table (a summary), or every row as csv or json."
)
_PLOT = typer.Option(
    None,
    "--plot",
    metavar="FILE.png",
    callback=figure_path,
    help="Also draw the figures to this file, as its suffix says (.png, .pdf or .svg); with "
    "several runs, one file per run (FILE-<run>.png).",
)
_TOP = typer.Option(
    None,
    "--top",
    min=1,
    metavar="N",
    help="Diagonal entries to report per step (default: every stored vector). "
    "The score is always the mean of the first 10.",
)


#: Columns of names, which may fold; every other column is a number and never wraps.
_NAMES = ("run", "layer", "next layer", "via")
#: Characters in a summary table's trend: one per step, or steps averaged in equal spans.
_TREND = 12


class Reference(str, Enum):
    """What each step's singular vectors are compared with."""

    final = "final"
    previous = "previous"


def rank(
    store: Path = _STORE,
    runs: list[str] = _RUNS,
    layers: str = _LAYERS,
    output: Format = _FORMAT,
    plot: Path = _PLOT,
    metrics: Path = typer.Option(
        None,
        "--metrics",
        metavar="FILE.csv",
        help="Training log (CSV with step, train_loss, val_acc, …) to draw beside the curves. "
        "By default metrics.csv is looked for beside each run's checkpoints.",
    ),
) -> None:
    """Show effective rank, stable rank and norms of every layer over training.

    Effective rank is Roy & Vetterli's exp(−Σ p_i ln p_i) with p_i = σ_i / Σσ; it is also given
    divided by min(m, n). Reads the singular values only.
    """
    from spectrum_cli.dynamics import rank_series, rows, select, sparkline
    from spectrum_cli.errors import UsageError
    from spectrum_cli.store import Store

    if metrics is not None and not metrics.is_file():
        raise UsageError(f"--metrics {metrics} is not a file; pass a CSV training log")
    opened = Store.open(store)
    series = rank_series(opened, select(opened, runs, layers))

    _emit(
        output,
        rows(series),
        headers=("run", "layer", "m×n", "steps", "first", "last", "min", "norm.", "trend"),
        table=[
            (
                one.run,
                one.layer,
                f"{one.shape[0]}×{one.shape[1]}",
                _span(one.steps),
                _number(one.metrics["effective_rank"][0]),
                _number(one.metrics["effective_rank"][-1]),
                _number(one.metrics["effective_rank"].min()),
                _number(one.metrics["normalized_effective_rank"][-1], 3),
                sparkline(one.metrics["effective_rank"], _TREND),
            )
            for one in series
        ],
        title="effective rank (first, last, min; norm. = last / min(m, n))",
    )
    if plot is not None:
        from spectrum_cli.dynamics import missing_log_note, training_metrics
        from spectrum_cli.plots import rank_figure

        def figure(run: str, mine: list) -> Any:
            training = training_metrics(opened, run, metrics)
            if training is None and metrics is None:
                err_console.print(f"note: {missing_log_note(opened, run)}", markup=False)
            return rank_figure(run, mine, training)

        _plot(plot, series, figure)


def stability(
    store: Path = _STORE,
    reference: Reference = typer.Option(
        Reference.final, "--reference", help="Compare each step with the final or previous step."
    ),
    top: int = _TOP,
    runs: list[str] = _RUNS,
    layers: str = _LAYERS,
    output: Format = _FORMAT,
    plot: Path = _PLOT,
) -> None:
    """Show when singular directions settle: agreement with the final (or previous) step.

    S_ij(t) = |(u_i(t)·u_j(T)) (v_i(t)·v_j(T))|; rows give the diagonal S_ii and the score,
    the mean of its first 10 entries. The table says from which step the score stays ≥ 0.9.
    """
    from spectrum_cli.dynamics import SETTLED, rows, select, sparkline, stability_series
    from spectrum_cli.store import Store

    opened = Store.open(store)
    series = stability_series(opened, select(opened, runs, layers), reference.value, top)
    _emit(
        output,
        rows(series),
        headers=("run", "layer", "steps", "first", "min", f"≥ {SETTLED} from", "trend"),
        table=[
            (
                one.run,
                one.layer,
                _span(one.steps),
                _number(one.score[0], 3),
                _number(one.score.min(), 3),
                one.settled_label(),
                sparkline(one.score, _TREND),
            )
            for one in series
        ],
        title=f"top-10 agreement score with the {reference.value} step",
    )
    if plot is not None:
        from spectrum_cli.plots import stability_figure

        _plot(plot, series, lambda run, mine: stability_figure(run, mine, reference.value))


def align(
    store: Path = _STORE,
    pairs: list[str] = typer.Option(
        None,
        "--pair",
        metavar="LAYER_A:LAYER_B",
        help="Align these two layers, as LAYER_A:LAYER_B (repeat for more). By default every "
        "pair of consecutive layers whose sizes connect.",
    ),
    top: int = _TOP,
    runs: list[str] = _RUNS,
    layers: str = _LAYERS,
    output: Format = _FORMAT,
    plot: Path = _PLOT,
) -> None:
    """Show how consecutive layers align: A_jj = |u_j(W_l) · v_j(W_l+1)| per step.

    Pairs connect by size in the checkpoint's tensor order (a dense layer taking as many
    inputs as the one before gives outputs; a convolution after a convolution, compared at the
    centre of its kernel). The score is the mean of the first 10 diagonal entries.
    """
    from spectrum_cli.dynamics import alignment_series, rows, select, sparkline
    from spectrum_cli.errors import UsageError
    from spectrum_cli.metrics.alignment import CONVOLUTION
    from spectrum_cli.store import Store

    opened = Store.open(store)
    series = alignment_series(opened, select(opened, runs, layers), pairs, top)
    if not series:
        raise UsageError(
            f"no consecutive layers of the chosen runs in {store} connect by size; "
            "name pairs with --pair LAYER_A:LAYER_B"
        )
    _emit(
        output,
        rows(series),
        headers=("run", "layer", "next layer", "via", "steps", "first", "last", "max", "trend"),
        table=[
            (
                one.run,
                one.layer,
                one.extra["next_layer"],
                "conv" if one.extra["connection"] == CONVOLUTION else one.extra["connection"],
                _span(one.steps),
                _number(one.score[0], 3),
                _number(one.score[-1], 3),
                _number(one.score.max(), 3),
                sparkline(one.score, _TREND),
            )
            for one in series
        ],
        title="top-10 alignment score of consecutive layers",
    )
    if plot is not None:
        from spectrum_cli.plots import alignment_figure

        _plot(plot, series, alignment_figure)


def report(
    store: Path = _STORE,
    out: Path = typer.Option(
        Path("spectrum-report"),
        "--out",
        "-o",
        metavar="DIR",
        help="Folder to write index.html and figures/ into (created if missing).",
    ),
    metrics: Path = typer.Option(
        None,
        "--metrics",
        metavar="FILE.csv",
        help="Training log to use for every run (default: each run's own metrics.csv).",
    ),
    output: SummaryFormat = typer.Option(
        SummaryFormat.table,
        "--format",
        help="table (the page's path) or json (the page, each run's figures and training log).",
    ),
) -> None:
    """Write one self-contained HTML page of figures and tables for a whole store.

    Rank, stability (against the final step) and alignment for every run, with what was
    analysed and how. Images are embedded, so the page reads offline as one file; each figure
    is also written as a PNG file in DIR/figures.
    """
    from dataclasses import asdict

    from spectrum_cli.errors import UsageError
    from spectrum_cli.report import write_report

    if metrics is not None and not metrics.is_file():
        raise UsageError(f"--metrics {metrics} is not a file; pass a CSV training log")

    with progress("report", label=True) as (found, done):
        written = write_report(store, out, metrics=metrics, on_found=found, on_done=done)
    for note in written.notes:
        err_console.print(f"note: {note}", markup=False)
    if output is SummaryFormat.json:
        print_json(asdict(written))
    else:
        console.print(written.page, markup=False)


# ---------------------------------------------------------------------------- rendering


def _emit(
    output: Format,
    rows: list[dict[str, Any]],
    headers: tuple[str, ...],
    table: list[tuple[str, ...]],
    title: str,
) -> None:
    """Every row as JSON or CSV, or the one-line-per-layer summary as a table.

    The table is meant for an 80-column terminal: each run is named on a line of its own
    above its layers, one line each; numbers, steps and trends never wrap, and only names
    fold when they are too long. ``table`` holds one tuple per layer, its run first.
    """
    if output is Format.json:
        print_json(rows)
    elif output is Format.csv:
        from spectrum_cli.dynamics import flat_rows

        print_csv(flat_rows(rows))
    else:
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


def _plot(plot: Path, series: list, figure_of) -> None:
    """Draw one figure per run: to ``plot`` itself for one run, else ``plot``-<run>.<suffix>."""
    from spectrum_cli.plots import run_slug, save_figure

    by_run: dict[str, list] = {}
    for one in series:
        by_run.setdefault(one.run, []).append(one)
    for run, mine in by_run.items():
        path = plot
        if len(by_run) > 1:
            path = plot.with_name(f"{plot.stem}-{run_slug(run)}{plot.suffix}")
        save_figure(figure_of(run, mine), path)
        err_console.print(f"wrote {path}", markup=False)


def _span(steps) -> str:
    return f"{int(steps[0])}..{int(steps[-1])}" if len(steps) else "none"


def _number(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(rank)
    app.command()(stability)
    app.command()(align)
    app.command()(report)
