"""``spectrum masks``: what a lottery-ticket mask keeps of the top singular directions."""

from __future__ import annotations

from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

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
    from spectrum_cli.masks import LayerMaskReport, MaskedWeights

# A value that is not defined, in tables.
UNDEFINED = "—"


class Scope(str, Enum):
    """Where magnitude pruning ranks |w|: over all prunable matrices, or within each."""

    global_ = "global"
    layer = "layer"


def masks(
    checkpoint: Path = typer.Argument(
        None, help="A checkpoint whose weights are stored unmasked (or with prune masks)."
    ),
    mask: Path = typer.Option(
        None, "--mask", help="A file of 0/1 tensors keyed like the weights (safetensors or torch)."
    ),
    keep: float = typer.Option(
        None,
        "--keep",
        metavar="FRACTION",
        help="Compute magnitude masks keeping this fraction of entries, 0 < FRACTION ≤ 1.",
    ),
    scope: Scope = typer.Option(
        None,
        "--scope",
        show_default=False,
        help="With --keep: one magnitude threshold over all matrices (global, the default), "
        "or the same fraction in each layer.",
    ),
    include_output: bool = typer.Option(
        False, "--include-output", help="With --keep: prune the output layer too."
    ),
    output_layer: str = typer.Option(
        None,
        "--output-layer",
        metavar="NAME",
        help="With --keep or --mask: the layer to take as the output layer, in place of the "
        "guess (last matrix of a torch file; for safetensors, a classifier/fc/head/lm_head/"
        "output/... module, else the last matrix).",
    ),
    seed: int = typer.Option(
        None, "--seed", show_default=False, help="Seed of the random control masks (default 0)."
    ),
    dense_run: str = typer.Option(
        None, "--dense-run", help="Over training: the dense run (a run name or directory)."
    ),
    masked_run: str = typer.Option(
        None, "--masked-run", help="Over training: the masked run (a run name or directory)."
    ),
    store: Path = typer.Option(
        None,
        "--store",
        "-s",
        help="Over training: a store holding both runs; without it each run is analysed afresh.",
    ),
    output: Format = typer.Option(Format.table, "--format", help="table, csv or json."),
    plot: Path = typer.Option(
        None,
        "--plot",
        callback=figure_path,
        help="Also draw the result to this image file: .png, .pdf or .svg, as its suffix says.",
    ),
) -> None:
    """Compare lottery-ticket masks with the top singular directions of the weights.

    For one checkpoint, per masked matrix: the mask's density; "agreement", the agreement
    score between W and the masked M⊙W (mean of the first 10 diagonal entries of
    |(u_i·u'_i)(v_i·v'_i)|, in [0, 1]); "random", the same for a seeded random mask of equal
    density; "IoU by rank k", the overlap between the magnitude mask of W and the magnitude
    mask of its rank-k approximation at the same density, for k = 1, 2, 4, …, r: it depends on
    W and the density, not on which entries the given mask keeps; "random IoU", the overlap of
    the random mask with the magnitude mask of W. Masks come from --mask, from
    torch.nn.utils.prune pairs in the checkpoint, or from --keep; the output layer is left
    whole unless --include-output.

    Over training (--dense-run and --masked-run): the agreement score between the two runs'
    top singular vectors at each step both have, from --store or from a temporary analysis.
    """
    from spectrum_cli.errors import UsageError

    over_training = dense_run is not None or masked_run is not None
    if over_training:
        if dense_run is None or masked_run is None:
            raise UsageError("give both --dense-run and --masked-run")
        given = [
            flag
            for flag, value in (
                ("CHECKPOINT", checkpoint),
                ("--mask", mask),
                ("--keep", keep),
                ("--scope", scope),
                ("--include-output", include_output or None),
                ("--output-layer", output_layer),
                ("--seed", seed),
            )
            if value is not None
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{', '.join(given)} {verb} to one checkpoint, not to runs")
        _over_training(dense_run, masked_run, store, output, plot)
        return
    if checkpoint is None:
        raise UsageError("give a CHECKPOINT, or --dense-run and --masked-run")
    if store is not None:
        raise UsageError("--store applies to --dense-run and --masked-run")
    if not checkpoint.exists():
        raise UsageError(f"{checkpoint} does not exist; pass a checkpoint file or directory")
    _one_checkpoint(
        checkpoint,
        mask,
        keep,
        None if scope is None else scope.value,
        include_output,
        output_layer,
        0 if seed is None else seed,
        output,
        plot,
    )


def _one_checkpoint(
    checkpoint: Path,
    mask: Path | None,
    keep: float | None,
    scope: str | None,
    include_output: bool,
    output_layer: str | None,
    seed: int,
    output: Format,
    plot: Path | None,
) -> None:
    from spectrum_cli.masks import collect_masks, compare_masks

    masked = collect_masks(
        checkpoint,
        mask=mask,
        keep=keep,
        scope=scope,
        include_output=include_output,
        output=output_layer,
    )
    reports = compare_masks(masked, seed=seed)
    if plot is not None:
        from spectrum_cli.plots import mask_overlap_figure, save_figure

        save_figure(mask_overlap_figure(f"{checkpoint.name}: {masked.source}", reports), plot)
        err_console.print(f"wrote {plot}", markup=False)

    if output is Format.json:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "masks": masked.source,
                "output_layer": masked.output_layer,
                "unmasked": masked.unmasked,
                "seed": seed,
                "layers": [asdict(report) for report in reports],
            }
        )
        return
    if output is Format.csv:
        print_csv(
            [
                {
                    "layer": r.layer,
                    "matrix_shape": shape_text(r.matrix_shape),
                    "density": r.density,
                    "agreement": r.agreement,
                    "random_agreement": r.random_agreement,
                    "random_iou": r.random_iou,
                    "k": k,
                    "iou": iou,
                }
                for r in reports
                for k, iou in zip(r.ranks, _per_rank(r), strict=True)
            ]
        )
        return

    from rich.table import Table

    table = Table(title=f"{checkpoint}: {masked.source}; {_left_whole(masked)}; seed {seed}")
    columns = ("layer", "matrix", "density", "agreement", "random", "IoU by rank k", "random IoU")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("layer", "IoU by rank k") else "right"
        )
    for r in reports:
        curve = (
            " ".join(f"{k}:{iou:.2f}" for k, iou in zip(r.ranks, r.iou, strict=True))
            if r.iou is not None
            else UNDEFINED
        )
        table.add_row(
            r.layer,
            shape_text(r.matrix_shape),
            f"{r.density:.3f}",
            f"{r.agreement:.3f}",
            f"{r.random_agreement:.3f}",
            curve,
            UNDEFINED if r.random_iou is None else f"{r.random_iou:.3f}",
        )
    console.print(table)


def _per_rank(report: LayerMaskReport) -> list[float | None]:
    """The IoU at each rank, None at every rank where it is undefined."""
    return list(report.iou) if report.iou is not None else [None] * len(report.ranks)


def _left_whole(masked: MaskedWeights) -> str:
    """Which matrices the masks leave whole, the output layer first, in words."""
    out = masked.output_layer
    words = []
    if out is not None:
        words.append(
            f"output layer {out} " + ("left whole" if out in masked.unmasked else "masked")
        )
    others = [layer for layer in masked.unmasked if layer != out]
    if others:
        words.append(f"also left whole: {', '.join(others)}")
    return "; ".join(words) or "every matrix masked"


def _over_training(
    dense_run: str, masked_run: str, store: Path | None, output: Format, plot: Path | None
) -> None:
    from spectrum_cli.masks import compare_runs

    if store is None:
        err_console.print("no --store given: analysing both runs into a temporary store")
    rows = compare_runs(dense_run, masked_run, store)
    if plot is not None:
        from spectrum_cli.plots import masked_agreement_figure, save_figure

        save_figure(masked_agreement_figure(f"{dense_run} against {masked_run}", rows), plot)
        err_console.print(f"wrote {plot}", markup=False)

    if output is Format.json:
        print_json(
            {
                "dense_run": dense_run,
                "masked_run": masked_run,
                "store": None if store is None else str(store),
                "rows": [asdict(row) for row in rows],
            }
        )
        return
    if output is Format.csv:
        print_csv([asdict(row) for row in rows])
        return

    # One row per step, one column per layer.
    from rich.table import Table

    layers = list(dict.fromkeys(row.layer for row in rows))
    steps = sorted({row.step for row in rows})
    scores = {(row.layer, row.step): row.agreement for row in rows}
    table = Table(title=f"agreement score, {dense_run} against {masked_run}")
    table.add_column("step", justify="right")
    for layer in layers:
        table.add_column(layer, justify="right")
    for step in steps:
        cells = [scores.get((layer, step)) for layer in layers]
        table.add_row(str(step), *("" if s is None else f"{s:.3f}" for s in cells))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command()(masks)
