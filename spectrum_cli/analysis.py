"""The main job: discover checkpoints, decompose every matrix on Dask workers, store results.

Workers read checkpoints from paths they can see and send back singular values and vectors;
only this process writes the store, as results arrive. A checkpoint already stored is not
read again, so re-running after new checkpoints appear decomposes only those.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectrum_cli.checkpoints import Checkpoint, discover
from spectrum_cli.errors import SpectrumError
from spectrum_cli.store import LayerResult, Store

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

    from spectrum_cli.checkpoints import load_tensors
    from spectrum_cli.matrices import as_matrix, matrix_info
    from spectrum_cli.spectra import DecompositionError, check_finite, resolve_device

    torch.set_num_threads(threads)
    target = resolve_device(device)
    outcome = CheckpointOutcome()
    try:
        # Collect the matrices, setting aside those with non-finite entries.
        pending: dict[tuple[int, int], list[tuple[Any, torch.Tensor]]] = defaultdict(list)
        order: list[str] = []
        failed: dict[str, LayerResult] = {}
        for name, tensor in load_tensors(Path(path)):
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
    """Decompose same-shaped matrices in batches that fit a memory budget (float64 bytes)."""
    import torch

    from spectrum_cli.spectra import decompose_batch

    m, n = group[0][0].shape
    per_batch = max(1, budget // (8 * (m * n + min(m, n) ** 2)))
    out = {}
    for start in range(0, len(group), per_batch):
        chunk = group[start : start + per_batch]
        spectra = decompose_batch(torch.stack([mat for _, mat in chunk]), top_k, device)
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
    """
    started = time.perf_counter()
    root = root.resolve()
    found = discover(root)
    summary = Summary(store=str(store_path), notes=list(found.notes))
    summary.runs = len({c.run for c in found.checkpoints})
    summary.checkpoints = len(found.checkpoints)

    with Store.writing(store_path, top_k) as store:
        # Allocate rows for every step first, then decompose what is not stored yet.
        by_run: dict[str, list[Checkpoint]] = defaultdict(list)
        for checkpoint in found.checkpoints:
            by_run[checkpoint.run].append(checkpoint)
        todo: list[Checkpoint] = []
        for run, checkpoints in by_run.items():
            store.add_steps(run, [c.step for c in checkpoints])
            stored = set(store.done_steps(run))
            todo += [c for c in checkpoints if c.step not in stored]
        summary.already_stored = summary.checkpoints - len(todo)
        if on_found:
            on_found(len(todo))

        for checkpoint, outcome in _run_tasks(todo, top_k, workers, scheduler, device):
            where = f"{checkpoint.path} (run {checkpoint.run}, step {checkpoint.step})"
            if outcome.error is not None:
                summary.failed_checkpoints.append(f"{where}: {outcome.error}")
            elif not outcome.results:
                summary.failed_checkpoints.append(f"{where}: no weight matrices in it")
            else:
                source = {"path": _relative(checkpoint.path, root), "bytes": _size(checkpoint)}
                store.write_checkpoint(checkpoint.run, checkpoint.step, outcome.results, source)
                summary.analysed += 1
                summary.matrices += len(outcome.results)
                summary.failed_matrices += [
                    f"{where} layer {r.layer}: {r.failure}" for r in outcome.results if r.failure
                ]
            if on_done:
                on_done(checkpoint)
    summary.seconds = time.perf_counter() - started
    return summary


def _run_tasks(todo: list[Checkpoint], top_k: int, workers, scheduler, device):
    """Yield (checkpoint, outcome) as Dask workers finish them."""
    if not todo:
        return
    from distributed import Client, LocalCluster, as_completed

    cores = os.cpu_count() or 1
    if scheduler:
        cluster = None
        client = Client(scheduler)
        threads = 1
    else:
        # Small jobs run on worker threads in this process: no worker start-up to pay for.
        small = sum(_size(c) for c in todo) < SMALL_JOB_BYTES
        n_workers = max(1, min(workers or cores, len(todo)))
        threads = max(1, cores // n_workers)
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=not small,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    try:
        futures = {
            client.submit(decompose_checkpoint, str(c.path), top_k, device, threads, pure=False): c
            for c in todo
        }
        for future in as_completed(futures):
            if future.status == "error":
                error = future.exception()
                outcome = CheckpointOutcome(error=f"{type(error).__name__}: {error}")
            else:
                outcome = future.result()
            yield futures[future], outcome
            future.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


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
