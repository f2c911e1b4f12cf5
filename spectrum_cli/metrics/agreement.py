"""Singular-vector agreement between two matrices of one shape.

Yunis et al. (arXiv 2408.11804) measure how settled a matrix's singular directions are by
comparing its decomposition at step t with that at a reference step T:

    S_ij = |(u_i(t) · u_j(T)) (v_i(t) · v_j(T))|

S_ii is 1 when direction i is unchanged and 0 when it is orthogonal to where it ends; the
product of the left and right overlaps makes S blind to the sign of a singular pair, which an
SVD leaves free. The *score* is the mean of the first 10 diagonal entries (or of all of them,
when fewer are kept). The same comparison serves for two checkpoints of one network (linear
mode connectivity) and for a matrix against its masked self (lottery tickets).

Vectors are columns, ``u`` of shape ``(..., m, k)`` and ``v`` of shape ``(..., n, k)``, as the
store keeps them; leading axes broadcast, so one reference compares against many steps.
Stored vectors are float32, unit to within its rounding, so an overlap can come out a few
parts in 10⁹ above 1: entries are capped at 1, which no true overlap exceeds.
"""

from __future__ import annotations

import numpy as np

#: The score averages the diagonal over this many leading indices.
SCORE_INDICES = 10


def agreement_matrix(
    u_a: np.ndarray, v_a: np.ndarray, u_b: np.ndarray, v_b: np.ndarray, n: int | None = None
) -> np.ndarray:
    """The agreement S_ij = |(u_i(a) · u_j(b)) (v_i(a) · v_j(b))| of the first n directions.

    Parameters
    ----------
    u_a, v_a
        Left ``(..., m, k_a)`` and right ``(..., n, k_a)`` singular vectors of matrix a.
    u_b, v_b
        The same for matrix b, ``(..., m, k_b)`` and ``(..., n, k_b)``.
    n
        How many leading directions to compare; by default all that both keep.

    Returns
    -------
    numpy.ndarray
        ``(..., n, n)`` float64 in [0, 1] for unit vectors; row i is a's direction i.
    """
    n = _count(u_a, v_a, u_b, v_b, n)
    uu = np.swapaxes(_f64(u_a)[..., :n], -1, -2) @ _f64(u_b)[..., :n]  # (..., n, n)
    vv = np.swapaxes(_f64(v_a)[..., :n], -1, -2) @ _f64(v_b)[..., :n]  # (..., n, n)
    return np.minimum(np.abs(uu * vv), 1.0)


def agreement_diagonal(
    u_a: np.ndarray, v_a: np.ndarray, u_b: np.ndarray, v_b: np.ndarray, n: int | None = None
) -> np.ndarray:
    """The diagonal S_ii of :func:`agreement_matrix`, without forming the rest.

    Parameters
    ----------
    u_a, v_a, u_b, v_b
        As for :func:`agreement_matrix`.
    n
        How many leading directions to compare; by default all that both keep.

    Returns
    -------
    numpy.ndarray
        ``(..., n)`` float64.
    """
    n = _count(u_a, v_a, u_b, v_b, n)
    uu = (_f64(u_a)[..., :n] * _f64(u_b)[..., :n]).sum(axis=-2)  # (..., n)
    vv = (_f64(v_a)[..., :n] * _f64(v_b)[..., :n]).sum(axis=-2)  # (..., n)
    return np.minimum(np.abs(uu * vv), 1.0)


def diagonal_score(diagonal: np.ndarray) -> np.ndarray:
    """The mean of the first 10 diagonal entries ``(..., n)`` → ``(...)`` (all, if fewer)."""
    diagonal = np.asarray(diagonal, dtype=np.float64)
    if diagonal.shape[-1] == 0:
        raise ValueError("cannot score an empty diagonal: no singular vectors to compare")
    return diagonal[..., :SCORE_INDICES].mean(axis=-1)


def agreement_score(
    u_a: np.ndarray, v_a: np.ndarray, u_b: np.ndarray, v_b: np.ndarray
) -> np.ndarray:
    """The agreement score: mean of S_ii over the first min(10, k) directions.

    Parameters
    ----------
    u_a, v_a, u_b, v_b
        As for :func:`agreement_matrix`.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64 in [0, 1]; 1 for identical decompositions.
    """
    return diagonal_score(agreement_diagonal(u_a, v_a, u_b, v_b, SCORE_INDICES))


def _count(u_a, v_a, u_b, v_b, n: int | None) -> int:
    """Check that the vectors compare and return how many leading directions to use."""
    if u_a.shape[-2] != u_b.shape[-2] or v_a.shape[-2] != v_b.shape[-2]:
        raise ValueError(
            f"singular vectors of matrices of different shapes do not compare: "
            f"u {u_a.shape} against {u_b.shape}, v {v_a.shape} against {v_b.shape}"
        )
    if u_a.shape[-1] != v_a.shape[-1] or u_b.shape[-1] != v_b.shape[-1]:
        raise ValueError(
            f"u and v keep different numbers of vectors: {u_a.shape} and {v_a.shape}, "
            f"{u_b.shape} and {v_b.shape}"
        )
    kept = min(u_a.shape[-1], u_b.shape[-1])
    return kept if n is None else min(n, kept)


def _f64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)
