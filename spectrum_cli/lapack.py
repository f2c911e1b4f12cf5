"""The BLAS and LAPACK routines the engine calls, without holding Python's lock.

SciPy's ``scipy.linalg.lapack`` wrappers keep the global interpreter lock while LAPACK runs,
so two threads decomposing two matrices take turns. The same routines are published, with
their C signatures, in SciPy's Cython API (``scipy.linalg.cython_blas`` and
``cython_lapack``); called through ``ctypes`` they release the lock, and worker threads of one
process decompose side by side. Each wrapper here takes NumPy arrays in Fortran order, checks
what it is given and returns LAPACK's outputs; none allocates more than its workspace.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import numpy as np

# Importing these loads SciPy's BLAS and LAPACK now, so thread limits set later reach them.
from scipy.linalg import cython_blas, cython_lapack

_DOUBLE = np.dtype(np.float64)


@cache
def _routine(library: Any, name: str) -> Any:
    """The C function ``name`` of SciPy's Cython BLAS or LAPACK API, callable from ctypes."""
    capsule = library.__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    signature = api.PyCapsule_GetName(capsule)
    # Every integer argument passed here is a C int: refuse any other integer width.
    if b"int *" not in signature or any(wide in signature for wide in (b"long", b"int64")):
        raise RuntimeError(f"SciPy's {name} has an unexpected signature: {signature.decode()}")
    address = api.PyCapsule_GetPointer(capsule, signature)
    # CFUNCTYPE (not PYFUNCTYPE): ctypes releases the interpreter lock for the call.
    return ctypes.CFUNCTYPE(None)(address)


def _int(value: int) -> Any:
    return ctypes.byref(ctypes.c_int(value))


def _char(value: str) -> ctypes.c_char_p:
    return ctypes.c_char_p(value.encode())


def _at(array: np.ndarray, row: int = 0, col: int = 0) -> ctypes.c_void_p:
    """The address of ``array[row, col]`` (or of ``array[row]`` for a vector)."""
    offset = row * array.strides[0] + (col * array.strides[1] if col else 0)
    return ctypes.c_void_p(array.ctypes.data + offset)


def _check(array: np.ndarray, name: str, shape: tuple[int, ...]) -> None:
    """Refuse what LAPACK would read past or misread: wrong shape, dtype, order or access."""
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    if array.dtype != _DOUBLE or not array.flags.f_contiguous:
        raise ValueError(f"{name} must be a float64 array in Fortran order")
    if not array.flags.writeable:
        raise ValueError(f"{name} must be writeable")


def _vector(array: np.ndarray, name: str, size: int) -> np.ndarray:
    """A float64 copy of a vector of at least ``size`` entries."""
    vector = np.array(array, dtype=np.float64).ravel()
    if array.ndim != 1 or vector.size < size:
        raise ValueError(f"{name} must be a vector of {size} entries, got shape {array.shape}")
    return vector


def syrk_lower(gram: np.ndarray, block: np.ndarray) -> None:
    """Add ``blockᵀ block`` to the lower triangle of ``gram`` (cols, cols), in place.

    ``block`` (rows, cols) is float64 in either memory order; ``gram`` is Fortran-ordered.
    """
    if block.dtype != _DOUBLE or block.ndim != 2:
        raise ValueError("block must be a float64 matrix")
    rows, cols = block.shape
    _check(gram, "gram", (cols, cols))
    # BLAS reads Fortran order: a C-ordered (rows, cols) block is its transpose there.
    if block.flags.c_contiguous:
        trans, lda = "N", max(1, cols)
    elif block.flags.f_contiguous:
        trans, lda = "T", max(1, rows)
    else:
        raise ValueError("block must be contiguous")
    one = ctypes.c_double(1.0)
    _routine(cython_blas, "dsyrk")(
        _char("L"), _char(trans), _int(cols), _int(rows), ctypes.byref(one), _at(block),
        _int(lda), ctypes.byref(one), _at(gram), _int(max(1, cols)),
    )  # fmt: skip


def sytrd_lower(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Reduce a symmetric (n, n) matrix, lower triangle given, to tridiagonal form in place.

    Returns
    -------
    d, e, tau, info
        The diagonal (n,), the subdiagonal (n − 1,), the reflectors' scales (n − 1,), and
        LAPACK's status (0 on success). The reflectors stay below the subdiagonal of ``a``.
    """
    n = a.shape[0] if a.ndim == 2 else -1
    _check(a, "a", (n, n))
    d, e, tau = np.empty(n), np.empty(max(n - 1, 0)), np.empty(max(n - 1, 0))
    lwork = max(1, n * 64)
    work, info = np.empty(lwork), ctypes.c_int(0)
    _routine(cython_lapack, "dsytrd")(
        _char("L"), _int(n), _at(a), _int(max(1, n)), _at(d), _at(e), _at(tau), _at(work),
        _int(lwork), ctypes.byref(info),
    )  # fmt: skip
    return d, e, tau, info.value


def stemr_top(d: np.ndarray, e: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The k largest eigenpairs of the symmetric tridiagonal matrix (d, e), by MRRR.

    ``d`` (n,) and ``e`` (n − 1,) are not changed.

    Returns
    -------
    values, vectors, info
        Eigenvalues (k,) ascending, eigenvectors (n, k) in Fortran order, LAPACK's status.

    Raises
    ------
    ArithmeticError
        When LAPACK reports success but found another number of eigenpairs.
    """
    n = d.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n}, got {k}")
    diagonal = _vector(d, "d", n)
    padded = np.zeros(n)  # dstemr's e holds n entries, the last one workspace
    padded[: n - 1] = _vector(e, "e", n - 1)[: n - 1]
    values, vectors = np.empty(n), np.empty((n, max(k, 1)), order="F")
    support = np.empty(2 * max(k, 1), dtype=np.int32)
    lwork, liwork = 18 * n, 10 * n
    work, iwork = np.empty(lwork), np.empty(liwork, dtype=np.int32)
    found, tryrac, info = ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(0)
    zero = ctypes.c_double(0.0)
    _routine(cython_lapack, "dstemr")(
        _char("V"), _char("I"), _int(n), _at(diagonal), _at(padded), ctypes.byref(zero),
        ctypes.byref(zero), _int(n - k + 1), _int(n), ctypes.byref(found), _at(values),
        _at(vectors), _int(n), _int(k), _at(support), ctypes.byref(tryrac), _at(work),
        _int(lwork), _at(iwork), _int(liwork), ctypes.byref(info),
    )  # fmt: skip
    if info.value == 0 and found.value != k:
        raise ArithmeticError(f"dstemr found {found.value} of the top {k} eigenpairs")
    return values[:k], vectors[:, :k], info.value


def stein(d: np.ndarray, e: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int]:
    """Eigenvectors of the symmetric tridiagonal matrix (d, e) for the given eigenvalues.

    Inverse iteration (``dstein``), with the vectors of close eigenvalues reorthogonalised.
    ``values`` (k,) ascending are eigenvalues of (d, e), e.g. from `sterf`; ``d`` (n,) and
    ``e`` (n − 1,) are not changed.

    Returns
    -------
    vectors, info
        Eigenvectors (n, k) in Fortran order and LAPACK's status: above 0, the number of
        vectors that did not converge.
    """
    n = d.shape[0]
    k = values.shape[0] if values.ndim == 1 else -1
    if not 1 <= k <= n:
        raise ValueError(f"between 1 and {n} eigenvalues expected, got shape {values.shape}")
    diagonal = _vector(d, "d", n)
    off = _vector(e, "e", max(n - 1, 0))
    wanted = _vector(values, "values", k)
    vectors = np.empty((n, k), order="F")
    block = np.ones(k, dtype=np.int32)  # one block: (d, e) is taken whole, unsplit
    split = np.array([n], dtype=np.int32)
    work, iwork = np.empty(5 * n), np.empty(n, dtype=np.int32)
    failed, info = np.empty(k, dtype=np.int32), ctypes.c_int(0)
    _routine(cython_lapack, "dstein")(
        _int(n), _at(diagonal), _at(off), _int(k), _at(wanted), _at(block), _at(split),
        _at(vectors), _int(n), _at(work), _at(iwork), _at(failed), ctypes.byref(info),
    )  # fmt: skip
    return vectors, info.value


def apply_reflectors(reduced: np.ndarray, tau: np.ndarray, z: np.ndarray) -> int:
    """Carry eigenvectors of the tridiagonal matrix back: z ← Q z, in place (``dormtr``, 'L').

    ``reduced`` is what `sytrd_lower` left in ``a`` (n, n); ``z`` (n, k) is Fortran-ordered.
    Returns LAPACK's status.
    """
    n, k = z.shape if z.ndim == 2 else (-1, -1)
    _check(z, "z", (n, k))
    _check(reduced, "reduced", (n, n))
    if n < 2 or k == 0:
        return 0
    tau = _vector(tau, "tau", n - 1)
    # Reflector i lives in reduced[i + 1 :, i]: a QR factor of reduced[1:, : n - 1].
    lwork = max(1, k * 64 + 65 * 64)
    work, info = np.empty(lwork), ctypes.c_int(0)
    _routine(cython_lapack, "dormqr")(
        _char("L"), _char("N"), _int(n - 1), _int(k), _int(n - 1), _at(reduced, 1, 0),
        _int(n), _at(tau), _at(z, 1, 0), _int(n), _at(work), _int(lwork), ctypes.byref(info),
    )  # fmt: skip
    return info.value


def sterf(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, int]:
    """All eigenvalues of the symmetric tridiagonal matrix (d, e), ascending; d and e are kept.

    Returns
    -------
    values, info
        The eigenvalues (n,) and LAPACK's status.
    """
    n = d.shape[0]
    values = _vector(d, "d", n)
    scratch = _vector(e, "e", max(n - 1, 0))
    info = ctypes.c_int(0)
    _routine(cython_lapack, "dsterf")(
        _int(values.shape[0]), _at(values), _at(scratch), ctypes.byref(info)
    )
    return values, info.value
