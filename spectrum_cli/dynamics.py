"""Spectral dynamics from a store: per run, layer and step, the metrics the paper follows.

This is the one place that turns a store and a selection of runs and layers into results:

- :func:`rank_series`: effective rank and norms over training (reads singular values only);
- :func:`stability_series`: agreement of each step's top singular vectors with the final
  (or the previous) step's;
- :func:`alignment_series`: alignment of consecutive layers' singular vectors at each step.

Each returns one *series* per (run, layer), holding arrays over steps, for figures and
summaries; :func:`rows` flattens series into one row per (run, layer, step) for CSV and JSON.
The mathematics lives in :mod:`spectrum_cli.metrics`; here we only read and arrange.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spectrum_cli.errors import StoreError, UsageError
from spectrum_cli.metrics.agreement import SCORE_INDICES, agreement_diagonal, diagonal_score
from spectrum_cli.metrics.alignment import (
    DENSE,
    alignment_diagonal,
    connected_pairs,
    connection,
    kernel_centre_vectors,
)
from spectrum_cli.metrics.rank import rank_summary
from spectrum_cli.store import Store

log = logging.getLogger(__name__)

#: The agreement or alignment score above which a direction counts as settled.
SETTLED = 0.9

#: The name of the training log a run may keep beside its checkpoints.
METRICS_FILE = "metrics.csv"


# ---------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """One run and the layers chosen from it, in the checkpoint's tensor order."""

    run: str
    layers: list[str]


def select(
    store: Store, runs: Sequence[str] | None = None, layers: str | None = None
) -> list[Selection]:
    """Choose runs and layers from a store.

    Parameters
    ----------
    store
        The open store.
    runs
        Run names; by default every run in the store.
    layers
        A regular expression searched in each layer name; by default every layer.

    Returns
    -------
    list of Selection
        Runs in the store's order that have at least one chosen layer.

    Raises
    ------
    UsageError
        For a run the store does not hold, an invalid expression, or one that matches no layer.
    StoreError
        When the store holds no run, or no layer of the chosen runs.
    """
    known = store.runs()
    if not known:
        raise StoreError(f"{store.path} holds no runs yet; run `spectrum analyze` into it first")
    for run in runs or []:
        if run not in known:
            raise UsageError(
                f"no run {run!r} in {store.path}; runs: {', '.join(known)}",
            )
    try:
        pattern = re.compile(layers) if layers else None
    except re.error as error:
        raise UsageError(f"--layers {layers!r} is not a regular expression: {error}") from None

    chosen = []
    for run in [r for r in known if not runs or r in runs]:
        names = [name for name in store.layers(run) if pattern is None or pattern.search(name)]
        if names:
            chosen.append(Selection(run, names))
    if not chosen:
        where = ", ".join(runs) if runs else "any run"
        if pattern is None:
            raise StoreError(
                f"no layer of {where} in {store.path} is stored yet (its checkpoints failed or "
                "were not analysed); `spectrum analyze` the runs into it again"
            )
        raise UsageError(
            f"--layers {layers!r} matches no layer of {where} in {store.path}; "
            "`spectrum ls` lists the layers"
        )
    return chosen


# ---------------------------------------------------------------------------- rank


@dataclass
class RankSeries:
    """One layer's effective rank and norms over the steps of one run."""

    run: str
    layer: str
    shape: tuple[int, int]
    steps: np.ndarray
    metrics: dict[str, np.ndarray]

    def rows(self) -> list[dict[str, Any]]:
        """One row per step: run, layer, step, m, n and every metric."""
        m, n = self.shape
        return [
            {
                "run": self.run,
                "layer": self.layer,
                "step": int(step),
                "m": m,
                "n": n,
                **{name: float(values[i]) for name, values in self.metrics.items()},
            }
            for i, step in enumerate(self.steps)
        ]


def rank_series(store: Store, selection: Sequence[Selection]) -> list[RankSeries]:
    """Effective rank, normalised effective rank, stable rank and norms, from σ alone.

    Parameters
    ----------
    store
        The open store.
    selection
        Runs and layers, as :func:`select` returns them.

    Returns
    -------
    list of RankSeries
        One per run and layer with at least one done step, in selection order.
    """
    out = []
    for chosen in selection:
        for layer in chosen.layers:
            stored = store.read(chosen.run, layer, ("sigma",))
            if not len(stored.steps):
                continue
            assert stored.sigma is not None
            shape = _matrix_shape(store, chosen.run, layer)
            out.append(
                RankSeries(chosen.run, layer, shape, stored.steps, rank_summary(stored.sigma))
            )
    return out


# ---------------------------------------------------------------------------- stability


@dataclass
class DiagonalSeries:
    """A diagonal of agreement or alignment per step, with its score.

    ``diagonal`` is ``(steps, N)``: entry i of row t compares direction i at step t.
    """

    run: str
    layer: str
    steps: np.ndarray
    diagonal: np.ndarray
    score: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)
    per_step: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per step: run, layer, extras, step, per-step extras, score and diagonal."""
        return [
            {
                "run": self.run,
                "layer": self.layer,
                **self.extra,
                "step": int(step),
                **{name: _plain(values[i]) for name, values in self.per_step.items()},
                "score": float(self.score[i]),
                "diagonal": [float(x) for x in self.diagonal[i]],
            }
            for i, step in enumerate(self.steps)
        ]

    def settled_step(self, threshold: float = SETTLED) -> int | None:
        """The first step from which the score stays at or above ``threshold``, if any."""
        below = np.flatnonzero(self.score < threshold)
        start = 0 if not len(below) else int(below[-1]) + 1
        return int(self.steps[start]) if start < len(self.steps) else None

    def settled_label(self, threshold: float = SETTLED) -> str:
        """:meth:`settled_step` in words: the step, ``never``, or ``end`` when against the final
        step only the final step itself (which always scores 1) reaches ``threshold``."""
        step = self.settled_step(threshold)
        if step is None:
            return "never"
        final = self.extra.get("reference") == "final"
        if final and len(self.steps) > 1 and step == int(self.steps[-1]):
            return "end"
        return str(step)


def stability_series(
    store: Store,
    selection: Sequence[Selection],
    reference: str = "final",
    top: int | None = None,
) -> list[DiagonalSeries]:
    """Agreement S_ii(t) of each step's singular vectors with a reference step's.

    Parameters
    ----------
    store
        The open store.
    selection
        Runs and layers, as :func:`select` returns them.
    reference
        ``"final"``: compare every step with the layer's last done step (which scores 1).
        ``"previous"``: compare each step with the one before it (the first step has none and
        gives no row).
    top
        How many diagonal entries to keep; by default every stored vector. The score is
        always the mean of the first min(10, k).

    Returns
    -------
    list of DiagonalSeries
        One per run and layer, with ``reference_step`` per step.
    """
    if reference not in ("final", "previous"):
        raise UsageError(f"--reference must be final or previous, got {reference!r}")
    out = []
    for chosen in selection:
        for layer in chosen.layers:
            stored = store.read(chosen.run, layer, ("u", "v"))
            steps, u, v = stored.steps, stored.u, stored.v
            if not len(steps) or (reference == "previous" and len(steps) < 2):
                continue
            assert u is not None and v is not None

            # Pair every step with its reference: (T, m, k) against (m, k) or (T-1, m, k).
            if reference == "final":
                u_ref, v_ref, ref_steps = u[-1], v[-1], np.full_like(steps, steps[-1])
            else:
                u_ref, v_ref, ref_steps = u[:-1], v[:-1], steps[:-1]
                steps, u, v = steps[1:], u[1:], v[1:]
            keep = u.shape[-1] if top is None else min(top, u.shape[-1])
            diagonal = agreement_diagonal(u, v, u_ref, v_ref, max(keep, SCORE_INDICES))
            out.append(
                DiagonalSeries(
                    run=chosen.run,
                    layer=layer,
                    steps=steps,
                    diagonal=diagonal[:, :keep],
                    score=diagonal_score(diagonal),
                    extra={"reference": reference},
                    per_step={"reference_step": ref_steps},
                )
            )
    return out


# ---------------------------------------------------------------------------- alignment


@dataclass(frozen=True)
class Pair:
    """Two layers of one run whose sizes connect, and how."""

    layer: str
    next_layer: str
    how: str


def layer_pairs(store: Store, chosen: Selection, named: Sequence[str] | None = None) -> list[Pair]:
    """The pairs of a run to align: named ``A:B`` pairs, or consecutive layers that connect.

    Parameters
    ----------
    store
        The open store.
    chosen
        The run; its layers filter the automatic pairs (a pair is kept when either layer was
        chosen). Named pairs are taken as named.
    named
        Pairs as ``"LAYER_A:LAYER_B"``; by default consecutive layers in tensor order whose
        sizes connect (see :mod:`spectrum_cli.metrics.alignment`).

    Raises
    ------
    UsageError
        For a named pair that does not name two layers of the run, or whose sizes do not
        connect.
    """
    every = store.layers(chosen.run)
    attrs = {name: store.layer_attrs(chosen.run, name) for name in every}
    tensor = {name: a["tensor_shape"] for name, a in attrs.items()}
    matrix = {name: a["matrix_shape"] for name, a in attrs.items()}
    if not named:
        wanted = set(chosen.layers)
        return [
            Pair(a, b, how)
            for a, b, how in connected_pairs(every, tensor, matrix)
            if a in wanted or b in wanted
        ]

    pairs = []
    for text in named:
        a, b = _split_pair(text, every, chosen.run)
        how = connection(tensor[a], matrix[a], tensor[b], matrix[b])
        if how is None:
            raise UsageError(
                f"--pair {text}: {a} gives {matrix[a][0]} outputs but {b} takes "
                f"{matrix[b][1]} inputs (tensor shapes {tuple(tensor[a])} and "
                f"{tuple(tensor[b])}); name two layers whose sizes connect"
            )
        pairs.append(Pair(a, b, how))
    return pairs


def alignment_series(
    store: Store,
    selection: Sequence[Selection],
    pairs: Sequence[str] | None = None,
    top: int | None = None,
) -> list[DiagonalSeries]:
    """Alignment A_jj(t) = |u_j(W_ℓ) · v_j(W_ℓ₊₁)| of paired layers at every shared step.

    Parameters
    ----------
    store
        The open store.
    selection
        Runs and layers, as :func:`select` returns them.
    pairs
        ``"LAYER_A:LAYER_B"`` pairs to align in every selected run; by default consecutive
        layers whose sizes connect.
    top
        How many diagonal entries to keep; by default all that both layers store. The score is
        always the mean of the first min(10, k).

    Returns
    -------
    list of DiagonalSeries
        One per run and pair; ``layer`` is the earlier layer, ``next_layer`` and
        ``connection`` are in ``extra``.
    """
    out = []
    for chosen in selection:
        for pair in layer_pairs(store, chosen, pairs):
            earlier = store.read(chosen.run, pair.layer, ("u",))
            later = store.read(chosen.run, pair.next_layer, ("v",))
            steps, i, j = np.intersect1d(earlier.steps, later.steps, return_indices=True)
            if not len(steps):
                continue
            assert earlier.u is not None and later.v is not None
            u, v = earlier.u[i], later.v[j]  # (T, m, k₁), (T, n, k₂)
            if pair.how != DENSE:
                shape = store.layer_attrs(chosen.run, pair.next_layer)["tensor_shape"]
                v = kernel_centre_vectors(v, shape)  # (T, in, k₂)

            kept = min(u.shape[-1], v.shape[-1])
            keep = kept if top is None else min(top, kept)
            diagonal = alignment_diagonal(u, v, max(keep, SCORE_INDICES))
            out.append(
                DiagonalSeries(
                    run=chosen.run,
                    layer=pair.layer,
                    steps=steps,
                    diagonal=diagonal[:, :keep],
                    score=diagonal_score(diagonal),
                    extra={"next_layer": pair.next_layer, "connection": pair.how},
                )
            )
    return out


def _split_pair(text: str, layers: list[str], run: str) -> tuple[str, str]:
    """Split ``A:B`` at the colon that leaves two layer names of the run."""
    known = set(layers)
    for at in [i for i, char in enumerate(text) if char == ":"]:
        a, b = text[:at], text[at + 1 :]
        if a in known and b in known:
            return a, b
    raise UsageError(
        f"--pair {text!r} does not name two layers of run {run!r} as LAYER_A:LAYER_B; "
        "`spectrum ls` lists the layers"
    )


# ---------------------------------------------------------------------------- rows and summaries


def rows(series: Sequence[RankSeries | DiagonalSeries]) -> list[dict[str, Any]]:
    """Every series as one row per (run, layer, step), in series then step order."""
    return [row for one in series for row in one.rows()]


def flat_rows(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with list values spread over numbered columns (``diagonal`` → ``diagonal_1``…).

    Every row gets the same columns, as CSV needs; a shorter list leaves its last columns
    empty.
    """
    widths: dict[str, int] = {}
    for row in rows_:
        for key, value in row.items():
            if isinstance(value, list):
                widths[key] = max(widths.get(key, 0), len(value))
    flat = []
    for row in rows_:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if key in widths:
                for i in range(widths[key]):
                    out[f"{key}_{i + 1}"] = value[i] if i < len(value) else None
            else:
                out[key] = value
        flat.append(out)
    return flat


def sparkline(values: Sequence[float] | np.ndarray, width: int = 16) -> str:
    """A one-line unicode trend of ``values``, resampled to at most ``width`` characters."""
    bars = "▁▂▃▄▅▆▇█"
    points = np.asarray(values, dtype=np.float64)
    points = points[np.isfinite(points)]
    if not len(points):
        return ""
    if len(points) > width:
        # Average over equal spans of steps so every step counts once.
        points = np.array([span.mean() for span in np.array_split(points, width)])
    low, high = points.min(), points.max()
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return bars[3] * len(points)
    levels = np.rint((points - low) / (high - low) * (len(bars) - 1)).astype(int)
    return "".join(bars[level] for level in levels)


# ---------------------------------------------------------------------------- training metrics


def training_metrics(
    store: Store, run: str, override: Path | None = None
) -> dict[str, np.ndarray] | None:
    """The training log of a run (``metrics.csv``), as columns, when one can be found.

    Parameters
    ----------
    store
        The open store.
    run
        The run.
    override
        A CSV file to use instead of looking for one.

    Returns
    -------
    dict or None
        Column name to float64 values (``step`` among them), or None when there is no log
        (see :func:`find_metrics_file` for where it is looked for), or when the log found
        cannot be read (a warning says why).

    Raises
    ------
    UsageError
        When ``override`` cannot be read or has no ``step`` column.
    """
    if override is not None:
        return read_training_metrics(override)
    path = find_metrics_file(store, run)
    if path is None:
        return None
    try:
        return read_training_metrics(path)
    except UsageError as error:
        log.warning("run %s: %s; no training metrics are drawn", run, error)
        return None


def read_training_metrics(path: Path) -> dict[str, np.ndarray]:
    """Read a training log: a CSV with a ``step`` column and numeric columns beside it.

    Raises
    ------
    UsageError
        When the file cannot be read or has no ``step`` column.
    """
    try:
        with open(path, newline="") as handle:
            records = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        why = getattr(error, "strerror", None) or error
        raise UsageError(f"cannot read training metrics {path}: {why}") from None
    if not records:
        raise UsageError(
            f"{path} has no rows; expected a header such as step,train_loss,... "
            "and one row per logged step"
        )
    if "step" not in records[0]:
        raise UsageError(f"{path} has no step column; expected step,train_loss,... as a header")
    columns: dict[str, np.ndarray] = {}
    for name in records[0]:
        values = [_number(record.get(name)) for record in records]
        if all(np.isnan(values)):
            continue
        columns[name] = np.asarray(values, dtype=np.float64)
    if "step" not in columns:
        raise UsageError(f"{path} has no numbers in its step column")
    order = np.argsort(columns["step"], kind="stable")
    return {name: values[order] for name, values in columns.items()}


def find_metrics_file(store: Store, run: str) -> Path | None:
    """The ``metrics.csv`` beside a run's stored checkpoints, or None.

    It is looked for in each folder of :func:`checkpoint_folders`, in that order.
    """
    for folder in checkpoint_folders(store, run):
        candidate = folder / METRICS_FILE
        if candidate.is_file():
            log.debug("run %s: training metrics from %s", run, candidate)
            return candidate
    return None


def checkpoint_folders(store: Store, run: str) -> list[Path]:
    """The folders that held a run's checkpoints when they were analysed, most likely first.

    First the folder of each checkpoint's ``absolute_path``, as ``analyze`` found it; then
    each recorded relative ``path`` taken from the current directory and from the store's
    folder (a store written without absolute paths, or moved with its runs). A checkpoint
    that is a folder itself (a Hugging Face layout) counts as one file of its run's folder.
    """
    sources = list(store.checkpoints(run).values())
    absolute = [Path(str(s["absolute_path"])) for s in sources if s.get("absolute_path")]
    relative = [Path(str(s["path"])) for s in sources if s.get("path")]
    candidates = [path.parent for path in absolute]
    for base in (Path.cwd(), store.path.resolve().parent):
        candidates += [(base / path).parent for path in relative if path.parts]
    return list(dict.fromkeys(candidates))


def missing_log_note(store: Store, run: str) -> str:
    """One line saying that a run's training log was not found, where it was looked for, and
    how to name one."""
    folders = checkpoint_folders(store, run)
    where = ", ".join(str(folder) for folder in folders[:3])
    more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
    return (
        f"run {run}: no {METRICS_FILE} found (looked in {where or 'no recorded folder'}{more}); "
        "drawing no training metrics. Pass --metrics FILE.csv to name one"
    )


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def _matrix_shape(store: Store, run: str, layer: str) -> tuple[int, int]:
    m, n = store.layer_attrs(run, layer)["matrix_shape"]
    return int(m), int(n)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
