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

A checkpoint's source is where ``analyze`` read it: ``path``, relative to the folder above the
one it was given, ``absolute_path`` and ``bytes``.

Rows are allocated per run, so every layer of a run shares one row per step. Rows are in the
order the steps were added (sorted within one ``analyze``); readers sort by step. Layers are
listed in the checkpoints' tensor order, a layer first seen in a later checkpoint after the
layer it follows there, whatever order the checkpoints are written in. A layer's shapes and
dtype are those of the first checkpoint written with it; a later step whose matrix has another
shape is stored as failed.

Node names: a run's group is its path, a layer's group its name, each path segment as given
except where it could not be one: ``%``, ``/``, ``\\`` and NUL are percent-encoded (a layer
``encoder/kernel`` is the group ``encoder%2Fkernel``), the segments ``""``, ``.``, ``..`` and
``zarr.json`` get the prefix ``%%``, and a segment longer than a file name may be is shortened
and ends in ``%%`` and a hash. The ``runs`` and ``layers`` attributes keep the names as given.

Crash safety: a checkpoint counts as done only once its ``checkpoints`` entry is written, after
all its rows. Readers take a row's status from its array only for done steps and read every
other row as not computed, so a run killed part-way leaves rows that nobody reads and that the
next ``analyze`` overwrites. Every step that changes more than one document is ordered so that
the one which makes it visible comes last (a new layer is listed after its arrays exist), and
every document is written whole: Zarr's local store writes a temporary file and renames it,
and the writer removes the temporary files a killed run left. One writer at a time holds the
lock file beside the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from spectrum_cli import __version__
from spectrum_cli.errors import StoreError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

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
# The temporary name Zarr's local store writes a document under before renaming it.
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
# Characters a path segment cannot hold as they are (Zarr reads a backslash as a separator).
_ESCAPED = re.compile(r"[%/\\\x00]")
# Segments that name something else: the node itself, its parent, its metadata document.
_RESERVED = ("", ".", "..", "zarr.json")
# The longest segment kept whole, in bytes; file systems allow 255.
_LONGEST_SEGMENT = 200
# What reading a damaged metadata document or chunk raises inside Zarr.
_DAMAGED = (ValueError, TypeError, KeyError, AttributeError, OSError, RuntimeError)


def _is_step(key: object) -> bool:
    """Whether a key of a run's ``checkpoints`` names a step, as ``"-3"`` or ``"1200"``."""
    return isinstance(key, str) and key.lstrip("-").isdigit()


def _writes(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn what Zarr raises while writing a run of a damaged store into a StoreError."""

    @functools.wraps(method)
    def writing(self: Store, run: str, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, run, *args, **kwargs)
        except _DAMAGED as error:
            raise StoreError(
                f"cannot write run {run!r} of {self.path}: {_brief(error)}; the store is "
                "damaged: re-run `spectrum analyze` into a new --store"
            ) from error

    return writing


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


@dataclass
class _OpenLayer:
    """A layer group and its arrays as a writer keeps them open between checkpoints."""

    group: Any
    arrays: dict[str, Any]
    labelled: int = 0  # leading rows whose step labels are known to be right


def lock_path(path: Path) -> Path:
    """The lock file that one writer holds: beside the store, not inside it."""
    path = Path(os.path.abspath(path))  # `--store .` has a name too
    return path.with_name(path.name + ".lock")


class Store:
    """A spectra store opened for reading, or for writing under its lock."""

    def __init__(self, path: Path, root: Any, writable: bool) -> None:
        self.path = path
        self._root = root
        self._writable = writable
        # A writer's open groups and layers by path.
        self._groups: dict[str, Any] = {}
        self._open: dict[str, _OpenLayer] = {}
        # A reader's attributes of each run, read once: every layer it reads then agrees on
        # which steps are done, while a writer goes on adding them.
        self._run_snapshots: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path | str) -> Store:
        """Open an existing store for reading; StoreError if it is missing or not format 1."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            if not path.exists():
                raise StoreError(
                    f"{path} does not exist; run `spectrum analyze CHECKPOINTS --store PATH` first"
                )
            raise StoreError(
                f"{path} is {_what_is_there(path)}; pass the store `spectrum analyze` wrote"
            )
        root = _open_root(path, mode="r")
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
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a spectra store; pass another --store")

        # Create the lock file first: filelock reports a file it cannot create as held.
        lock_file = lock_path(path)
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644))
        except OSError as error:
            raise StoreError(
                f"cannot create the lock file {lock_file}: {error.strerror}; "
                "pass a --store in a folder you can write to"
            ) from None
        lock = FileLock(str(lock_file))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise StoreError(
                f"{path} is being written by another spectrum process (lock {lock_file}); "
                "wait for it to finish or pass another --store"
            ) from None
        except OSError as error:
            raise StoreError(
                f"cannot lock {lock_file}: {error.strerror}; "
                "pass a --store in a folder you can write to"
            ) from None
        try:
            if (path / "zarr.json").is_file():
                root = _open_root(path, mode="r+")
                attrs = dict(root.attrs)
                _check_format(path, attrs)
                if attrs["top_k"] != top_k:
                    raise StoreError(
                        f"{path} keeps the top {attrs['top_k']} singular vectors, not {top_k}; "
                        f"pass --top-k {attrs['top_k']} or another --store"
                    )
                _remove_partial_files(path)
            elif path.exists() and any(not _PARTIAL.search(p.name) for p in path.iterdir()):
                raise StoreError(
                    f"{path} is {_what_is_there(path)}; pass another --store or remove it"
                )
            else:
                # One document: a store killed while being created is empty or complete
                # (or holds the temporary file of that document, which mode "w" removes).
                attributes: dict[str, Any] = {
                    "spectrum_format": FORMAT,
                    "spectrum_version": __version__,
                    "top_k": top_k,
                    "runs": [],
                }
                root = zarr.open_group(path, mode="w", attributes=attributes)
            yield cls(path, root, writable=True)
        finally:
            lock.release()

    # ------------------------------------------------------------------ reading

    @property
    def top_k(self) -> int:
        return int(self._root.attrs["top_k"])

    @property
    def version(self) -> str:
        """The spectrum version that created the store."""
        return str(self._root.attrs.get("spectrum_version", "unknown"))

    def runs(self) -> list[str]:
        """The runs in the store, in the order they were added."""
        return list(self._root.attrs.get("runs", []))

    def _run_group(self, run: str) -> Any:
        if run not in self.runs():
            known = ", ".join(self.runs()) or "none"
            raise StoreError(f"no run {run!r} in {self.path} (runs: {known})")
        return self._node(run_path(run))

    def _run_attrs(self, run: str) -> dict[str, Any]:
        """The run's attributes, checked to be of the shapes this module writes.

        A reader takes them once; a writer, whose own changes they follow, every time.
        """
        if run in self._run_snapshots:
            return self._run_snapshots[run]
        attrs = dict(self._run_group(run).attrs)
        steps, layers = attrs.get("steps", []), attrs.get("layers", [])
        checkpoints = attrs.get("checkpoints", {})
        if not (
            isinstance(steps, list)
            and all(type(step) is int for step in steps)
            and isinstance(layers, list)
            and all(isinstance(layer, str) for layer in layers)
            and isinstance(checkpoints, dict)
            and all(_is_step(step) and isinstance(info, dict) for step, info in checkpoints.items())
        ):
            raise StoreError(
                f"cannot read {self.path / run_path(run) / 'zarr.json'}: the steps, layers or "
                f"checkpoints of run {run!r} are not lists and a mapping by step; the store is "
                "damaged: re-run `spectrum analyze` into a new --store"
            )
        if not self._writable:
            self._run_snapshots[run] = attrs
        return attrs

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
        if layer not in self.layers(run):
            raise StoreError(f"no layer {layer!r} in run {run!r} of {self.path}")
        opened = self._open.get(layer_path(run, layer))
        return opened.group if opened is not None else self._node(layer_path(run, layer))

    def _open_layer(self, run: str, layer: str) -> _OpenLayer:
        """A listed layer's group and arrays, opened once per writer."""
        path = layer_path(run, layer)
        if path not in self._open:
            group = self._node(path)
            self._open[path] = _OpenLayer(group, {name: group[name] for name in ARRAYS})
        return self._open[path]

    def _open_layers(self, run: str) -> dict[str, _OpenLayer]:
        """The whole listed layers of a run, their documents read all at once.

        A writer keeps them, as `_open_layer` does. A layer that is not whole here is left out,
        for `_open_layer` to name the damage.
        """
        import zarr

        unopened = [layer for layer in self.layers(run) if layer_path(run, layer) not in self._open]
        members: dict[str, Any] = {}
        if len(unopened) > 1:
            with contextlib.suppress(*_DAMAGED):
                members = dict(self._node(run_path(run)).members(max_depth=1))
        found = {}
        for layer in self.layers(run):
            path, name = layer_path(run, layer), _segment(layer)
            if path in self._open:
                found[layer] = self._open[path]
                continue
            group = members.get(name)
            arrays = {array: members.get(f"{name}/{array}") for array in ARRAYS}
            if not isinstance(group, zarr.Group) or not all(
                isinstance(array, zarr.Array) for array in arrays.values()
            ):
                continue
            found[layer] = _OpenLayer(group, arrays)
            if self._writable:
                self._groups[path], self._open[path] = group, found[layer]
        return found

    def _node(self, path: str) -> Any:
        """The group at a path inside the store; StoreError if its document is damaged.

        A writer, the only one, keeps the groups it opens: its own changes go through them.
        """
        if path in self._groups:
            return self._groups[path]
        try:
            group = self._root[path]
            if self._writable:
                self._groups[path] = group
            return group
        except _DAMAGED as error:
            raise StoreError(
                f"cannot read {self.path / path / 'zarr.json'}: {_brief(error)}; the store is "
                "damaged: re-run `spectrum analyze` into a new --store"
            ) from None

    def status(self, run: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, status) of every allocated row, sorted by step."""
        return _by_step(*self._row_status(run, layer))

    def statuses(self, run: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`status` of every layer of a run, in listed order, the rows read all at once."""
        opened = self._open_layers(run)
        reads = [
            opened[layer].arrays[name].async_array.getitem(slice(None))
            for layer in opened
            for name in ("step", "status")
        ]
        try:
            rows = iter(_concurrently(reads))
        except _DAMAGED:
            rows, opened = iter(()), {}  # read one by one below, which names the damaged array
        done = self.done_steps(run)
        return {
            layer: (
                _by_step(*_marked(next(rows), next(rows), done))
                if layer in opened
                else self.status(run, layer)
            )
            for layer in self.layers(run)
        }

    def _row_status(self, run: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, status) in row order; rows of steps not done read as not computed."""
        group = self._layer_group(run, layer)
        opened = self._open.get(layer_path(run, layer))
        arrays = opened.arrays if opened is not None else group
        with self._reading(run, layer):
            steps, status = arrays["step"][:], arrays["status"][:]
        return _marked(steps, status, self.done_steps(run))

    def read(
        self,
        run: str,
        layer: str,
        fields: tuple[str, ...] = ("sigma",),
        at_steps: Sequence[int] | None = None,
    ) -> LayerRows:
        """Read the done rows of one layer, sorted by step; only the named arrays are read.

        Parameters
        ----------
        fields
            Any of ``"sigma"``, ``"u"``, ``"v"``.
        at_steps
            Read only the done rows of these steps; None reads every done row.
        """
        group = self._layer_group(run, layer)
        steps, status = self._row_status(run, layer)
        wanted = status == DONE
        if at_steps is not None:
            wanted &= np.isin(steps, np.asarray(at_steps, dtype=np.int64))
        rows = np.flatnonzero(wanted)
        rows = rows[np.argsort(steps[rows], kind="stable")]
        out: dict[str, np.ndarray] = {}
        for field in fields:
            with self._reading(run, layer, field):
                array = group[field]
                # Contiguous row ranges read as slices; a scattered few as a list.
                if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)):
                    out[field] = array[int(rows[0]) : int(rows[-1]) + 1]
                elif len(rows):
                    out[field] = array.oindex[rows]
                else:
                    out[field] = np.empty((0, *array.shape[1:]), dtype=array.dtype)
        return LayerRows(steps=steps[rows], **out)

    @contextmanager
    def _reading(self, run: str, layer: str, field: str = "step") -> Iterator[None]:
        """Turn what Zarr raises on a damaged array into a StoreError naming the array."""
        try:
            yield
        except _DAMAGED as error:
            where = self.path / layer_path(run, layer) / field
            raise StoreError(
                f"cannot read {where} (run {run!r}, layer {layer!r}): {_brief(error)}; the store "
                "is damaged: re-run `spectrum analyze` into a new --store"
            ) from None

    # ------------------------------------------------------------------ writing

    @_writes
    def forget(self, run: str, steps: list[int]) -> None:
        """Mark done steps not computed again, so that they are decomposed anew.

        The steps leave the run's ``checkpoints`` first: from then on no reader sees their
        rows, and a run killed part-way leaves them to be computed by the next ``analyze``.
        """
        self._require_writable()
        group = self._node(run_path(run))
        gone = {str(step) for step in steps}
        checkpoints = dict(group.attrs.get("checkpoints", {}))
        if not gone & set(checkpoints):
            return
        group.attrs["checkpoints"] = {s: v for s, v in checkpoints.items() if s not in gone}
        order = list(group.attrs["steps"])
        rows = [order.index(step) for step in steps if step in order]
        _concurrently(
            self._open_layer(run, layer).arrays["status"].async_array.setitem(row, NOT_COMPUTED)
            for layer in self.layers(run)
            for row in rows
        )

    @_writes
    def add_steps(self, run: str, steps: list[int]) -> None:
        """Allocate rows for new steps of a run (creating the run if it is new)."""
        self._require_writable()
        if run not in self.runs():
            taken = self._layer_at(run_path(run))
            if taken is not None:
                raise StoreError(
                    f"run {run!r} would be stored where {self.path} keeps layer {taken[1]!r} of "
                    f"run {taken[0]!r}; rename the folder of run {run!r} or pass another --store"
                )
            self._root.require_group(run_path(run)).attrs.update(
                {"spectrum_node": "run", "steps": [], "layers": [], "checkpoints": {}}
            )
            self._root.attrs["runs"] = [*self.runs(), run]
        group = self._node(run_path(run))
        known = list(group.attrs.get("steps", []))
        new = [s for s in sorted(set(steps)) if s not in set(known)]
        if new:
            group.attrs["steps"] = known + new
        self._open_layers(run)
        _concurrently(
            self._ensure_rows(self._open_layer(run, layer), known + new)
            for layer in self.layers(run)
        )

    @_writes
    def write_checkpoint(
        self, run: str, step: int, results: list[LayerResult], source: dict[str, Any]
    ) -> dict[str, str]:
        """Write one checkpoint's rows for every layer, then mark the step done.

        Returns
        -------
        dict of str to str
            The layers stored as failed at this step, with the reason: those whose result is a
            failure, and those whose matrix shape differs from the one stored earlier.
        """
        self._require_writable()
        group = self._node(run_path(run))
        steps = list(group.attrs["steps"])
        row = steps.index(step)

        # Create the layers seen for the first time, then list them in the checkpoint's order.
        # A layer whose group would be another run's is refused, and nothing of it is stored.
        failures: dict[str, str] = {}
        known = list(group.attrs.get("layers", []))
        new: list[LayerResult] = []
        for result in results:
            if result.layer in known:
                continue
            other = self._run_at(layer_path(run, result.layer))
            if other is not None:
                failures[result.layer] = (
                    f"not stored: its group would be that of run {other!r}; rename the folder "
                    f"of run {other!r} or analyse it into another --store"
                )
            else:
                new.append(result)
        self._create_layers(run, group, len(steps), new)
        stored = [result for result in results if result.layer not in failures]
        layers = _merge_order(known, [result.layer for result in stored])
        if layers != known:
            group.attrs["layers"] = layers

        # Write every row, then mark the step done.
        opened = {result.layer: self._open_layer(run, result.layer) for result in stored}
        _concurrently(self._ensure_rows(layer, steps) for layer in opened.values())
        failures.update(self._write_rows(opened, row, step, stored))
        checkpoints = dict(group.attrs.get("checkpoints", {}))
        checkpoints[str(step)] = source
        group.attrs["checkpoints"] = checkpoints
        return failures

    def _write_rows(
        self, opened: dict[str, _OpenLayer], row: int, step: int, results: list[LayerResult]
    ) -> dict[str, str]:
        """Write one row of each layer, all at once; return the layers stored as failed."""
        writes = []
        failed: dict[str, str] = {}
        for result in results:
            layer = opened[result.layer]
            arrays = {name: array.async_array for name, array in layer.arrays.items()}
            stored = tuple(layer.group.attrs["matrix_shape"])
            failure = result.failure
            if failure is None and tuple(result.matrix_shape) != stored:
                failure = (
                    f"matrix shape {tuple(result.matrix_shape)} differs from the "
                    f"{stored} stored for this layer at other steps"
                )
            if failure is None:
                writes += [
                    arrays["sigma"].setitem(row, result.sigma),
                    arrays["u"].setitem(row, result.u),
                    arrays["v"].setitem(row, result.v),
                    arrays["status"].setitem(row, DONE),
                ]
            else:
                writes.append(arrays["status"].setitem(row, FAILED))
                failed[result.layer] = failure
        _concurrently(writes)

        # The reasons for failed rows, in each layer's attributes.
        for result in results:
            attrs = opened[result.layer].group.attrs
            reasons = dict(attrs.get("failures", {}))
            if result.layer in failed:
                reasons[str(step)] = failed[result.layer]
            elif reasons.pop(str(step), None) is None:
                continue
            attrs["failures"] = reasons
        return failed

    def _create_layers(self, run: str, group: Any, rows: int, results: list[LayerResult]) -> None:
        """Create layer groups with ``rows`` rows, all at once; the caller lists them.

        A group of that name not yet listed is a leftover of an interrupted run: it is replaced.
        Step labels are written when the rows are first used.
        """
        from zarr.core.group import GroupMetadata

        nodes: dict[str, Any] = {}
        for result in results:
            name = _segment(result.layer)
            nodes[name] = GroupMetadata(
                attributes={
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
            for array, tail in tails.items():
                nodes[f"{name}/{array}"] = _array_metadata(array, rows, tail)
        if not nodes:
            return
        created = dict(group.create_hierarchy(nodes, overwrite=True))
        for result in results:
            name = _segment(result.layer)
            path = layer_path(run, result.layer)
            self._groups[path] = created[name]
            self._open[path] = _OpenLayer(
                created[name], {array: created[f"{name}/{array}"] for array in ARRAYS}
            )

    @staticmethod
    async def _ensure_rows(layer: _OpenLayer, steps: list[int]) -> None:
        """Grow a layer's arrays to one row per allocated step and label every row.

        Each array is checked on its own, and the step labels are compared whole the first
        time, so that a run killed half-way through growing a layer is completed here.
        """
        if layer.labelled == len(steps):
            return
        for array in layer.arrays.values():
            if array.shape[0] < len(steps):
                await array.async_array.resize((len(steps), *array.shape[1:]))  # in place
        labels = np.asarray(steps, dtype=np.int64)
        step = layer.arrays["step"].async_array
        if not np.array_equal(await step.getitem(slice(0, len(steps))), labels):
            await step.setitem(slice(0, len(steps)), labels)
        layer.labelled = len(steps)

    def _run_at(self, path: str) -> str | None:
        """The listed run whose group is at ``path`` or inside it, if any."""
        for run in self.runs():
            if run_path(run) == path or run_path(run).startswith(path + "/"):
                return run
        return None

    def _layer_at(self, path: str) -> tuple[str, str] | None:
        """The (run, layer) whose group is at ``path`` or holds it, if any."""
        segments = path.split("/")
        for run in self.runs():
            depth = len(run_path(run).split("/"))
            if depth >= len(segments) or "/".join(segments[:depth]) != run_path(run):
                continue
            for layer in self.layers(run):
                if _segment(layer) == segments[depth]:
                    return run, layer
        return None

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path} was opened for reading")


def _marked(
    steps: np.ndarray, status: np.ndarray, done: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Rows' (steps, status) with the rows of steps not marked done read as not computed."""
    finished = np.isin(steps, np.asarray(done, dtype=np.int64))
    return steps, np.where(finished, status, NOT_COMPUTED).astype(np.uint8)


def _by_step(steps: np.ndarray, status: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(steps, status) sorted by step."""
    order = np.argsort(steps, kind="stable")
    return steps[order], status[order]


def _concurrently(operations: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run Zarr's asynchronous operations together on its event loop; their results in order.

    One checkpoint touches a few hundred documents and chunks: awaited together they cost one
    trip to the loop rather than one each.
    """
    from zarr.core.sync import sync

    made: list[Awaitable[Any]] = []
    try:
        made.extend(operations)  # made here: what makes them may itself wait on the loop
    except BaseException:
        for operation in made:  # never to be awaited: closed, so that Python does not warn
            close = getattr(operation, "close", None)
            if callable(close):
                close()
        raise
    operations = made

    async def together() -> list[Any]:
        return list(await asyncio.gather(*operations))

    return sync(together())


@functools.lru_cache(maxsize=256)
def _array_metadata(name: str, rows: int, tail: tuple[int, ...]) -> Any:
    """The metadata of a layer's array ``name`` with ``rows`` rows, as Zarr creates it."""
    import zarr

    dtype, dims = ARRAYS[name]
    template = zarr.create_array(
        zarr.storage.MemoryStore(),
        shape=(rows, *tail),
        chunks=(_ROWS_PER_CHUNK[name], *tail),
        dtype=dtype,
        fill_value=0,
        dimension_names=dims,
    )
    return template.metadata


def run_path(run: str) -> str:
    """The path of a run's group inside the store: its folder path, segment by segment."""
    return "/".join(_segment(part) for part in run.split("/"))


def layer_path(run: str, layer: str) -> str:
    """The path of a layer's group inside the store."""
    return f"{run_path(run)}/{_segment(layer)}"


def _segment(name: str) -> str:
    """A name as one path segment that names nothing else (see the module docstring)."""
    segment = _ESCAPED.sub(lambda match: f"%{ord(match.group()):02X}", name)
    if segment in _RESERVED:
        return f"%%{segment}"
    encoded = segment.encode()
    if len(encoded) > _LONGEST_SEGMENT:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        head = encoded[: _LONGEST_SEGMENT - 20].decode("utf-8", "ignore")
        return f"{head}%%{digest}"
    return segment


def _open_root(path: Path, mode: Literal["r", "r+", "a", "w", "w-"]) -> Any:
    """The root group of a store; StoreError if its document is damaged or not a group's."""
    import zarr

    try:
        return zarr.open_group(path, mode=mode)
    except _DAMAGED as error:
        raise StoreError(
            f"cannot read {path / 'zarr.json'} as a Zarr group: {_brief(error)}; pass the store "
            "that `spectrum analyze` wrote, or re-run it into a new --store"
        ) from None


def _what_is_there(path: Path) -> str:
    """What a path that is not a spectra store holds, in words that end "not a spectra store"."""
    if not path.is_dir():
        return "a file, not a spectra store"
    if any((path / name).is_file() for name in (".zgroup", ".zarray", ".zattrs")):
        return "a Zarr v2 store, not a spectra store (a Zarr v3 folder)"
    return "a folder that is not a spectra store (it has no zarr.json)"


def _brief(error: BaseException) -> str:
    """An exception as one short line."""
    text = " ".join(str(error).split())
    return (text[:160] + "…") if len(text) > 160 else text or type(error).__name__


def _merge_order(known: list[str], seen: list[str]) -> list[str]:
    """Layers in a checkpoint's order: each new one goes after the layer it follows in ``seen``.

    The result does not depend on which checkpoint is written first, as long as the checkpoints
    agree on the order of the layers they share.
    """
    order = list(known)
    previous = None
    for name in seen:
        if name not in order:
            order.insert(order.index(previous) + 1 if previous is not None else 0, name)
        previous = name
    return order


def _remove_partial_files(path: Path) -> None:
    """Remove the temporary files of writes that a killed run left unfinished.

    Zarr's local store writes each document to ``NAME.<hex>.partial`` and renames it; a process
    killed in between leaves the temporary file, which no reader looks at.
    """
    for partial in path.rglob("*.partial"):
        if _PARTIAL.search(partial.name) and partial.is_file():
            log.debug("removing %s, left by an interrupted write", partial)
            partial.unlink(missing_ok=True)


def _check_format(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a store that is not format 1, or whose root attributes are not what it writes."""
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
    top_k, runs = attrs.get("top_k"), attrs.get("runs")
    if not (isinstance(top_k, int) and top_k >= 1 and isinstance(runs, list)) or not all(
        isinstance(run, str) for run in runs
    ):
        raise StoreError(
            f"{path} is a damaged spectra store: expected a positive integer top_k and a list "
            f"of run names, got top_k={top_k!r}, runs={str(runs)[:60]}; re-run `spectrum analyze` "
            "into a new --store"
        )
