"""Figures of spectral dynamics, one per run, drawn with matplotlib's Agg canvas.

- :func:`rank_figure`: a layers × steps heatmap of normalised effective rank, the per-layer
  curves, and the run's training and validation metrics beside them when it has any;
- :func:`stability_figure`: the top-10 agreement score (layer × step) and, per layer, the
  agreement diagonal (index × step);
- :func:`alignment_figure`: the same two views for pairs of layers.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot, so
nothing here touches global state or needs a display. Steps are placed at equal spacing and
labelled with their values: checkpoints are often saved on a log scale.

Every figure file is written by :func:`save_figure`, in the format its suffix names, after
:func:`check_figure_path` has checked, before any work, that it can be.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spectrum_cli.errors import UsageError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from spectrum_cli.dynamics import DiagonalSeries, RankSeries
    from spectrum_cli.masks import LayerMaskReport, StepAgreement

#: At most this many per-layer diagonal panels in one figure; the rest are named as left out.
MAX_PANELS = 16
#: At most this many entries in a legend; with more layers, colour encodes depth instead.
MAX_LEGEND = 10

#: The formats a figure file is written in, by its suffix (any case).
FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}

_DPI = 100


def rank_figure(
    run: str, series: Sequence[RankSeries], training: dict[str, np.ndarray] | None = None
) -> Figure:
    """Normalised effective rank of one run's layers over training.

    Parameters
    ----------
    run
        The run, for the title.
    series
        The run's layers, as :func:`spectrum_cli.dynamics.rank_series` gives them.
    training
        Columns of the run's training log (``step``, ``train_loss``, ``val_acc``, …), or None.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    labels = [one.layer for one in series]
    steps, grid = _grid([one.steps for one in series], [one.metrics for one in series])
    values = grid("normalized_effective_rank")  # (layers, steps)
    losses = _columns(training, "loss")
    accuracies = _columns(training, "acc")

    # Heatmap and curves on top; loss and accuracy below, sharing the step axis.
    rows = 2 if losses or accuracies else 1
    height = max(3.5, min(10.0, 1.5 + 0.2 * len(series)))
    figure = Figure(figsize=(13, height + 3.5 * (rows - 1)), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False, height_ratios=[height] + [3.5] * (rows - 1))
    _heatmap(axes[0][0], values, steps, labels, "normalised effective rank", figure, vmin=0, vmax=1)
    _curves(axes[0][1], series, labels)
    if rows == 2:
        _training_panel(axes[1][0], training, losses, "loss", log=True)
        _training_panel(axes[1][1], training, accuracies, "accuracy", log=False)
        axes[1][0].sharex(axes[0][1])
        axes[1][1].sharex(axes[0][1])
    figure.suptitle(f"{run}: effective rank (Roy & Vetterli) / min(m, n)")
    return figure


def stability_figure(run: str, series: Sequence[DiagonalSeries], reference: str) -> Figure:
    """Agreement of one run's singular vectors with the final (or previous) step.

    Parameters
    ----------
    run
        The run, for the title.
    series
        The run's layers, as :func:`spectrum_cli.dynamics.stability_series` gives them.
    reference
        ``"final"`` or ``"previous"``, for the labels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    against = "the final step" if reference == "final" else "the previous step"
    return _diagonal_figure(
        run,
        series,
        [one.layer for one in series],
        score_title=f"top-10 agreement score with {against}",
        panel_title="S_ii",
        title=f"{run}: singular-vector agreement with {against}",
    )


def alignment_figure(run: str, series: Sequence[DiagonalSeries]) -> Figure:
    """Alignment of one run's layer pairs (consecutive, or as named) over training.

    Parameters
    ----------
    run
        The run, for the title.
    series
        The run's pairs, as :func:`spectrum_cli.dynamics.alignment_series` gives them.

    Returns
    -------
    matplotlib.figure.Figure
    """
    return _diagonal_figure(
        run,
        series,
        [f"{one.layer} → {one.extra['next_layer']}" for one in series],
        score_title="top-10 alignment score |u_j(W_l) · v_j(W_l+1)|",
        panel_title="A_jj",
        title=f"{run}: alignment of layer pairs",
    )


def save_figure(figure: Figure, path: Path) -> Path:
    """Write a figure in the format its file suffix names (PNG, PDF or SVG).

    Parameters
    ----------
    figure
        The figure.
    path
        Where to write it; its folder is created if missing.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UsageError
        For another suffix, or a path that cannot be written.
    """
    path = Path(path)
    kind = figure_format(path)
    writable_folder(path.parent)
    try:
        figure.savefig(path, format=kind, dpi=_DPI)
    except OSError as error:
        raise UsageError(
            f"cannot write {path}: {error.strerror or error}; name a file you can write"
        ) from None
    return path


def figure_format(path: Path) -> str:
    """The image format a figure file's suffix names: ``png``, ``pdf`` or ``svg``.

    Raises
    ------
    UsageError
        For any other suffix (or none): the figure is not written under a misleading name.
    """
    kind = FIGURE_FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        named = f"ends in {Path(path).suffix!r}" if Path(path).suffix else "has no suffix"
        *others, last = FIGURE_FORMATS
        raise UsageError(
            f"{path} {named}; figures are written as {', '.join(others)} or {last}: "
            "name a file with one of these suffixes"
        )
    return kind


def check_figure_path(path: Path) -> Path:
    """Make sure a figure can be written at ``path``, before any work is done.

    The suffix must name a format (:func:`figure_format`), the path must not be a folder, and
    its folder must exist (it is created if missing) and take new files.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    UsageError
        Saying which of these fails.
    """
    path = Path(path)
    figure_format(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; name an image file such as {path / 'figure.png'}")
    writable_folder(path.parent)
    return path


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` if it is missing and check that new files can be written in it.

    Returns
    -------
    pathlib.Path
        ``folder``.

    Raises
    ------
    UsageError
        When it is a file, cannot be created, or refuses new files.
    """
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder; name a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A file opened and removed at once: the one test of writing that holds for every user.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write into {folder}: {error.strerror or error}; name a folder you can write to"
        ) from None
    return folder


def run_slug(run: str) -> str:
    """A run's name as one file-name part and HTML anchor, distinct for distinct runs.

    Letters, digits, ``.``, ``_`` and ``-`` are kept and anything else becomes ``_``; when
    that changes the name, 8 hex digits of its hash follow, so ``a/b`` (``a_b-…``) and ``a_b``
    never share a file.
    """
    plain = re.sub(r"[^A-Za-z0-9._-]+", "_", run).strip("._") or "run"
    if plain == run:
        return plain
    digest = hashlib.sha256(run.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{plain}-{digest}"


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes, for embedding."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- panels


def _diagonal_figure(
    run: str,
    series: Sequence[DiagonalSeries],
    labels: list[str],
    score_title: str,
    panel_title: str,
    title: str,
) -> Figure:
    """A score heatmap (row × step) beside one diagonal heatmap (index × step) per row."""
    from matplotlib.figure import Figure

    steps, grid = _grid([one.steps for one in series], [{"score": one.score} for one in series])
    shown = list(series)[:MAX_PANELS]
    columns = min(4, max(1, len(shown)))
    panel_rows = -(-len(shown) // columns)

    # The score heatmap on top; below it a grid of per-layer diagonals.
    top = max(3.0, min(8.0, 1.5 + 0.2 * len(series)))
    figure = Figure(figsize=(13, top + 2.6 * panel_rows), dpi=_DPI, layout="constrained")
    parts: Any = figure.subfigures(2, 1, height_ratios=[top, 2.6 * panel_rows])
    upper, lower = parts
    _heatmap(upper.subplots(), grid("score"), steps, labels, score_title, upper, vmin=0, vmax=1)
    axes = np.atleast_1d(lower.subplots(panel_rows, columns, squeeze=False)).ravel()
    image = None
    for ax, one, label in zip(axes, shown, labels, strict=False):
        diagonal = one.diagonal.T  # (index, steps)
        image = ax.imshow(
            diagonal,
            aspect="auto",
            interpolation="nearest",
            vmin=0,
            vmax=1,
            cmap="viridis",
            extent=(-0.5, diagonal.shape[1] - 0.5, diagonal.shape[0] + 0.5, 0.5),
        )
        ax.set_title(label, fontsize=8)
        ax.set_ylabel("index i", fontsize=7)
        _step_ticks(ax, one.steps)
        ax.tick_params(labelsize=7)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    if image is not None:
        lower.colorbar(image, ax=list(axes[: len(shown)]), label=panel_title, shrink=0.9)
    left_out = len(series) - len(shown)
    more = f" (first {len(shown)} of {len(series)} shown; --layers chooses)" if left_out else ""
    lower.suptitle(f"{panel_title} per index and step{more}", fontsize=9)
    figure.suptitle(title)
    return figure


def _heatmap(
    ax: Axes,
    values: np.ndarray,
    steps: np.ndarray,
    labels: list[str],
    title: str,
    owner,
    vmin: float,
    vmax: float,
) -> None:
    """Rows × steps as colour, a step missing from a row left blank."""
    image = ax.imshow(
        np.ma.masked_invalid(values),
        aspect="auto",
        interpolation="nearest",
        vmin=vmin,
        vmax=vmax,
        cmap="viridis",
    )
    ax.set_title(title, fontsize=10)
    _step_ticks(ax, steps)
    every = max(1, -(-len(labels) // 40))
    ax.set_yticks(range(0, len(labels), every), labels[::every], fontsize=7)
    owner.colorbar(image, ax=ax, shrink=0.9)


def _curves(ax: Axes, series: Sequence[RankSeries], labels: list[str]) -> None:
    """One line per layer; a legend when few, colour by depth when many."""
    from matplotlib import colormaps

    colours = colormaps["viridis"](np.linspace(0, 0.9, max(len(series), 1)))
    for one, label, colour in zip(series, labels, colours, strict=True):
        ax.plot(
            one.steps,
            one.metrics["normalized_effective_rank"],
            marker="." if len(one.steps) < 30 else None,
            color=colour,
            label=label,
            linewidth=1.2,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank / min(m, n)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(series) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.set_title("colour: layer depth (first dark, last light)", fontsize=8)


def _training_panel(
    ax: Axes, training: dict[str, np.ndarray] | None, names: list[str], what: str, log: bool
) -> None:
    """The training log's columns of one kind against step."""
    if not training or not names:
        ax.set_visible(False)
        return
    for name in names:
        values = training[name]
        finite = np.isfinite(values)
        ax.plot(training["step"][finite], values[finite], label=name, linewidth=1.2)
    if log and all((training[name][np.isfinite(training[name])] > 0).all() for name in names):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _step_ticks(ax: Axes, steps: np.ndarray, most: int = 8) -> None:
    """Label equally spaced columns with their step values, at most ``most`` of them."""
    every = max(1, -(-len(steps) // most))
    positions = list(range(0, len(steps), every))
    ax.set_xticks(positions, [str(int(steps[i])) for i in positions], fontsize=7)
    ax.set_xlabel("step", fontsize=8)


def _grid(step_lists: Sequence[np.ndarray], values: Sequence[dict[str, np.ndarray]]):
    """The union of steps and a function giving a (rows, steps) array of one named value."""
    steps = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in step_lists]))

    def grid(name: str) -> np.ndarray:
        out = np.full((len(step_lists), len(steps)), np.nan)
        for row, (own, named) in enumerate(zip(step_lists, values, strict=True)):
            out[row, np.searchsorted(steps, own)] = named[name]
        return out

    return steps, grid


def _columns(training: dict[str, np.ndarray] | None, word: str) -> list[str]:
    if not training:
        return []
    return [name for name in training if name != "step" and word in name.lower()]


# ---------------------------------------------------------------------------- lottery-ticket masks


def mask_overlap_figure(title: str, reports: Sequence[LayerMaskReport]) -> Figure:
    """IoU of each layer's magnitude mask with its rank-k approximation's, against k.

    A dashed line in the layer's colour marks its random control: the IoU of a random mask of
    the same density with the magnitude mask (about d / (2 − d) at density d). Layers whose
    IoU is undefined (a mask that keeps nothing) are left out.

    Parameters
    ----------
    title
        The checkpoint and how its masks came about.
    reports
        One per masked layer, as :func:`spectrum_cli.masks.compare_masks` gives them.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=_DPI, layout="constrained")
    ax = figure.subplots()
    reports = [r for r in reports if r.iou is not None and r.random_iou is not None]
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(reports)))
    for report, colour in zip(reports, colours, strict=True):
        assert report.iou is not None and report.random_iou is not None
        label = f"{report.layer} (d = {report.density:.3f})"
        ax.plot(report.ranks, report.iou, marker=".", color=colour, label=label, linewidth=1.2)
        ax.axhline(report.random_iou, color=colour, linestyle="--", linewidth=0.8)
    ranks = sorted({k for report in reports for k in report.ranks})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("rank k of the approximation")
    ax.set_ylabel("IoU of the magnitude masks of W and of its rank-k approximation")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if 0 < len(reports) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best", title="dashed: random mask", title_fontsize=7)
    figure.suptitle(title, fontsize=10)
    return figure


def masked_agreement_figure(title: str, rows: Sequence[StepAgreement]) -> Figure:
    """Top-10 agreement score between a dense and a masked run, per layer, against step.

    Parameters
    ----------
    title
        The two runs.
    rows
        As :func:`spectrum_cli.masks.agreement_over_training` gives them.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    layers = list(dict.fromkeys(row.layer for row in rows))
    figure = Figure(figsize=(8, 5), dpi=_DPI, layout="constrained")
    ax = figure.subplots()
    colours = colormaps["viridis"](np.linspace(0, 0.9, len(layers)))
    for layer, colour in zip(layers, colours, strict=True):
        steps = [row.step for row in rows if row.layer == layer]
        scores = [row.agreement for row in rows if row.layer == layer]
        ax.plot(steps, scores, marker=".", color=colour, label=layer, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("top-10 agreement score, dense against masked")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(layers) <= MAX_LEGEND:
        ax.legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    return figure


# ---------------------------------------------------------------------------- linear mode connectivity


def interpolation_figure(
    title: str,
    alphas: Sequence[float],
    curves: dict[str, Sequence[float]],
    barriers: dict[str, tuple[float, float | None]],
    agreements: Sequence[tuple[str, float | None, float | None]] = (),
) -> Figure:
    """Loss and error along the interpolation between two checkpoints, and layer agreement.

    One panel per quantity: f(θ(α)) against α, the straight line between the end points
    (dashed), and the barrier drawn at the α where it peaks. A last panel, when ``agreements``
    are given, shows each layer's top-10 agreement score of A's and B's singular vectors.

    Parameters
    ----------
    title
        The two checkpoints and the split.
    alphas
        The grid, from 0 to 1.
    curves
        Quantity name (``"loss"``, ``"error"``) → its value at each α.
    barriers
        Quantity name → (barrier, α of the peak), the paper's form; α None for no barrier.
    agreements
        (layer, agreement score, score after alignment or None), in tensor order.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    panels = len(curves) + (1 if agreements else 0)
    figure = Figure(figsize=(4.2 * panels, 4), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, panels))
    grid = np.asarray(alphas, dtype=np.float64)

    # Each quantity against α, with the straight line and the barrier.
    for ax, (name, curve) in zip(axes, curves.items(), strict=False):
        f = np.asarray(curve, dtype=np.float64)
        line = f[0] + grid * (f[-1] - f[0])
        ax.plot(grid, f, marker="o", markersize=3, color="tab:blue", label=name)
        ax.plot(grid, line, linestyle="--", color="0.5", linewidth=1, label="straight line")
        height, at = barriers[name]
        if at is not None:
            base = f[0] + at * (f[-1] - f[0])
            ax.vlines(at, base, base + height, color="tab:red", linewidth=2)
            ax.annotate(
                f"barrier {height:.3g}\nat α = {at:.2f}",
                (at, base + height),
                textcoords="offset points",
                xytext=(6, -4),
                verticalalignment="top",
                fontsize=8,
                color="tab:red",
            )
        ax.set_xlabel("α   (θ = (1−α) θ_A + α θ_B)")
        ax.set_ylabel(name)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")

    # Per-layer agreement of the top singular vectors, before and after alignment.
    if agreements:
        ax = axes[-1]
        names = [layer for layer, _, _ in agreements]
        rows = np.arange(len(names))
        plain = [np.nan if score is None else score for _, score, _ in agreements]
        aligned = [np.nan if score is None else score for _, _, score in agreements]
        has_aligned = not all(np.isnan(aligned))
        height = 0.4 if has_aligned else 0.7
        bars = [ax.barh(rows, plain, height=height, color="tab:blue", label="as saved")]
        if has_aligned:
            bars.append(
                ax.barh(rows + height, aligned, height=height, color="tab:orange", label="aligned")
            )
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        for container in bars:
            ax.bar_label(container, fmt="%.2f", padding=2, fontsize=7)
        ax.set_yticks(rows + (height / 2 if has_aligned else 0), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)  # room for the labels
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel("top-10 agreement score, A against B")
        ax.grid(alpha=0.3, axis="x")
    figure.suptitle(title, fontsize=10)
    return figure
