"""``spectrum analyze`` and ``spectrum ls``: build a store from checkpoints, list what it holds."""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from spectrum_cli.cli.output import (
    Format,
    SummaryFormat,
    console,
    err_console,
    error_console,
    print_csv,
    print_json,
    print_summary_table,
    progress,
    shape_text,
)

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def analyze(
    checkpoints: Path = typer.Argument(
        ..., help="A run folder, a folder of runs, or one checkpoint file."
    ),
    store: Path = typer.Option(Path("spectrum.zarr"), "--store", "-s", help="Zarr store to write."),
    top_k: int = typer.Option(32, "--top-k", min=1, help="Singular vectors kept per matrix."),
    workers: int = typer.Option(
        None,
        "--workers",
        min=1,
        help="Matrices decomposed at once here, one core each (default: one per core).",
    ),
    scheduler: str = typer.Option(
        None, "--scheduler", help="Address of a running Dask scheduler, e.g. tcp://host:8786."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output: SummaryFormat = typer.Option(
        SummaryFormat.table, "--format", help="table or json summary."
    ),
) -> None:
    """Decompose every weight matrix of every checkpoint and store the spectra.

    Incremental: checkpoints already in the store are skipped, so re-running after new
    checkpoints appear decomposes only those. Exit 0 when all is stored, 1 when some
    checkpoints or matrices failed (the rest are stored), 2 on bad usage.
    """
    from spectrum_cli.analysis import analyze as run_analysis
    from spectrum_cli.errors import UsageError

    if not _DEVICE.fullmatch(device):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not checkpoints.exists():
        raise UsageError(f"{checkpoints} does not exist; pass a folder of checkpoints or a file")

    with progress("decomposing") as (found, done):
        summary = run_analysis(
            checkpoints,
            store,
            top_k=top_k,
            workers=workers,
            scheduler=scheduler,
            device=device,
            on_found=found,
            on_done=done,
        )

    for note in summary.notes:
        err_console.print(f"note: {note}", markup=False)
    for line in summary.failed_checkpoints + summary.failed_matrices:
        error_console.print(f"[red]failed:[/red] {_escape(line)}")
    if output is SummaryFormat.json:
        print_json({**asdict(summary), "ok": summary.ok})
    else:
        console.print(
            f"{_count(summary.runs, 'run')}, {_count(summary.checkpoints, 'checkpoint')} "
            f"({summary.analysed} analysed now, {summary.already_stored} already stored, "
            f"{len(summary.failed_checkpoints)} failed), "
            f"{_count(summary.matrices, 'matrix', 'matrices')} decomposed "
            f"({len(summary.failed_matrices)} failed) in {summary.seconds:.1f} s -> {summary.store}",
            markup=False,
        )
    if not summary.ok:
        raise typer.Exit(1)


def _count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 run``, ``2 runs``."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def ls(
    store: Path = typer.Argument(Path("spectrum.zarr"), help="The spectra store."),
    output: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
) -> None:
    """List the runs, steps and layers of a store, with shapes and status."""
    from spectrum_cli.store import DONE, FAILED, Store

    opened = Store.open(store)
    runs: list[dict[str, Any]] = []
    for run in opened.runs():
        layers: list[dict[str, Any]] = []
        for layer, (_, status) in opened.statuses(run).items():
            attrs = opened.layer_attrs(run, layer)
            layers.append(
                {
                    "layer": layer,
                    "tensor_shape": attrs["tensor_shape"],
                    "matrix_shape": attrs["matrix_shape"],
                    "dtype": attrs["dtype"],
                    "done": int((status == DONE).sum()),
                    "failed": int((status == FAILED).sum()),
                    "failures": attrs.get("failures", {}),
                }
            )
        runs.append({"run": run, "steps": opened.done_steps(run), "layers": layers})
    if output is Format.json:
        print_json({"store": str(store), "top_k": opened.top_k, "runs": runs})
        return
    if output is Format.csv:
        print_csv(
            [
                {"run": listed["run"], "steps": len(listed["steps"])}
                | {key: _cell(value) for key, value in row.items() if key != "failures"}
                for listed in runs
                for row in listed["layers"]
            ]
        )
        return
    rows: list[tuple[str, ...]] = []
    for listed in runs:
        steps = listed["steps"]
        span = f"{steps[0]}..{steps[-1]} ({len(steps)})" if steps else "none"
        if not listed["layers"]:  # every checkpoint of it failed, or none was analysed yet
            rows.append((str(listed["run"]), "(no layer stored)", "", "", "", span, "0", "0"))
        for row in listed["layers"]:
            rows.append(
                (
                    str(listed["run"]),
                    str(row["layer"]),
                    shape_text(row["matrix_shape"]),
                    shape_text(row["tensor_shape"]),
                    str(row["dtype"]),
                    span,
                    str(row["done"]),
                    str(row["failed"]),
                )
            )
    headers = ("run", "layer", "matrix", "tensor", "dtype", "steps", "done", "failed")
    print_summary_table(f"{store} (top {opened.top_k} vectors)", headers, rows)


def _cell(value: object) -> object:
    """A shape as ``64x288`` in a CSV cell."""
    return shape_text(value) if isinstance(value, list) else value


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(analyze)
    app.command()(ls)
