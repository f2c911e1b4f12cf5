"""``spectrum lmc`` and ``spectrum prune-eval``: evaluate checkpoints with a model and data."""

from __future__ import annotations

import os
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from spectrum_cli.cli.output import (
    Format,
    console,
    err_console,
    figure_path,
    print_csv,
    print_json,
    shape_text,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spectrum_cli.evaluation import Evaluator
    from spectrum_cli.lmc import ConnectivityReport
    from spectrum_cli.pruning import PruningReport

_MODEL_HELP = (
    "package.module:callable or path/to/file.py:callable returning the nn.Module (called with "
    "no arguments). Not needed for sample checkpoints."
)
_DATA_HELP = (
    "package.module:callable or path/to/file.py:callable returning {split: (inputs, targets) or "
    "batches}, or an object with .splits and optional .loss_fn/.error_fn. Not needed for sample "
    "checkpoints."
)


class Align(str, Enum):
    """How B's hidden units are put in A's order before interpolating."""

    none = "none"
    weights = "weights"


class Keep(str, Enum):
    """Which singular components a pruned matrix keeps."""

    top = "top"
    bottom = "bottom"


def _model_option() -> Any:
    return typer.Option(None, "--model", help=_MODEL_HELP)


def _data_option() -> Any:
    return typer.Option(None, "--data", help=_DATA_HELP)


def lmc(
    a: Path = typer.Argument(..., metavar="A", help="Checkpoint A (α = 0)."),
    b: Path = typer.Argument(..., metavar="B", help="Checkpoint B (α = 1)."),
    model: str = _model_option(),
    data: str = _data_option(),
    alphas: int = typer.Option(11, "--alphas", min=2, help="Points on the α grid, ends included."),
    split: str = typer.Option(
        "train", "--split", help="The split the barrier is measured on (samples: train, val)."
    ),
    max_examples: int = typer.Option(
        None, "--max-examples", min=1, help="Use the first N examples of each split."
    ),
    batch_size: int = typer.Option(
        1024, "--batch-size", min=1, help="Examples per batch, for data given as whole tensors."
    ),
    bn_reset: bool = typer.Option(
        True,
        "--bn-reset/--no-bn-reset",
        help="Recompute BatchNorm statistics on the train split at every α.",
    ),
    align: Align = typer.Option(
        Align.none, "--align", help="weights: permute B's hidden units to A's (weight matching)."
    ),
    store: Path = typer.Option(
        None,
        "--store",
        "-s",
        help="Read singular vectors from this store (default spectrum.zarr if it holds both).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    plot: Path = typer.Option(
        None,
        "--plot",
        callback=figure_path,
        help="Also draw the curves to this image file: .png, .pdf or .svg, as its suffix says.",
    ),
) -> None:
    """Measure the loss barrier on the straight line between two checkpoints.

    Interpolates every floating entry, θ(α) = (1−α)θ_A + αθ_B in float32 (integer buffers
    from A), and evaluates loss and error at each α. The barrier is
    max_α f(θ(α)) − ((1−α) f(θ_A) + α f(θ_B)); also reported over the end points' mean.
    Beside it: per layer, the top-10 agreement score of A's and B's singular vectors.
    Sample checkpoints rebuild their model and data; others need --model and --data.
    """
    from spectrum_cli.lmc import linear_mode_connectivity

    evaluator = _evaluator(a, model, data, batch_size, max_examples, device, others=(b,))
    report = linear_mode_connectivity(
        a,
        b,
        evaluator,
        points=alphas,
        split=split,
        bn_reset=bn_reset,
        align=align.value,
        store=store,
    )
    if plot is not None:
        _plot(report, plot)
    if output is Format.json:
        print_json(asdict(report))
    elif output is Format.csv:
        errors: Sequence[float | None] = report.error or [None] * len(report.alphas)
        print_csv(
            [
                {"alpha": alpha, "loss": loss, "error": error}
                for alpha, loss, error in zip(report.alphas, report.loss, errors, strict=True)
            ]
        )
    else:
        _lmc_tables(report)


def prune_eval(
    checkpoint: Path = typer.Argument(..., help="The checkpoint to evaluate."),
    keep: Keep = typer.Option(Keep.top, "--keep", help="Keep the top or bottom components."),
    fraction: float = typer.Option(
        0.5, "--fraction", min=0.0, max=1.0, help="Kept fraction of each matrix's components."
    ),
    model: str = _model_option(),
    data: str = _data_option(),
    max_examples: int = typer.Option(
        None, "--max-examples", min=1, help="Use the first N examples of each split."
    ),
    batch_size: int = typer.Option(
        1024, "--batch-size", min=1, help="Examples per batch, for data given as whole tensors."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
) -> None:
    """Evaluate a checkpoint with its matrices cut to their top or bottom singular components.

    Every matrix but the output layer (the last in the model's module order) keeps round(f·r)
    of its r = min(m, n) singular components, the largest (top) or the smallest (bottom); loss
    and error on every split, before and after. Sample checkpoints rebuild their model and
    data; others need --model and --data.
    """
    from spectrum_cli.pruning import pruned_evaluation

    evaluator = _evaluator(checkpoint, model, data, batch_size, max_examples, device)
    report = pruned_evaluation(checkpoint, evaluator, keep=keep.value, fraction=fraction)
    if output is Format.json:
        print_json(asdict(report))
    elif output is Format.csv:
        print_csv([asdict(split) for split in report.splits])
    else:
        _pruning_tables(report)


def _evaluator(
    checkpoint: Path,
    model: str | None,
    data: str | None,
    batch_size: int,
    max_examples: int | None,
    device: str,
    others: tuple[Path, ...] = (),
) -> Evaluator:
    import torch

    from spectrum_cli.errors import UsageError
    from spectrum_cli.evaluation import evaluator_for
    from spectrum_cli.spectra import resolve_device

    for path in (checkpoint, *others):
        if not path.exists():
            raise UsageError(f"{path} does not exist; pass a checkpoint file or directory")
    return evaluator_for(
        checkpoint,
        model,
        data,
        batch_size=batch_size,
        max_examples=max_examples,
        device=torch.device(resolve_device(device)),
    )


def _plot(report: ConnectivityReport, path: Path) -> None:
    from spectrum_cli.plots import interpolation_figure, save_figure

    curves: dict[str, Sequence[float]] = {"loss": report.loss}
    barriers = {"loss": (report.loss_barrier.height, report.loss_barrier.alpha)}
    if report.error is not None and report.error_barrier is not None:
        curves["error"] = report.error
        barriers["error"] = (report.error_barrier.height, report.error_barrier.alpha)
    agreements = [(r.layer, r.agreement, r.aligned_agreement) for r in report.layers]
    # Name the checkpoints by their paths below the folder above the one they share.
    a, b = Path(report.a).absolute(), Path(report.b).absolute()
    common = Path(os.path.commonpath([a.parent, b.parent])).parent
    title = f"{a.relative_to(common)} → {b.relative_to(common)}, split {report.split}"
    save_figure(interpolation_figure(title, report.alphas, curves, barriers, agreements), path)
    err_console.print(f"wrote {path}", markup=False)


def _lmc_tables(report: ConnectivityReport) -> None:
    from rich.table import Table

    def cell(value: float | None, digits: int = 4) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    # The curve.
    if not report.batchnorm:
        batchnorm = "no BatchNorm"
    else:
        batchnorm = f"BatchNorm statistics {'recomputed' if report.bn_reset else 'interpolated'}"
    title = (
        f"{report.a} → {report.b}: split {report.split!r}, {report.examples} examples, "
        f"align {report.align}, {batchnorm}"
    )
    curve = Table(title=title)
    for column in ("α", "loss", "error"):
        curve.add_column(column, justify="right")
    errors: Sequence[float | None] = report.error or [None] * len(report.alphas)
    for alpha, loss, error in zip(report.alphas, report.loss, errors, strict=True):
        curve.add_row(f"{alpha:.2f}", cell(loss), cell(error))
    console.print(curve)

    # The barriers.
    barriers = Table(title="barrier: max over α of f(θ(α)) minus the line, or the ends' mean")
    for column in ("", "barrier", "at α", "over the ends' mean", "at α"):
        barriers.add_column(column, justify="right")
    for name, barrier in (("loss", report.loss_barrier), ("error", report.error_barrier)):
        if barrier is not None:
            barriers.add_row(
                name,
                cell(barrier.height),
                cell(barrier.alpha, 2),
                cell(barrier.height_over_mean),
                cell(barrier.alpha_over_mean, 2),
            )
    console.print(barriers)

    # The spectral view.
    aligned = report.align != "none"
    layers = Table(title=f"top-10 agreement of A's and B's singular vectors ({report.spectra})")
    layers.add_column("layer")
    layers.add_column("matrix", justify="right")
    layers.add_column("agreement", justify="right")
    if aligned:
        layers.add_column("aligned", justify="right")
    for row in report.layers:
        cells = [row.layer, shape_text(row.matrix_shape), cell(row.agreement, 3)]
        if aligned:
            cells.append(cell(row.aligned_agreement, 3))
        layers.add_row(*cells)
    console.print(layers)


def _pruning_tables(report: PruningReport) -> None:
    from rich.table import Table

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    title = f"{report.checkpoint}: {report.keep} {report.fraction:g} of each matrix's components"
    splits = Table(title=title)
    for column in ("split", "examples", "loss", "pruned", "error", "pruned"):
        splits.add_column(column, justify="left" if column == "split" else "right")
    for s in report.splits:
        splits.add_row(
            s.split,
            str(s.examples),
            cell(s.loss_before),
            cell(s.loss_after),
            cell(s.error_before),
            cell(s.error_after),
        )
    console.print(splits)

    layers = Table(title="components kept")
    for column in ("layer", "matrix", "r", "kept"):
        layers.add_column(column, justify="left" if column == "layer" else "right")
    for layer in report.layers:
        kept = str(layer.kept) if layer.pruned else f"{layer.kept} (output layer, whole)"
        layers.add_row(layer.layer, shape_text(layer.matrix_shape), str(layer.rank_bound), kept)
    console.print(layers)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(lmc)
    app.command("prune-eval")(prune_eval)
