"""The main job: discover checkpoints, decompose every matrix on Dask workers, store results.

Workers read checkpoints from paths they can see and send back singular values and vectors;
only this process writes the store, as results arrive. A checkpoint already stored is not
read again, so re-running after new checkpoints appear decomposes only those.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectrum_cli.checkpoints import Checkpoint, discover
from spectrum_cli.errors import SpectrumError, UsageError
from spectrum_cli.store import NOT_COMPUTED, LayerResult, Store

log = logging.getLogger(__name__)

# Below this many checkpoint bytes, local workers are threads of this process.
SMALL_JOB_BYTES = 64 << 20


@dataclass
class CheckpointOutcome:
    """What a worker sends back for one checkpoint: every layer's result, or why it failed."""

    results: list[LayerResult] = field(default_factory=list)
    error: str | None = None


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


def decompose_checkpoint(path: str, top_k: int, device: str, threads: int) -> CheckpointOutcome:
    """Read one checkpoint and decompose each of its matrices (runs on a worker).

    Matrices of one shape are decomposed as a batch; a matrix with non-finite entries becomes a
    failure that names the reason, and the rest go on. An unreadable checkpoint becomes an
    outcome with ``error`` set rather than an exception, so one bad file stops nothing else.
    """
    import torch
    from threadpoolctl import threadpool_limits

    from spectrum_cli.spectra import resolve_device

    # Torch and the BLAS under SciPy both keep to ``threads`` cores, so neither oversubscribes
    # the cores that other tasks use.
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        return _decompose_checkpoint(Path(path), top_k, resolve_device(device))


def _decompose_checkpoint(path: Path, top_k: int, target: Any) -> CheckpointOutcome:
    """`decompose_checkpoint` once the thread counts are set."""
    import torch

    from spectrum_cli.checkpoints import load_tensors
    from spectrum_cli.matrices import as_matrix, matrix_info
    from spectrum_cli.spectra import DecompositionError, check_finite

    outcome = CheckpointOutcome()
    try:
        # Collect the matrices, setting aside those with non-finite entries.
        pending: dict[tuple[int, int], list[tuple[Any, torch.Tensor]]] = defaultdict(list)
        order: list[str] = []
        failed: dict[str, LayerResult] = {}
        for name, tensor in load_tensors(path):
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
            pending[info.shape].append((info, matrix))
    except SpectrumError as error:
        return CheckpointOutcome(error=str(error))

    done = dict(failed)
    for group in pending.values():
        done.update(_decompose_group(group, top_k, target))
    outcome.results = [done[name] for name in order]
    return outcome


def _decompose_group(group: list, top_k: int, device: Any, budget: int = 256 << 20) -> dict:
    """Decompose same-shaped finite matrices in batches that fit a memory budget (float64)."""
    from spectrum_cli.spectra import decompose_batch

    m, n = group[0][0].shape
    per_batch = max(1, budget // (8 * (m * n + min(m, n) ** 2)))
    out = {}
    for start in range(0, len(group), per_batch):
        chunk = group[start : start + per_batch]
        spectra = decompose_batch([mat for _, mat in chunk], top_k, device, checked=True)
        for (info, _), spectrum in zip(chunk, spectra, strict=True):
            out[info.layer] = _result(info, sigma=spectrum.sigma, u=spectrum.u, v=spectrum.v)
    return out


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
        Local worker processes; by default one per core, each with one BLAS thread.
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
    if scheduler is None:
        _check_device(device)
    found = discover(root)
    summary = Summary(store=str(store_path), notes=list(found.notes))
    checkpoints = _outside(found.checkpoints, store_path, summary.notes)
    summary.runs = len({c.run for c in checkpoints})
    summary.checkpoints = len(checkpoints)

    with _remote(scheduler) as client, Store.writing(store_path, top_k) as store:
        # Allocate rows for every step first, then decompose what is not stored yet.
        by_run: dict[str, list[Checkpoint]] = defaultdict(list)
        for checkpoint in checkpoints:
            by_run[checkpoint.run].append(checkpoint)
        todo: list[Checkpoint] = []
        for run, in_run in by_run.items():
            store.add_steps(run, [c.step for c in in_run])
            stored = set(store.done_steps(run))
            todo += [c for c in in_run if c.step not in stored]
        summary.already_stored = summary.checkpoints - len(todo)
        if on_found:
            on_found(len(todo))

        with closing(_run_tasks(todo, top_k, device, workers, client)) as tasks:
            for checkpoint, outcome in tasks:
                _record(store, summary, checkpoint, outcome, root)
                if on_done:
                    on_done(checkpoint)

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
    source = {
        "path": _relative(checkpoint.path, root),
        "absolute_path": str(checkpoint.path.absolute()),
        "bytes": _size(checkpoint),
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

    # One BLAS thread per task: the Gram matrices and tridiagonal reductions of weight-sized
    # matrices gain nothing from a second thread, and lose much when tasks share cores
    # (benchmarks/bench_analyze.py, part "threads"); parallelism comes from the workers.
    threads = 1
    cluster = None
    if client is None:
        # Small jobs, and a single checkpoint (one task, nothing to run beside it), run on
        # worker threads in this process: no worker start-up to pay for.
        cores = os.cpu_count() or 1
        small = len(todo) == 1 or sum(_size(c) for c in todo) < SMALL_JOB_BYTES
        n_workers = max(1, min(workers or cores, len(todo)))
        # No dashboard; the scheduler's HTTP server (which it starts regardless) takes any free
        # port on the loopback rather than 8787, which another Dask process may hold.
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=not small,
            silence_logs=logging.CRITICAL,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
        )
        client = Client(cluster)
    try:
        futures = {
            client.submit(decompose_checkpoint, str(c.path), top_k, device, threads, pure=False): c
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
    finally:
        if cluster is not None:
            client.close()
            cluster.close()


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
    for layer in store.layers(run):
        steps, status = store.status(run, layer)
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


def _size(checkpoint: Checkpoint) -> int:
    path = checkpoint.path
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
