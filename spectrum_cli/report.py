"""One self-contained HTML page for a whole store: figures, summary tables, provenance.

For every run: effective rank (with the training log beside it when one is found),
singular-vector agreement with the final step, and the alignment of consecutive layers; then
the tables behind them and what was analysed and how (store, runs, layers, steps, top k,
versions). Figures are embedded as base64 PNG and the style sheet is inline, so the page is
one file that reads offline; it holds no scripts. Each figure is also written as a PNG file
beside the page, for use elsewhere.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectrum_cli import __version__
from spectrum_cli.errors import UsageError
from spectrum_cli.store import FORMAT

log = logging.getLogger(__name__)

#: The page written into the output folder.
PAGE = "index.html"
#: The folder, inside the output folder, that holds each figure as a PNG file.
FIGURES = "figures"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1300px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
td.trend { font-family: monospace; letter-spacing: -1px; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.note { color: #555; } code { background: #f3f3f3; padding: 0 3px; }
"""


@dataclass
class RunSection:
    """What the page shows of one run, and the figure files written for it."""

    run: str
    anchor: str
    layers: int
    steps: list[int]
    training_log: str | None = None
    figures: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """What :func:`write_report` wrote: the page, and per run its section and figures."""

    page: str
    store: str
    runs: list[RunSection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(
    store_path: Path,
    out_dir: Path,
    metrics: Path | None = None,
    runs: Sequence[str] | None = None,
    layers: str | None = None,
    on_found: Callable[[int], None] | None = None,
    on_done: Callable[[str], None] | None = None,
) -> Report:
    """Write ``index.html`` for a store, and each figure as a PNG file, into ``out_dir``.

    Parameters
    ----------
    store_path
        The spectra store.
    out_dir
        The folder to write into; created if missing, and checked before any work is done.
    metrics
        A training log to use for every run; by default each run's own ``metrics.csv`` when
        one is found beside its checkpoints.
    runs, layers
        Only these runs, and only layers whose name the expression is found in (see
        `dynamics.select`); by default every run and layer.
    on_found, on_done
        Progress callbacks: the number of runs, then each run once its section is done.

    Returns
    -------
    Report
        The page, the figures of every run (``FIGURES/<run>-<figure>.png``), and notes such
        as a run whose training log was not found.

    Raises
    ------
    StoreError
        When the store cannot be read.
    UsageError
        When ``out_dir`` is a file or cannot be written, or the selection chooses nothing.
    """
    from spectrum_cli import dynamics, plots
    from spectrum_cli.store import Store

    store = Store.open(store_path)
    selection = dynamics.select(store, runs, layers)
    if metrics is not None:
        dynamics.read_training_metrics(metrics)  # a log that cannot be read stops before writing
    out_dir = plots.writable_folder(Path(out_dir))
    figures_dir = plots.writable_folder(out_dir / FIGURES)
    report = Report(page=str(out_dir / PAGE), store=str(store.path))
    if on_found:
        on_found(len(selection))

    body = []
    for chosen in selection:
        log.info("report: run %s", chosen.run)
        one = [chosen]
        ranks = dynamics.rank_series(store, one)
        stable = dynamics.stability_series(store, one, "final")
        aligned = dynamics.alignment_series(store, one)
        training = dynamics.training_metrics(store, chosen.run, metrics)
        entry = RunSection(
            run=chosen.run,
            anchor=f"run-{plots.run_slug(chosen.run)}",
            layers=len(chosen.layers),
            steps=store.done_steps(chosen.run),
        )
        if training is not None:
            entry.training_log = str(metrics or dynamics.find_metrics_file(store, chosen.run))
        elif metrics is None:
            report.notes.append(dynamics.missing_log_note(store, chosen.run))

        section = [f"<h2 id='{entry.anchor}'>Run {_e(chosen.run)}</h2>"]
        section.append("<h3>Effective rank</h3>")
        if ranks:
            figure = plots.rank_figure(chosen.run, ranks, training)
            section.append(_figure(figures_dir, entry, "rank", figure))
            section.append(_rank_table(ranks))
        else:
            section.append("<p class='note'>No layer of this run has a stored step.</p>")

        section.append("<h3>Singular-vector agreement with the final step</h3>")
        if stable:
            figure = plots.stability_figure(chosen.run, stable, "final")
            section.append(_figure(figures_dir, entry, "stability", figure))
            section.append(_stability_table(stable))
        else:
            section.append("<p class='note'>No stored singular vectors.</p>")

        section.append("<h3>Alignment of consecutive layers</h3>")
        if aligned:
            figure = plots.alignment_figure(chosen.run, aligned)
            section.append(_figure(figures_dir, entry, "alignment", figure))
            section.append(_alignment_table(aligned))
        else:
            section.append("<p class='note'>No consecutive layers connect by size in this run.</p>")
        body.append("\n".join(section))
        report.runs.append(entry)
        if on_done:
            on_done(chosen.run)

    title = f"spectrum report: {store.path}"
    page = (
        "<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n"
        + _provenance(store, selection, report.runs)
        + "\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    _write(out_dir / PAGE, page.encode("utf-8"))
    return report


def _figure(folder: Path, entry: RunSection, kind: str, figure: Any) -> str:
    """A figure as an image embedded in the page, also written as ``<run>-<kind>.png``."""
    from spectrum_cli.plots import png_bytes, run_slug

    png = png_bytes(figure)
    path = folder / f"{run_slug(entry.run)}-{kind}.png"
    _write(path, png)
    entry.figures[kind] = str(path)
    return _image(png, f"{kind} of run {entry.run}")


def _write(path: Path, data: bytes) -> None:
    """Write a file of the report; UsageError naming it when that fails."""
    try:
        path.write_bytes(data)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None


# ---------------------------------------------------------------------------- sections


def _provenance(store: Any, selection: Sequence[Any], sections: Sequence[RunSection]) -> str:
    """What was analysed and how: the store, its runs, layers and steps, and the definitions."""
    from spectrum_cli import dynamics

    written_by = store.version
    runs = []
    for entry in sections:
        folders = dynamics.checkpoint_folders(store, entry.run)
        runs.append(
            (
                f"<a href='#{entry.anchor}'>{_e(entry.run)}</a>",
                str(entry.layers),
                _e(_span(entry.steps)),
                _e(str(folders[0])) if folders else "",
                _e(entry.training_log) if entry.training_log else "none found",
            )
        )
    layers = []
    for chosen in selection:
        for layer in chosen.layers:
            attrs = store.layer_attrs(chosen.run, layer)
            layers.append(
                (
                    _e(chosen.run),
                    _e(layer),
                    _e("×".join(map(str, attrs["tensor_shape"]))),
                    _e("×".join(map(str, attrs["matrix_shape"]))),
                    _e(attrs.get("dtype", "")),
                    _e(attrs.get("formed", "")),
                    _e(", ".join(sorted(attrs.get("failures", {}), key=int)) or "none"),
                )
            )
    return "\n".join(
        [
            "<h2>What was analysed</h2>",
            "<table>",
            *(
                f"<tr><th class='name'>{_e(key)}</th><td class='name'>{_e(value)}</td></tr>"
                for key, value in (
                    ("store", str(Path(store.path).resolve())),
                    ("store format", str(FORMAT)),
                    ("singular vectors kept (top k)", str(store.top_k)),
                    ("store written by", f"spectrum {written_by}"),
                    ("report written by", f"spectrum {__version__}"),
                )
            ),
            "</table>",
            "<h3>Runs</h3>",
            _table(
                ("run", "layers", "steps", "checkpoints from", "training log"),
                runs,
                names=(0, 3, 4),
            ),
            "<h3>Layers</h3>",
            _table(
                ("run", "layer", "tensor", "matrix m×n", "dtype", "formed", "failed steps"),
                layers,
                names=(0, 1, 4, 5),
            ),
            "<h3>How</h3>",
            "<p>Every weight matrix of every checkpoint was decomposed once by "
            "<code>spectrum analyze</code>; all singular values σ and the top k singular "
            "vectors are kept in the store. Definitions follow Yunis et al., <i>Approaching "
            "Deep Learning through the Spectral Dynamics of Weights</i> (arXiv 2408.11804).</p>",
            "<ul>",
            "<li><b>Effective rank</b> (Roy &amp; Vetterli): p<sub>i</sub> = σ<sub>i</sub> / "
            "Σσ<sub>j</sub>, erank = exp(−Σ p<sub>i</sub> ln p<sub>i</sub>); shown divided by "
            "min(m, n).</li>",
            "<li><b>Agreement</b>: S<sub>ij</sub>(t) = |(u<sub>i</sub>(t)·u<sub>j</sub>(T)) "
            "(v<sub>i</sub>(t)·v<sub>j</sub>(T))| with T the final step; the score is the mean "
            "of S<sub>ii</sub> over the first 10 indices. A layer's top directions count as "
            f"settled from the first step after which the score stays ≥ {dynamics.SETTLED} "
            "(<i>end</i>: only at the final step, which scores 1 by definition).</li>",
            "<li><b>Alignment</b>: A<sub>jk</sub> = |u<sub>j</sub>(W<sub>ℓ</sub>) · "
            "v<sub>k</sub>(W<sub>ℓ+1</sub>)| for consecutive matrices whose sizes connect; "
            "for a convolution after a convolution, the later kernel's right vectors are cut to "
            "the centre kernel position, without rescaling. Score as above.</li>",
            "</ul>",
        ]
    )


def _rank_table(series: Sequence[Any]) -> str:
    from spectrum_cli.dynamics import sparkline

    rows = []
    for one in series:
        erank = one.metrics["effective_rank"]
        rows.append(
            (
                _e(one.layer),
                f"{one.shape[0]}×{one.shape[1]}",
                _e(_span(one.steps)),
                f"{erank[0]:.1f}",
                f"{erank[-1]:.1f}",
                f"{erank.min():.1f}",
                f"{one.metrics['normalized_effective_rank'][-1]:.3f}",
                f"{one.metrics['stable_rank'][-1]:.2f}",
                f"{one.metrics['spectral_norm'][-1]:.3g}",
                _trend(sparkline(erank)),
            )
        )
    headers = (
        "layer",
        "m×n",
        "steps",
        "erank first",
        "last",
        "min",
        "last / min(m,n)",
        "stable rank last",
        "σ₁ last",
        "trend",
    )
    return _table(headers, rows, names=(0,))


def _stability_table(series: Sequence[Any]) -> str:
    from spectrum_cli.dynamics import SETTLED, sparkline

    rows = []
    for one in series:
        rows.append(
            (
                _e(one.layer),
                _e(_span(one.steps)),
                f"{one.score[0]:.3f}",
                f"{one.score.min():.3f}",
                _e(one.settled_label()),
                _trend(sparkline(one.score)),
            )
        )
    headers = ("layer", "steps", "score first", "min", f"≥ {SETTLED} from step", "trend")
    return _table(headers, rows, names=(0,))


def _alignment_table(series: Sequence[Any]) -> str:
    from spectrum_cli.dynamics import sparkline

    rows = [
        (
            _e(one.layer),
            _e(one.extra["next_layer"]),
            _e(one.extra["connection"]),
            _e(_span(one.steps)),
            f"{one.score[0]:.3f}",
            f"{one.score[-1]:.3f}",
            f"{one.score.max():.3f}",
            _trend(sparkline(one.score)),
        )
        for one in series
    ]
    headers = ("layer", "next layer", "connection", "steps", "first", "last", "max", "trend")
    return _table(headers, rows, names=(0, 1, 2))


# ---------------------------------------------------------------------------- HTML pieces


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], names: Sequence[int]) -> str:
    """An HTML table; the columns numbered in ``names`` hold text and align left."""
    lines = ["<table>", _row("th", [_e(h) for h in headers], names)]
    lines += [_row("td", row, names) for row in rows]
    lines.append("</table>")
    return "\n".join(lines)


def _row(cell: str, values: Sequence[str], names: Sequence[int]) -> str:
    cells = []
    for i, value in enumerate(values):
        kind = " class='name'" if i in names else ""
        if value.startswith("<td class='trend'>"):
            cells.append(value)
        else:
            cells.append(f"<{cell}{kind}>{value}</{cell}>")
    return "<tr>" + "".join(cells) + "</tr>"


def _trend(line: str) -> str:
    return f"<td class='trend'>{_e(line)}</td>"


def _span(steps: Sequence[int] | np.ndarray) -> str:
    return f"{int(steps[0])}..{int(steps[-1])} ({len(steps)})" if len(steps) else "none"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)
