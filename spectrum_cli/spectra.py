"""The decomposition engine: all singular values and the top-k singular vectors of a matrix.

One SVD per matrix per checkpoint, reused by every later command. The route is exact in the
sense that matters for float32 weights: the Gram matrix WᵀW of the smaller side is formed in
float64 (a product of two float32 numbers is exact there) and its eigenvalues are the squared
singular values. A wide matrix is decomposed as its transpose.

On the CPU the Gram matrix is reduced to tridiagonal form once (LAPACK ``dsytrd``); all its
eigenvalues come from that tridiagonal matrix (``dsterf``), and eigenvectors only for the top k
(``dstein``, inverse iteration from those eigenvalues, or ``dstemr`` where it does not
converge; then ``dormqr`` to carry them back), so the O(n³) work is one reduction and no more.
The float32 matrix is converted to float64 a block of rows at a time, never whole. On a CUDA
device, same-shaped matrices are decomposed as one batch with ``torch.linalg.eigh``.

Matrices come as NumPy arrays or torch tensors. The CPU route needs NumPy and SciPy only: torch
is imported for torch tensors and accelerators, never to decompose arrays on the CPU, so that a
run over safetensors files does not pay for importing it.

Left vectors follow as W v / σ. Where the top-k reach singular values that are numerically
zero, the matrix falls back to a direct float64 SVD so that no vector is made of noise.

Signs are fixed so that stored vectors compare across steps: the entry of largest magnitude in
each left vector is positive, and the right vector flips with it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from spectrum_cli import lapack
from spectrum_cli.errors import SpectrumError, UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# A matrix as the engine takes it: a NumPy array, or a torch tensor on any device.
Matrix = Union[np.ndarray, "torch.Tensor"]

# Singular values below this fraction of σ₁ (times the size) are zero for float32 input.
_ZERO_TOLERANCE = float(np.finfo(np.float32).eps)
# The store keeps float32: larger singular values cannot be stored, and a largest one below
# float32's smallest normal number would be stored as zero or with few digits.
_LARGEST = float(np.finfo(np.float32).max)
_SMALLEST = float(np.finfo(np.float32).smallest_normal)
# Device files without one of which no CUDA (or ROCm) device can be visible on Linux: NVIDIA's
# driver, WSL's GPU bridge, AMD's compute driver.
_ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")
# Rows of a float32 matrix converted to float64 at a time: about this many bytes.
_BLOCK_BYTES = 8 << 20
# Below this many columns (of the tall orientation) a full eigen-decomposition costs nothing.
_SMALL = 32
# Each thread's reusable float64 buffers (a block of rows, a Gram matrix) and CUDA stream.
_scratch = threading.local()
# The largest Gram matrix a thread keeps for its next call: 2048 × 2048 float64.
_KEPT_GRAM_BYTES = 32 << 20
# Float64 bytes a batched pass on an accelerator may hold: matrices and Gram matrices.
_DEVICE_BUDGET_BYTES = 256 << 20
# The BLAS limit `one_blas_thread` holds, how many are inside it, and torch's thread count
# before the first entered; the shared pools of decomposing threads, by size.
_blas_limit: Any = None
_blas_users = 0
_torch_threads = 1
_limit_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


class DecompositionError(SpectrumError):
    """A matrix cannot be decomposed (non-finite entries); recorded per matrix, not fatal."""


@dataclass(frozen=True)
class Spectrum:
    """The singular values and top-k singular vectors of one matrix.

    Attributes
    ----------
    sigma
        All r = min(m, n) singular values, descending, float32.
    u
        The top-k left singular vectors as columns, (m, k) float32.
    v
        The top-k right singular vectors as columns, (n, k) float32.
    """

    sigma: np.ndarray
    u: np.ndarray
    v: np.ndarray


def resolve_device(name: str) -> str:
    """Turn ``auto``, ``cpu`` or ``cuda[:i]`` into ``cpu``, ``cuda`` or ``cuda:i``.

    ``auto`` takes CUDA when present. Where no CUDA device can be present (a CPU build of
    torch, or no accelerator driver), ``auto`` and ``cpu`` are answered without importing
    torch.

    Raises
    ------
    UsageError
        When the name is not a device, not a CPU or CUDA device, or not on this machine.
    """
    if name == "cpu" or (name == "auto" and not cuda_possible()):
        return "cpu"
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"Invalid device string {name!r} for --device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is visible; use --device cpu or auto"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name} asks for CUDA device {device.index}, but this machine has "
            f"{torch.cuda.device_count()}; use --device cuda or auto"
        )
    return str(device)


def cuda_possible() -> bool:
    """Whether a CUDA device could be visible here, told without importing torch.

    No, for a CPU build of torch (its version ends in ``+cpu``), on macOS, and on Linux without
    the device files an NVIDIA, WSL or ROCm driver makes; otherwise only torch can tell.
    """
    try:
        if importlib.metadata.version("torch").endswith("+cpu"):
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(node) for node in _ACCELERATOR_NODES)
    return True


def check_finite(matrix: Matrix) -> None:
    """Refuse a matrix whose singular values would not be finite in the float32 store.

    Raises
    ------
    DecompositionError
        Naming how many NaN, +Inf and −Inf entries the matrix holds, or, for finite entries
        so large that σ₁ exceeds the largest float32 (3.4e38), the value of σ₁.
    """
    array = _as_array(matrix)
    # Two passes without temporaries: NaN and ±Inf show in the extremes, and the largest entry
    # times √(mn) bounds the Frobenius norm, itself a bound on σ₁.
    if array.size:
        peak = max(abs(float(array.min())), abs(float(array.max())))
        if np.isfinite(peak) and peak * float(np.sqrt(array.size)) <= _LARGEST:
            return
    if bool(np.isfinite(array).all()):
        if float(np.linalg.norm(array.astype(np.float64).ravel())) <= _LARGEST:
            return
        top = float(np.linalg.norm(array.astype(np.float64), ord=2))
        if top <= _LARGEST:
            return
        raise DecompositionError(
            f"singular values beyond the float32 range of the store (σ₁ = {top:.3g} > "
            f"{_LARGEST:.3g}); such weights usually mean the run diverged"
        )
    counts = {
        "NaN": int(np.isnan(array).sum()),
        "+Inf": int(np.isposinf(array).sum()),
        "-Inf": int(np.isneginf(array).sum()),
    }
    found = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
    raise DecompositionError(f"non-finite entries ({found} of {array.size})")


def decompose(matrix: Matrix, top_k: int, device: str | torch.device | None = None) -> Spectrum:
    """Decompose one matrix: all singular values, top-k singular vectors, signs fixed.

    Parameters
    ----------
    matrix
        An (m, n) floating array or tensor; float32 and float64 are read as they are, other
        floating types are upcast to float32 first.
    top_k
        How many singular vectors to keep; at most min(m, n) are kept.
    device
        Where to compute (as `resolve_device` names it, or a torch device); the CPU by default.

    Returns
    -------
    Spectrum
        σ (min(m, n),), u (m, k) and v (n, k), all float32.

    Raises
    ------
    DecompositionError
        When the matrix holds NaN or ±Inf, or singular values beyond the float32 range.
    """
    return decompose_batch([matrix], top_k, device)[0]


def decompose_batch(
    matrices: Matrix | Sequence[Matrix],
    top_k: int,
    device: str | torch.device | None = None,
    *,
    side_by_side: int = 0,
    checked: bool = False,
) -> list[Spectrum]:
    """Decompose several matrices: a (B, m, n) stack, or a sequence of any shapes.

    On the CPU each matrix takes the tridiagonal route, in this thread or on a pool of threads
    shared by every caller (the BLAS and LAPACK calls release Python's lock); on a CUDA device
    same-shaped matrices are stacked and decomposed in batched passes.

    Parameters
    ----------
    matrices
        Floating (m, n) arrays or tensors, the latter on any device.
    top_k
        How many singular vectors to keep per matrix; at most min(m, n) are kept.
    device
        Where to compute; the CPU by default.
    side_by_side
        On the CPU: 0 decomposes one matrix after another in this thread; N hands them to the
        pool of N threads that every caller asking for N shares, so N is the most decomposed
        at once however many callers there are. Call inside `one_blas_thread`, so that each
        uses one core.
    checked
        Whether the caller has already passed every matrix through `check_finite`.

    Returns
    -------
    list of Spectrum
        One per matrix, in order.

    Raises
    ------
    DecompositionError
        When any matrix holds NaN or ±Inf (see `check_finite`); the caller checks each matrix
        first when one bad matrix should not fail the others.
    """
    if not checked:
        for matrix in matrices:
            check_finite(matrix)
    if device is None or str(device) == "cpu":
        arrays = [_as_array(matrix) for matrix in matrices]
        if side_by_side < 1:
            return [decompose_on_cpu(array, top_k) for array in arrays]
        pool = _pool(side_by_side)
        futures = [pool.submit(decompose_on_cpu, array, top_k) for array in arrays]
        wait(futures)  # all of them, even when one fails, before anything is raised
        return [future.result() for future in futures]
    import torch

    device = torch.device(device)
    if isinstance(matrices, torch.Tensor):
        return _decompose_on_device(matrices, top_k, device)
    tensors = [torch.as_tensor(matrix) for matrix in matrices]

    # Same-shaped matrices go to the device together, as many as fit a float64 budget.
    out: list[Spectrum | None] = [None] * len(tensors)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, matrix in enumerate(tensors):
        by_shape.setdefault(tuple(matrix.shape), []).append(index)
    for (m, n), indices in by_shape.items():
        per_pass = max(1, _DEVICE_BUDGET_BYTES // (8 * (m * n + min(m, n) ** 2)))
        for start in range(0, len(indices), per_pass):
            chosen = indices[start : start + per_pass]
            stack = torch.stack([tensors[i] for i in chosen])  # (B, m, n)
            spectra = _decompose_on_device(stack, top_k, device)
            for index, spectrum in zip(chosen, spectra, strict=True):
                out[index] = spectrum
    return [spectrum for spectrum in out if spectrum is not None]


def _pool(size: int) -> ThreadPoolExecutor:
    """The threads that decompose matrices side by side: one pool per size, shared."""
    with _limit_lock:
        if size not in _pools:
            _pools[size] = ThreadPoolExecutor(size, thread_name_prefix="spectrum-decompose")
        return _pools[size]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Keep BLAS and LAPACK to one thread process-wide, and torch in this thread, while inside.

    Parallel work then comes from threads or processes that each decompose one matrix, which
    is faster for weight-sized matrices than threads inside each call. The BLAS limit is
    counted across nested and concurrent use (worker threads inside a run) and lifted when the
    last leaves. Enter it first from the main thread: OpenBLAS has been seen here to ignore a
    count set from another thread (Dask's worker processes start with one BLAS thread
    anyway). Torch's thread count belongs to each thread: each caller's is set to one, and
    back to the count found by the first to enter. Torch is left alone when nothing has
    imported it.
    """
    global _blas_limit, _blas_users, _torch_threads
    torch = sys.modules.get("torch")
    if torch is not None:
        # Another thread may be importing it now (reading a torch.save file): importing it
        # here too waits for that to finish, where the half-made module would lack functions.
        torch = importlib.import_module("torch")
    with _limit_lock:
        if _blas_users == 0:
            from threadpoolctl import threadpool_limits

            # Every BLAS this engine calls is loaded by now (lapack imports SciPy's); a
            # library loaded after the limit is set would keep its own thread count.
            _blas_limit = threadpool_limits(limits=1, user_api="blas")
            if torch is not None:
                _torch_threads = torch.get_num_threads()
        _blas_users += 1
    if torch is not None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _limit_lock:
            if torch is not None:
                torch.set_num_threads(_torch_threads)
            _blas_users -= 1
            if _blas_users == 0 and _blas_limit is not None:
                _blas_limit.restore_original_limits()
                _blas_limit = None


def decompose_on_cpu(matrix: np.ndarray, top_k: int) -> Spectrum:
    """Decompose one finite (m, n) float32 or float64 array by the tridiagonal route.

    Parameters
    ----------
    matrix
        The matrix; it is not copied whole (float32 rows are converted a block at a time).
    top_k
        How many singular vectors to keep; at most min(m, n) are kept.

    Returns
    -------
    Spectrum
        σ descending, top-k u and v with fixed signs, float32.

    Raises
    ------
    DecompositionError
        When the result does not fit float32 (`check_finite` says why beforehand).
    """
    # Work on the tall orientation: a wide (m < n) matrix is decomposed as its transpose (a view).
    wide = matrix.shape[0] < matrix.shape[1]
    w = matrix.T if wide else matrix  # (rows, cols), rows ≥ cols
    rows, cols = w.shape
    k = min(top_k, cols)

    # Eigenvalues of the float64 Gram matrix WᵀW (cols, cols), ascending, with the top-k vectors.
    gram = _gram(w)
    evals, evecs = _top_eigenpairs(gram, k)
    sigma = np.sqrt(np.clip(evals[::-1], 0.0, None))  # (cols,), descending
    right = evecs[:, ::-1]  # (cols, k)

    # Left vectors follow as W v / σ where σ is safely non-zero; else a direct SVD.
    tolerance = _ZERO_TOLERANCE * max(rows, cols) * sigma[0] if cols else 0.0
    if k and not sigma[k - 1] > tolerance:
        left, sigma, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        left, right = left[:, :k], vh[:k].T
    else:
        left = _times(w, right) / sigma[:k]  # (rows, k)

    if wide:
        left, right = right, left  # back to (m, k) and (n, k)
    left, right = _fix_signs(left[None], right[None])
    return _spectrum(sigma, left[0], right[0])


def _as_array(matrix: Matrix) -> np.ndarray:
    """The matrix as a CPU array, float32 or float64, without a copy where it can be."""
    if not isinstance(matrix, np.ndarray):
        import torch

        if matrix.dtype not in (torch.float32, torch.float64):
            matrix = matrix.to(torch.float32)
        return matrix.detach().cpu().numpy()
    if matrix.dtype in (np.float32, np.float64):
        return matrix
    return matrix.astype(np.float32)


def _row_blocks(w: np.ndarray) -> list[slice]:
    """Slices of rows holding about ``_BLOCK_BYTES`` of float64 each."""
    rows, cols = w.shape
    step = max(64, _BLOCK_BYTES // (8 * max(cols, 1)))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _float64(block: np.ndarray) -> np.ndarray:
    """A block of rows in float64 and contiguous, in this thread's reusable buffer if copied.

    Reusing one buffer per thread, rather than allocating a fresh block each time, keeps
    worker threads of one process from contending for new memory pages.
    """
    if block.dtype == np.float64 and (block.flags.c_contiguous or block.flags.f_contiguous):
        return block
    buffer = getattr(_scratch, "block", None)
    if buffer is None or buffer.size < block.size:
        buffer = _scratch.block = np.empty(max(block.size, _BLOCK_BYTES // 8))
    # Keep the block's own layout: rows apart (C) or columns apart (F, a transposed view).
    columns_apart = block.ndim == 2 and block.strides[0] < block.strides[1]
    out = buffer[: block.size].reshape(block.shape, order="F" if columns_apart else "C")
    np.copyto(out, block)
    return out


def _gram(w: np.ndarray) -> np.ndarray:
    """The lower triangle of WᵀW in float64 (cols, cols), accumulated over blocks of rows.

    The result lives in this thread's reusable buffer until the thread's next call.
    """
    cols = w.shape[1]
    buffer = getattr(_scratch, "gram", None)
    if buffer is None or buffer.size < cols * cols:
        buffer = np.empty(cols * cols)
        if buffer.nbytes <= _KEPT_GRAM_BYTES:  # larger ones are not kept between calls
            _scratch.gram = buffer
    gram = buffer[: cols * cols].reshape((cols, cols), order="F")
    gram.fill(0.0)
    for rows in _row_blocks(w):
        lapack.syrk_lower(gram, _float64(w[rows]))  # += blockᵀ block, block (b, cols)
    return gram


def _times(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W x in float64 (rows, k), converting W a block of rows at a time."""
    out = np.empty((w.shape[0], x.shape[1]), dtype=np.float64)
    for rows in _row_blocks(w):
        out[rows] = _float64(w[rows]) @ x
    return out


def _top_eigenpairs(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (ascending) of a symmetric matrix and the eigenvectors of the top k.

    Only the lower triangle of ``gram`` (Fortran order) is read, and it is overwritten. The
    matrix is reduced to tridiagonal form once; values and vectors both come from that
    reduction.
    """
    n = gram.shape[0]
    if n <= _SMALL:
        evals, evecs = np.linalg.eigh(gram, UPLO="L")
        return evals, evecs[:, n - k :]

    # Reduce: gram = Q T Qᵀ, T tridiagonal (d, e), Q as reflectors below the subdiagonal.
    d, e, tau, info = lapack.sytrd_lower(gram)
    _check_lapack("dsytrd", info)

    # All eigenvalues of T, ascending.
    evals, info = lapack.sterf(d, e)
    _check_lapack("dsterf", info)

    # The top-k eigenvectors of T by inverse iteration from those values (by MRRR where that
    # does not converge), carried back by Q.
    vectors = np.zeros((n, 0))
    if k:
        vectors, info = lapack.stein(d, e, evals[n - k :])  # (n, k)
        if info > 0:
            try:
                _, vectors, info = lapack.stemr_top(d, e, k)
            except ArithmeticError as error:
                raise DecompositionError(str(error)) from None
            _check_lapack("dstemr", info)
        else:
            _check_lapack("dstein", info)
        _check_lapack("dormqr", lapack.apply_reflectors(gram, tau, vectors))
    return evals, vectors


def _check_lapack(routine: str, info: int) -> None:
    if info != 0:
        raise DecompositionError(f"LAPACK {routine} did not converge (info {info})")


def _spectrum(sigma: np.ndarray, left: np.ndarray, right: np.ndarray) -> Spectrum:
    """Store-ready float32 arrays, with a last guard that nothing non-finite gets through."""
    top = float(np.max(sigma)) if sigma.size else 0.0
    if 0.0 < top < _SMALLEST:
        raise DecompositionError(
            f"singular values below the float32 range of the store (σ₁ = {top:.3g} < "
            f"{_SMALLEST:.3g}); rescale the weights, or check that they were saved as trained"
        )
    out = Spectrum(
        sigma=np.ascontiguousarray(sigma, dtype=np.float32),
        u=np.ascontiguousarray(left, dtype=np.float32),
        v=np.ascontiguousarray(right, dtype=np.float32),
    )
    for values in (out.sigma, out.u, out.v):
        if not np.isfinite(values).all():
            raise DecompositionError("the decomposition gave values that float32 cannot hold")
    return out


def _decompose_on_device(
    matrices: torch.Tensor, top_k: int, device: torch.device
) -> list[Spectrum]:
    """Decompose a stack (B, m, n) on an accelerator in one batched float64 pass.

    On a CUDA device each calling thread works on a stream of its own, from pinned host
    memory, so one worker's copies overlap another's decompositions.
    """
    import torch

    if device.type != "cuda":
        return _decompose_stack(matrices, top_k, device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = getattr(_scratch, "stream", None)
    if stream is None or stream.device != device:
        stream = _scratch.stream = torch.cuda.Stream(device)
    # Inputs made on the caller's stream are ready before this stream reads them.
    stream.wait_stream(torch.cuda.current_stream(device))
    if not matrices.is_cuda:
        matrices = matrices.pin_memory()
    with torch.cuda.stream(stream):
        return _decompose_stack(matrices, top_k, device)


def _decompose_stack(matrices: torch.Tensor, top_k: int, device: torch.device) -> list[Spectrum]:
    """`_decompose_on_device` on the current stream."""
    import torch

    batch, m, n = matrices.shape

    # Work on the tall orientation: a wide (m < n) matrix is decomposed as its transpose.
    wide = m < n
    w = matrices.to(device=device, non_blocking=True).to(torch.float64)
    if wide:
        w = w.transpose(1, 2)  # (B, n, m): tall
    rows, cols = w.shape[1:]
    k = min(top_k, cols)

    # Eigen-decompose the float64 Gram matrix WᵀW (B, cols, cols); eigenvalues ascend.
    gram = w.transpose(1, 2) @ w
    evals, evecs = torch.linalg.eigh(gram)
    sigma = evals.flip(-1).clamp_min(0).sqrt()  # (B, cols), descending
    right = evecs.flip(-1)[..., :k]  # (B, cols, k)

    # Left vectors follow as W v / σ where σ is safely non-zero.
    tolerance = _ZERO_TOLERANCE * max(rows, cols) * sigma[:, :1]
    safe = bool((sigma[:, k - 1 : k] > tolerance).all()) if k else True
    if safe:
        left = (w @ right) / sigma[:, None, :k]  # (B, rows, k)
    else:
        left, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        left, right = left[..., :k], vh.transpose(1, 2)[..., :k]

    if wide:
        left, right = right, left  # back to (B, m, k) and (B, n, k)
    left, right = _fix_signs(left, right)
    host = [t.to(torch.float32).to("cpu", non_blocking=True) for t in (sigma, left, right)]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    sigma, left, right = (t.numpy() for t in host)
    return [_spectrum(sigma[i], left[i], right[i]) for i in range(batch)]


def _fix_signs(left, right):
    """Flip each (u, v) pair so the largest-magnitude entry of u is positive.

    Works on stacks (B, rows, k) of NumPy arrays or torch tensors alike.
    """
    if left.shape[-1] == 0:
        return left, right
    if isinstance(left, np.ndarray):
        peak = np.abs(left).argmax(axis=-2)[:, None, :]  # (B, 1, k)
        signs = np.sign(np.take_along_axis(left, peak, axis=-2))
        signs[signs == 0] = 1.0
        return left * signs, right * signs
    import torch

    peak = left.abs().argmax(dim=-2, keepdim=True)  # (B, 1, k)
    signs = torch.sign(torch.gather(left, -2, peak))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return left * signs, right * signs
