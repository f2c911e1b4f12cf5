"""``spectrum rank``, ``stability``, ``align`` and ``report``: spectral dynamics from a store.

Each command selects runs and layers, asks :mod:`spectrum_cli.dynamics` for one series per
run and layer, and renders them: a summary table that fits a terminal (one line per run and
layer), every (run, layer, step) row as CSV or JSON, and figures on request.
"""

from __future__ import annotations

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
    print_summary_table,
    progress,
    shape_text,
)

_STORE = typer.Argument(Path("spectrum.zarr"), help="The spectra store `spectrum analyze` wrote.")
_RUNS = typer.Option(None, "--run", "-r", metavar="RUN", help="Only this run (repeat for more).")
_LAYERS = typer.Option(
    None,
    "--layers",
    "-l",
    metavar="REGEX",
    help="Only layers in whose name this regular expression is found (re.search: '^0\\.' "
    "for names that start with '0.'). align and report keep a pair when either layer is chosen.",
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
    from spectrum_cli.dynamics import rank_series, read_training_metrics, rows, select, sparkline
    from spectrum_cli.errors import UsageError
    from spectrum_cli.store import Store

    if metrics is not None and not metrics.is_file():
        raise UsageError(f"--metrics {metrics} is not a file; pass a CSV training log")
    if metrics is not None and plot is not None:
        read_training_metrics(metrics)  # a log that cannot be drawn stops before any output
    opened = Store.open(store)
    series = rank_series(opened, select(opened, runs, layers))

    _emit(
        output,
        rows(series),
        headers=("run", "layer", "matrix", "steps", "first", "last", "min", "norm.", "trend"),
        table=[
            (
                one.run,
                one.layer,
                shape_text(one.shape),
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
        title="top-10 alignment score of " + ("the named pairs" if pairs else "consecutive layers"),
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
    runs: list[str] = _RUNS,
    layers: str = _LAYERS,
) -> None:
    """Write one self-contained HTML page of figures and tables for a store.

    Rank, stability (against the final step) and alignment for every run (or those chosen),
    with what was analysed and how. Images are embedded, so the page reads offline as one
    file; each figure is also written as a PNG file in DIR/figures.
    """
    from dataclasses import asdict

    from spectrum_cli.errors import UsageError
    from spectrum_cli.report import write_report

    if metrics is not None and not metrics.is_file():
        raise UsageError(f"--metrics {metrics} is not a file; pass a CSV training log")

    with progress("report", label=True) as (found, done):
        written = write_report(
            store, out, metrics=metrics, runs=runs, layers=layers, on_found=found, on_done=done
        )
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

    ``table`` holds one tuple per layer, its run first, as `print_summary_table` lays out.
    """
    if output is Format.json:
        print_json(rows)
    elif output is Format.csv:
        from spectrum_cli.dynamics import flat_rows

        print_csv(flat_rows(rows))
    else:
        print_summary_table(title, headers, table)


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
