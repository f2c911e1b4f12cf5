"""The spectra store (format 1): every Zarr path and attribute spectrum reads or writes.

A Zarr v3 directory that other tools can read without spectrum::

    spectrum.zarr/                 attrs: spectrum_format = 1, spectrum_version, top_k, runs
      <run>/                       one group per run (its path under the analysed root)
        <layer>/                   one group per matrix; the normalised state-dict key
          step    int64   [T]          training step of each row
          sigma   float32 [T, r]       all singular values, descending, r = min(m, n)
          u       float32 [T, m, k]    top-k left singular vectors (columns)
          v       float32 [T, n, k]    top-k right singular vectors (columns)
          status  uint8   [T]          0 not computed, 1 done, 2 failed (reason in attrs)
        attrs: tensor_shape, matrix_shape, dtype, formed, failures {step: reason}
      attrs: steps (row order), layers (tensor order), checkpoints {step: source}

Rows are allocated per run, so every layer of a run shares one row per step. Rows are in the
order the steps were added (sorted within one ``analyze``); readers sort by step. A checkpoint
counts as done only once its ``checkpoints`` entry is written, after all its rows: a run killed
part-way leaves rows that the next ``analyze`` overwrites. Zarr's local store replaces each
file atomically, and one writer at a time holds the lock file beside the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spectrum_cli import __version__
from spectrum_cli.errors import StoreError

log = logging.getLogger(__name__)

FORMAT = 1
NOT_COMPUTED, DONE, FAILED = 0, 1, 2

# Arrays of a layer group: dtype and dimension names.
ARRAYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "step": ("int64", ("step",)),
    "sigma": ("float32", ("step", "index")),
    "u": ("float32", ("step", "row", "k")),
    "v": ("float32", ("step", "col", "k")),
    "status": ("uint8", ("step",)),
}
_ROWS_PER_CHUNK = {"step": 1024, "status": 1024, "sigma": 64, "u": 1, "v": 1}


@dataclass(frozen=True)
class LayerResult:
    """One layer's outcome at one step, as the decomposition engine hands it to the store."""

    layer: str
    tensor_shape: tuple[int, ...]
    matrix_shape: tuple[int, int]
    dtype: str
    formed: str
    sigma: np.ndarray | None = None
    u: np.ndarray | None = None
    v: np.ndarray | None = None
    failure: str | None = None


@dataclass(frozen=True)
class LayerRows:
    """The done rows of one layer, sorted by step."""

    steps: np.ndarray
    sigma: np.ndarray | None = None
    u: np.ndarray | None = None
    v: np.ndarray | None = None


def lock_path(path: Path) -> Path:
    """The lock file that one writer holds: beside the store, not inside it."""
    return path.with_name(path.name + ".lock")


class Store:
    """A spectra store opened for reading, or for writing under its lock."""

    def __init__(self, path: Path, root: Any, writable: bool) -> None:
        self.path = path
        self._root = root
        self._writable = writable

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path | str) -> Store:
        """Open an existing store for reading; StoreError if it is missing or not format 1."""
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            hint = "run `spectrum analyze CHECKPOINTS --store PATH` first"
            what = "is not a Zarr store" if path.exists() else "does not exist"
            raise StoreError(f"{path} {what}; {hint}")
        root = zarr.open_group(path, mode="r")
        _check_format(path, dict(root.attrs))
        return cls(path, root, writable=False)

    @classmethod
    @contextmanager
    def writing(cls, path: Path | str, top_k: int) -> Iterator[Store]:
        """Open or create a store for writing, holding its lock for the duration.

        Raises StoreError when another process holds the lock, when ``path`` is a folder that
        is not a spectra store, or when the store keeps another number of singular vectors.
        """
        import zarr
        from filelock import FileLock, Timeout

        path = Path(path)
        lock = FileLock(str(lock_path(path)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(
                f"{path} is being written by another spectrum process (lock {lock_path(path)}); "
                "wait for it to finish or pass another --store"
            ) from None
        try:
            if (path / "zarr.json").is_file():
                root = zarr.open_group(path, mode="r+")
                attrs = dict(root.attrs)
                _check_format(path, attrs)
                if attrs["top_k"] != top_k:
                    raise StoreError(
                        f"{path} keeps the top {attrs['top_k']} singular vectors, not {top_k}; "
                        f"pass --top-k {attrs['top_k']} or another --store"
                    )
            elif path.exists() and any(path.iterdir()):
                raise StoreError(
                    f"{path} exists and is not a spectra store; pass another --store or remove it"
                )
            else:
                root = zarr.open_group(path, mode="w")
                root.attrs.update(
                    {
                        "spectrum_format": FORMAT,
                        "spectrum_version": __version__,
                        "top_k": top_k,
                        "runs": [],
                    }
                )
            yield cls(path, root, writable=True)
        finally:
            lock.release()

    # ------------------------------------------------------------------ reading

    @property
    def top_k(self) -> int:
        return int(self._root.attrs["top_k"])

    def runs(self) -> list[str]:
        """The runs in the store, in the order they were added."""
        return list(self._root.attrs.get("runs", []))

    def _run_group(self, run: str) -> Any:
        if run not in self.runs():
            known = ", ".join(self.runs()) or "none"
            raise StoreError(f"no run {run!r} in {self.path} (runs: {known})")
        return self._root[run]

    def _run_attrs(self, run: str) -> dict[str, Any]:
        return dict(self._run_group(run).attrs)

    def layers(self, run: str) -> list[str]:
        """The run's layers in the checkpoint's own tensor order."""
        return list(self._run_attrs(run).get("layers", []))

    def done_steps(self, run: str) -> list[int]:
        """The steps whose checkpoints are fully stored, ascending."""
        return sorted(int(s) for s in self._run_attrs(run).get("checkpoints", {}))

    def checkpoints(self, run: str) -> dict[int, dict[str, Any]]:
        """Where each done step came from: ``{step: {"path": ..., "bytes": ...}}``."""
        return {int(s): info for s, info in self._run_attrs(run).get("checkpoints", {}).items()}

    def layer_attrs(self, run: str, layer: str) -> dict[str, Any]:
        """Tensor shape, matrix shape, stored dtype, how it was formed, failures by step."""
        return dict(self._layer_group(run, layer).attrs)

    def _layer_group(self, run: str, layer: str) -> Any:
        group = self._run_group(run)
        if layer not in self.layers(run):
            raise StoreError(f"no layer {layer!r} in run {run!r} of {self.path}")
        return group[layer]

    def status(self, run: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, status) of every allocated row, sorted by step."""
        group = self._layer_group(run, layer)
        steps, status = group["step"][:], group["status"][:]
        order = np.argsort(steps, kind="stable")
        return steps[order], status[order]

    def read(self, run: str, layer: str, fields: tuple[str, ...] = ("sigma",)) -> LayerRows:
        """Read the done rows of one layer, sorted by step; only the named arrays are read.

        Parameters
        ----------
        fields
            Any of ``"sigma"``, ``"u"``, ``"v"``.
        """
        group = self._layer_group(run, layer)
        steps, status = group["step"][:], group["status"][:]
        rows = np.flatnonzero(status == DONE)
        rows = rows[np.argsort(steps[rows], kind="stable")]
        out: dict[str, np.ndarray] = {}
        for field in fields:
            array = group[field]
            # Contiguous row ranges read as slices; a scattered few as a list.
            if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)):
                out[field] = array[int(rows[0]) : int(rows[-1]) + 1]
            else:
                out[field] = array.oindex[rows] if len(rows) else np.empty((0, *array.shape[1:]))
        return LayerRows(steps=steps[rows], **out)

    # ------------------------------------------------------------------ writing

    def add_steps(self, run: str, steps: list[int]) -> None:
        """Allocate rows for new steps of a run (creating the run if it is new)."""
        self._require_writable()
        if run not in self.runs():
            self._root.require_group(run).attrs.update(
                {"spectrum_node": "run", "steps": [], "layers": [], "checkpoints": {}}
            )
            self._root.attrs["runs"] = [*self.runs(), run]
        group = self._root[run]
        known = list(group.attrs.get("steps", []))
        new = [s for s in sorted(set(steps)) if s not in set(known)]
        if new:
            group.attrs["steps"] = known + new
            for layer in self.layers(run):
                self._ensure_rows(group[layer], known + new)

    def write_checkpoint(
        self, run: str, step: int, results: list[LayerResult], source: dict[str, Any]
    ) -> None:
        """Write one checkpoint's rows for every layer, then mark the step done."""
        self._require_writable()
        group = self._root[run]
        steps = list(group.attrs["steps"])
        row = steps.index(step)
        for result in results:
            self._write_row(group, steps, row, step, result)
        checkpoints = dict(group.attrs.get("checkpoints", {}))
        checkpoints[str(step)] = source
        group.attrs["checkpoints"] = checkpoints

    def _write_row(
        self, group: Any, steps: list[int], row: int, step: int, result: LayerResult
    ) -> None:
        layer = self._require_layer(group, steps, result)
        stored = tuple(layer.attrs["matrix_shape"])
        failures = dict(layer.attrs.get("failures", {}))
        failure = result.failure
        if failure is None and tuple(result.matrix_shape) != stored:
            failure = (
                f"matrix shape {tuple(result.matrix_shape)} differs from the "
                f"{stored} stored for earlier steps"
            )
        if failure is None:
            layer["sigma"][row] = result.sigma
            layer["u"][row] = result.u
            layer["v"][row] = result.v
            layer["status"][row] = DONE
            if failures.pop(str(step), None) is not None:
                layer.attrs["failures"] = failures
        else:
            layer["status"][row] = FAILED
            failures[str(step)] = failure
            layer.attrs["failures"] = failures

    def _require_layer(self, group: Any, steps: list[int], result: LayerResult) -> Any:
        """The layer group, created with rows for every allocated step on first sight."""
        layers = list(group.attrs.get("layers", []))
        if result.layer in layers:
            layer = group[result.layer]
            self._ensure_rows(layer, steps)
            return layer

        # Create anew: a group not yet listed is a leftover of an interrupted run.
        layer = group.create_group(result.layer, overwrite=True)
        layer.attrs.update(
            {
                "tensor_shape": list(result.tensor_shape),
                "matrix_shape": list(result.matrix_shape),
                "dtype": result.dtype,
                "formed": result.formed,
                "failures": {},
            }
        )
        m, n = result.matrix_shape
        k = min(self.top_k, m, n)
        tails = {"step": (), "sigma": (min(m, n),), "u": (m, k), "v": (n, k), "status": ()}
        for name, (dtype, dims) in ARRAYS.items():
            shape = (len(steps), *tails[name])
            layer.create_array(
                name,
                shape=shape,
                chunks=(_ROWS_PER_CHUNK[name], *tails[name]),
                dtype=dtype,
                fill_value=0,
                dimension_names=dims,
            )
        if steps:
            layer["step"][:] = np.asarray(steps, dtype=np.int64)
        group.attrs["layers"] = [*layers, result.layer]
        return layer

    @staticmethod
    def _ensure_rows(layer: Any, steps: list[int]) -> None:
        """Grow a layer's arrays to one row per allocated step, filling the new steps."""
        have = layer["step"].shape[0]
        if have >= len(steps):
            return
        for name in ARRAYS:
            array = layer[name]
            array.resize((len(steps), *array.shape[1:]))
        layer["step"][have:] = np.asarray(steps[have:], dtype=np.int64)

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path} was opened for reading")


def _check_format(path: Path, attrs: dict[str, Any]) -> None:
    found = attrs.get("spectrum_format")
    if found is None:
        raise StoreError(
            f"{path} is a Zarr store but not a spectra store (no spectrum_format attribute); "
            "pass the store that `spectrum analyze` wrote"
        )
    if found != FORMAT:
        raise StoreError(
            f"{path} is a spectra store of format {found}; this spectrum reads format {FORMAT}. "
            "Re-run `spectrum analyze` into a new --store"
        )
