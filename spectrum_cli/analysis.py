"""The main job: discover checkpoints, decompose every matrix on Dask workers, store results.

Workers read checkpoints from paths they can see and send back singular values and vectors;
only this process writes the store, as results arrive. On this machine the workers are threads
of this process; with ``--scheduler``, those of any Dask cluster. A checkpoint already stored is not
read again, so re-running after new checkpoints appear decomposes only those.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectrum_cli.checkpoints import Checkpoint, discover
from spectrum_cli.errors import SpectrumError, StoreError, UsageError
from spectrum_cli.store import NOT_COMPUTED, LayerResult, Store

log = logging.getLogger(__name__)

# Checkpoints a local analysis holds at once: one being decomposed, the next being read.
CHECKPOINTS_IN_FLIGHT = 2


@dataclass
class CheckpointOutcome:
    """What a worker sends back for one checkpoint: every layer's result, or why it failed."""

    results: list[LayerResult] = field(default_factory=list)
    error: str | None = None
    # What the reader left out of the checkpoint, each as "PATH: what and why".
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """What one ``analyze`` did, for the summary line and ``--format json``."""

    store: str
    runs: int = 0
    checkpoints: int = 0
    already_stored: int = 0
    analysed: int = 0
    matrices: int = 0
    failed_checkpoints: list[str] = field(default_factory=list)
    failed_matrices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_checkpoints and not self.failed_matrices


def decompose_checkpoint(
    path: str, top_k: int, device: str, side_by_side: int = 0
) -> CheckpointOutcome:
    """Read one checkpoint and decompose each of its matrices (runs on a worker).

    On the CPU, matrices are decomposed one after another in this thread, or with
    ``side_by_side`` N on the pool of N threads this process's tasks share, each on one core
    (see `spectra.decompose_batch`); on an accelerator, same-shaped matrices go as a batch. A matrix with non-finite
    entries becomes a failure that names the reason, and the rest go on. An unreadable
    checkpoint, or any other error, becomes an outcome with ``error`` set rather than an
    exception, so one bad file stops nothing else and the run reports it in one line.
    """
    from spectrum_cli.spectra import one_blas_thread, resolve_device

    try:
        # One BLAS thread per matrix: matrices and tasks side by side never oversubscribe.
        with one_blas_thread():
            return _decompose_checkpoint(Path(path), top_k, resolve_device(device), side_by_side)
    except Exception as error:  # Dask would log a raised one at length, past --quiet
        return CheckpointOutcome(error=f"{type(error).__name__}: {error}")


def _decompose_checkpoint(
    path: Path, top_k: int, target: Any, side_by_side: int
) -> CheckpointOutcome:
    """`decompose_checkpoint` once the thread counts are set."""
    from spectrum_cli.checkpoints import load_tensors
    from spectrum_cli.matrices import as_matrix, matrix_info
    from spectrum_cli.spectra import DecompositionError, check_finite, decompose_batch

    # Collect the matrices, setting aside those with non-finite entries.
    order: list[str] = []
    failed: dict[str, LayerResult] = {}
    finite: list[tuple[Any, Any]] = []
    notes: list[str] = []
    try:
        for name, tensor in load_tensors(path, numpy=True, notes=notes):
            info = matrix_info(name, tensor)
            if info is None:
                continue
            matrix = as_matrix(tensor)  # (out, in·k…) float32
            order.append(name)
            try:
                check_finite(matrix)
            except DecompositionError as error:
                failed[name] = _result(info, failure=str(error))
                continue
            finite.append((info, matrix))
    except SpectrumError as error:
        return CheckpointOutcome(error=str(error), notes=notes)

    spectra = decompose_batch(
        [matrix for _, matrix in finite], top_k, target, side_by_side=side_by_side, checked=True
    )
    done = dict(failed)
    for (info, _), spectrum in zip(finite, spectra, strict=True):
        done[info.layer] = _result(info, sigma=spectrum.sigma, u=spectrum.u, v=spectrum.v)
    return CheckpointOutcome(results=[done[name] for name in order], notes=notes)


def _result(info: Any, **fields: Any) -> LayerResult:
    return LayerResult(
        layer=info.layer,
        tensor_shape=info.tensor_shape,
        matrix_shape=info.shape,
        dtype=info.dtype,
        formed=info.formed,
        **fields,
    )


def analyze(
    root: Path,
    store_path: Path,
    *,
    top_k: int = 32,
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "auto",
    on_found: Callable[[int], None] | None = None,
    on_done: Callable[[Checkpoint], None] | None = None,
) -> Summary:
    """Decompose every checkpoint under ``root`` that ``store_path`` does not hold yet.

    Parameters
    ----------
    root
        A run folder, a folder of runs, or one checkpoint.
    store_path
        The Zarr store to create or extend.
    top_k
        Singular vectors kept per matrix.
    workers
        Matrices decomposed at once on this machine, each on one core with one BLAS thread;
        by default one per core.
    scheduler
        Address of an existing Dask scheduler (``tcp://host:8786``); workers there must see
        the checkpoint paths.
    device
        ``auto``, ``cpu`` or ``cuda``, as each worker resolves it.
    on_found, on_done
        Progress callbacks: the number of checkpoints to decompose, then each one finished.

    Returns
    -------
    Summary
        What was found, stored and failed. A checkpoint that cannot be read, or a matrix that
        cannot be decomposed, is a failure listed here, not an exception.

    Raises
    ------
    UsageError
        When ``root`` holds no checkpoint, ``device`` does not exist here, or ``scheduler`` is
        not an address or cannot be reached (nothing was done).
    StoreError
        When the store is locked by another writer, not a spectra store, or keeps another
        number of singular vectors.
    """
    started = time.perf_counter()
    root = root.resolve()
    found = discover(root)
    summary = Summary(store=str(store_path), notes=list(found.notes))
    checkpoints = _outside(found.checkpoints, store_path, summary.notes)
    summary.runs = len({c.run for c in checkpoints})
    summary.checkpoints = len(checkpoints)
    # The device is checked (which imports torch) only when there is something to decompose.
    if scheduler is None and not _all_stored(store_path, checkpoints):
        _check_device(device)

    with _remote(scheduler) as client, Store.writing(store_path, top_k) as store:
        # Allocate rows for every step first, then decompose what is not stored yet.
        by_run: dict[str, list[Checkpoint]] = defaultdict(list)
        for checkpoint in checkpoints:
            by_run[checkpoint.run].append(checkpoint)
        for run, in_run in by_run.items():
            _check_same_run(store, run, in_run)
        todo: list[Checkpoint] = []
        for run, in_run in by_run.items():
            store.add_steps(run, [c.step for c in in_run])
            changed = _changed_since_stored(store.checkpoints(run), in_run)
            if changed:
                summary.notes += [f"{c.path}: {why}; analysed again" for c, why in changed.items()]
                store.forget(run, [c.step for c in changed])
            stored = set(store.done_steps(run))
            todo += [c for c in in_run if c.step not in stored]
        summary.already_stored = summary.checkpoints - len(todo)
        if on_found:
            on_found(len(todo))

        left_out: dict[str, list[Path]] = defaultdict(list)
        with closing(_run_tasks(todo, top_k, device, workers, client)) as tasks:
            for checkpoint, outcome in tasks:
                _record(store, summary, checkpoint, outcome, root)
                for told in outcome.notes:
                    left_out[told.removeprefix(f"{checkpoint.path}: ")].append(checkpoint.path)
                if on_done:
                    on_done(checkpoint)
        # One note for what the reader left out of many checkpoints alike.
        for what, paths in left_out.items():
            more = f" and {len(paths) - 1} more checkpoints" if len(paths) > 1 else ""
            summary.notes.append(f"{min(paths)}{more}: {what}")

        # Say where one folder holds checkpoints of models that share no layer.
        for run in sorted({c.run for c in todo}):
            note = mixed_models_note(run, _layers_by_step(store, run))
            if note is not None:
                summary.notes.append(note)

    # Report failures in the order of paths and steps, not in the order workers finished.
    summary.failed_checkpoints.sort(key=_natural_order)
    summary.failed_matrices.sort(key=_natural_order)
    summary.seconds = time.perf_counter() - started
    return summary


def _record(
    store: Store, summary: Summary, checkpoint: Checkpoint, outcome: CheckpointOutcome, root: Path
) -> None:
    """Write one checkpoint's outcome to the store and count it in the summary."""
    where = f"{checkpoint.path} (run {checkpoint.run}, step {checkpoint.step})"
    if outcome.error is not None:
        summary.failed_checkpoints.append(f"{where}: {outcome.error}")
        return
    if not outcome.results:
        summary.failed_checkpoints.append(f"{where}: no weight matrices in it")
        return
    size, modified = _size_and_time(checkpoint)
    source = {
        "path": _relative(checkpoint.path, root),
        "absolute_path": str(checkpoint.path.absolute()),
        "bytes": size,
        "modified": modified,
    }
    failures = store.write_checkpoint(checkpoint.run, checkpoint.step, outcome.results, source)
    summary.analysed += 1
    summary.matrices += len(outcome.results)
    summary.failed_matrices += [f"{where} layer {layer}: {why}" for layer, why in failures.items()]


def _run_tasks(
    todo: list[Checkpoint], top_k: int, device: str, workers: int | None, client: Any
) -> Generator[tuple[Checkpoint, CheckpointOutcome], None, None]:
    """Yield (checkpoint, outcome) as Dask workers finish them.

    With ``client`` None, the work runs on a cluster of this machine started for it.
    """
    if not todo:
        return
    from distributed import Client, LocalCluster, as_completed

    from spectrum_cli.spectra import one_blas_thread

    with ExitStack() as stack:
        # Remote workers take one checkpoint per worker thread, one matrix at a time each.
        side_by_side = 0
        if client is None:
            # Here, worker threads of this process (no worker start-up, results not copied):
            # one checkpoint decomposed, `workers` matrices at once on one core each, while
            # the next is read. The thread limits hold for the whole run.
            side_by_side = workers or os.cpu_count() or 1
            stack.enter_context(one_blas_thread())
            # No dashboard; the scheduler's HTTP server (which it starts regardless) takes any
            # free port on the loopback rather than 8787, which another Dask process may hold.
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=1,
                    threads_per_worker=min(CHECKPOINTS_IN_FLIGHT, len(todo)),
                    processes=False,
                    silence_logs=logging.CRITICAL,
                    scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
                )
            )
            client = stack.enter_context(Client(cluster))

        futures = {
            client.submit(
                decompose_checkpoint, str(c.path), top_k, device, side_by_side, pure=False
            ): c
            for c in todo
        }
        for future in as_completed(futures):
            # A task that raised, or whose worker died, fails its checkpoint and no other.
            try:
                outcome = future.result()
            except Exception as error:
                outcome = CheckpointOutcome(error=f"{type(error).__name__}: {error}")
            yield futures[future], outcome
            future.release()


@contextmanager
def _remote(scheduler: str | None) -> Iterator[Any]:
    """A client of the scheduler at ``scheduler`` for the duration, or None without one."""
    if scheduler is None:
        yield None
        return
    client = _connect(scheduler)
    try:
        yield client
    finally:
        client.close()


def _connect(scheduler: str) -> Any:
    """A client of the Dask scheduler at ``scheduler``, or a UsageError saying why not.

    How long to try is Dask's setting ``distributed.comm.timeouts.connect`` (30 s unless set,
    e.g. by ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s``).
    """
    from distributed import Client

    try:
        return Client(scheduler)
    except ValueError as error:
        raise UsageError(
            f"--scheduler {scheduler!r} is not a Dask scheduler address ({error}); "
            "expected e.g. tcp://host:8786"
        ) from None
    except (OSError, TimeoutError) as error:
        raise UsageError(
            f"cannot reach the Dask scheduler at {scheduler}: {error}; start one with "
            "`dask scheduler`, or leave out --scheduler to use this machine"
        ) from None


def _layers_by_step(store: Store, run: str) -> dict[int, set[str]]:
    """The layers each stored checkpoint of a run held, stored or failed."""
    held: dict[int, set[str]] = defaultdict(set)
    for layer, (steps, status) in store.statuses(run).items():
        for step in steps[status != NOT_COMPUTED].tolist():
            held[step].add(layer)
    return held


def mixed_models_note(run: str, layers_by_step: Mapping[int, set[str]]) -> str | None:
    """A note on a run whose checkpoints fall into groups that share no layer, if they do.

    Two checkpoints are in one group when a chain of checkpoints, each sharing a layer with the
    next, links them: a layer added or dropped during training keeps one group, two models
    saved into one folder make two.

    Parameters
    ----------
    run : str
        The run's name, for the note.
    layers_by_step : mapping of int to set of str
        The layers each checkpoint of the run holds, by step.

    Returns
    -------
    str or None
        One line naming each group's steps and layers, or None when there is one group.
    """
    groups: list[tuple[list[int], set[str]]] = []
    for step in sorted(layers_by_step):
        steps, layers = [step], set(layers_by_step[step])
        for linked in [g for g in groups if g[1] & layers]:
            groups.remove(linked)
            steps, layers = linked[0] + steps, linked[1] | layers
        groups.append((sorted(steps), layers))
    if len(groups) < 2:
        return None
    described = "; ".join(
        f"{_listed('step', steps)} {'hold' if len(steps) > 1 else 'holds'} "
        f"{_listed('', sorted(layers))}"
        for steps, layers in groups
    )
    return (
        f"run {run}: its checkpoints fall into {len(groups)} groups that share no layer, as if "
        f"{len(groups)} models were saved in one folder ({described}); each layer has rows only "
        "for the steps that hold it: put each model's checkpoints in a folder of its own"
    )


def _listed(noun: str, items: list) -> str:
    """``steps 1, 2, 3 … (10)``: the first three items, and the count when there are more."""
    head = ", ".join(map(str, items[:3])) + (f" … ({len(items)})" if len(items) > 3 else "")
    if not noun:
        return head
    return f"{noun}{'s' if len(items) > 1 else ''} {head}"


def _check_device(device: str) -> None:
    """Refuse a device this machine lacks before any work is sent to local workers."""
    from spectrum_cli.spectra import resolve_device

    try:
        resolve_device(device)
    except (SpectrumError, RuntimeError) as error:
        raise UsageError(str(error)) from None


def _check_same_run(store: Store, run: str, checkpoints: list[Checkpoint]) -> None:
    """Refuse checkpoints that would join a stored run of the same name from another folder.

    Two runs whose folders share a name (``seed1/run`` and ``seed2/run`` analysed one at a
    time) would otherwise mix in one run. A stored checkpoint whose file is still there but
    outside the folder of the run found now tells them apart. A store moved to another
    machine with its runs names files that are no longer there, and passes; so does a store
    copied with its runs, where the run lies at the same path from the store's folder.

    Raises
    ------
    UsageError
        Naming a stored file and the folder found now, before anything is written.
    """
    folders = {c.folder for c in checkpoints if c.folder is not None}
    if run not in store.runs() or len(folders) != 1:
        return
    folder = Path(os.path.realpath(folders.pop()))
    # Where the run lies from the store's folder; a copy of both keeps it.
    home = Path(os.path.realpath(store.path)).parent
    tail = folder.relative_to(home).parts if folder.is_relative_to(home) else None
    for step, source in sorted(store.checkpoints(run).items()):
        earlier = source.get("absolute_path")
        if not earlier or earlier.startswith(f"{folder}{os.sep}") or earlier == str(folder):
            continue  # inside the folder as written: no need to ask the file system
        if not os.path.exists(earlier):
            continue
        earlier_path = Path(os.path.realpath(earlier))
        if earlier_path.is_relative_to(folder):
            continue
        if tail and any(above.parts[-len(tail) :] == tail for above in earlier_path.parents):
            continue  # the store and its runs were copied together
        raise UsageError(
            f"run {run!r} in {store.path} holds step {step} from {earlier}, outside {folder} "
            "where this run's checkpoints are: two runs of one name would mix; analyse this "
            "one into another --store, rename one of the two run folders, or give the folder "
            "above both runs so that each is named by its path"
        )


def _all_stored(store_path: Path, checkpoints: list[Checkpoint]) -> bool:
    """Whether the store already holds every checkpoint (False where it cannot be read)."""
    if not (store_path / "zarr.json").is_file():
        return False
    try:
        store = Store.open(store_path)
        done = {run: set(store.done_steps(run)) for run in store.runs()}
    except StoreError:
        return False  # writing it will say why
    return all(c.step in done.get(c.run, set()) for c in checkpoints)


def _outside(checkpoints: list[Checkpoint], store_path: Path, notes: list[str]) -> list[Checkpoint]:
    """The checkpoints that are not inside the store (the store may sit among the runs)."""
    store = store_path.resolve()
    kept = [c for c in checkpoints if not c.path.resolve().is_relative_to(store)]
    if len(kept) < len(checkpoints):
        notes.append(f"skipped {len(checkpoints) - len(kept)} files inside the store {store}")
    if not kept:
        raise UsageError(f"no checkpoint outside the store {store}; give the folder of runs")
    return kept


def _natural_order(text: str) -> list[tuple[int, str]]:
    """Sort key that puts ``step_2`` before ``step_10``."""
    return [(int(part), "") if part.isdigit() else (0, part) for part in re.split(r"(\d+)", text)]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.parent).as_posix()
    except ValueError:
        return str(path)


def _changed_since_stored(
    stored: Mapping[int, Mapping[str, Any]], checkpoints: list[Checkpoint]
) -> dict[Checkpoint, str]:
    """The checkpoints of stored steps whose files changed since, with how.

    A file of another size has changed wherever it now lies; the time it was last modified
    counts only where it is the very file stored, so that copying a store and its runs to
    another machine does not make every step new.
    """
    changed = {}
    for checkpoint in checkpoints:
        source = stored.get(checkpoint.step)
        if source is None:
            continue
        size, modified = _size_and_time(checkpoint)
        if "bytes" in source and source["bytes"] != size:
            changed[checkpoint] = f"{source['bytes']} bytes when stored, {size} now"
        elif (
            "modified" in source
            and source.get("absolute_path") == str(checkpoint.path.absolute())
            and source["modified"] != modified
        ):
            changed[checkpoint] = "modified since it was stored"
    return changed


def _size_and_time(checkpoint: Checkpoint) -> tuple[int, float]:
    """The checkpoint's bytes and when it was last written (of a folder: its newest file)."""
    path = checkpoint.path
    if path.is_dir():
        stats = [p.stat() for p in path.rglob("*") if p.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)
    stat = path.stat()
    return stat.st_size, stat.st_mtime
