"""Cross-layer alignment: how the outputs of one matrix line up with the inputs of the next.

For consecutive matrices W_ℓ (m_ℓ × n_ℓ) and W_ℓ₊₁ whose sizes connect, Yunis et al.
(arXiv 2408.11804) compare the left singular vectors of W_ℓ with the right singular vectors of
W_ℓ₊₁:

    A_jk = |u_j(W_ℓ) · v_k(W_ℓ₊₁)|

and score the pair by the mean of the first 10 diagonal entries, as for agreement.

Which pairs connect is read from the shapes, in the checkpoint's own tensor order:

- *dense*: W_ℓ₊₁ takes as many inputs as W_ℓ gives outputs, n_ℓ₊₁ = m_ℓ;
- *convolution*: both are kernels (out, in, k…) of one dimensionality and in_ℓ₊₁ = out_ℓ.
  The next kernel's right vectors, of length in·k…, are reshaped to (in, k…) and the centre
  kernel position (index k // 2 along each kernel axis) is kept, as in the paper's code, and
  not rescaled: the cut vector is shorter than 1 by whatever weight the kernel's other
  positions carry, so A stays in [0, 1] and is smaller the less the centre matters.

Anything else (a convolution flattened into a dense layer, say) does not connect by size and
is skipped; a pair can still be named explicitly when its sizes connect.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from spectrum_cli.metrics.agreement import diagonal_score

DENSE = "dense"
CONVOLUTION = "convolution"


def connection(
    prev_tensor_shape: Sequence[int],
    prev_matrix_shape: Sequence[int],
    next_tensor_shape: Sequence[int],
    next_matrix_shape: Sequence[int],
) -> str | None:
    """How the output of one matrix feeds the next, or None when the sizes do not connect.

    Parameters
    ----------
    prev_tensor_shape, prev_matrix_shape
        The earlier layer's stored tensor shape and its (m, n) as a matrix.
    next_tensor_shape, next_matrix_shape
        The same for the later layer.

    Returns
    -------
    str or None
        :data:`CONVOLUTION` for a kernel after a kernel whose channels match, :data:`DENSE`
        when n_next equals m_prev, else None.
    """
    prev_kernel, next_kernel = len(prev_tensor_shape) >= 3, len(next_tensor_shape) >= 3
    if (
        prev_kernel
        and next_kernel
        and len(prev_tensor_shape) == len(next_tensor_shape)
        and next_tensor_shape[1] == prev_tensor_shape[0]
    ):
        return CONVOLUTION
    if next_matrix_shape[1] == prev_matrix_shape[0]:
        return DENSE
    return None


def connected_pairs(
    layers: Sequence[str],
    tensor_shapes: dict[str, Sequence[int]],
    matrix_shapes: dict[str, Sequence[int]],
) -> list[tuple[str, str, str]]:
    """Consecutive layers whose sizes connect, in the order given.

    Parameters
    ----------
    layers
        Layer names in the checkpoint's tensor order.
    tensor_shapes, matrix_shapes
        Each layer's stored tensor shape and (m, n).

    Returns
    -------
    list of (str, str, str)
        ``(layer, next_layer, how)`` with ``how`` as :func:`connection` returns it.
    """
    pairs = []
    for prev, nxt in pairwise(layers):
        how = connection(
            tensor_shapes[prev], matrix_shapes[prev], tensor_shapes[nxt], matrix_shapes[nxt]
        )
        if how is not None:
            pairs.append((prev, nxt, how))
    return pairs


def kernel_centre_vectors(v: np.ndarray, tensor_shape: Sequence[int]) -> np.ndarray:
    """Right singular vectors of a kernel, cut to the centre kernel position (not rescaled).

    Parameters
    ----------
    v
        Right singular vectors ``(..., in·k…, k)`` of a kernel flattened to out × (in·k…).
    tensor_shape
        The kernel's shape (out, in, k…).

    Returns
    -------
    numpy.ndarray
        ``(..., in, k)`` float64: entry (c, j) is v_j at channel c and the centre position.
    """
    channels, kernel = int(tensor_shape[1]), tuple(int(s) for s in tensor_shape[2:])
    lead, count = v.shape[:-2], v.shape[-1]
    grid = np.asarray(v, dtype=np.float64).reshape(*lead, channels, *kernel, count)
    # (..., in·k…, k) → (..., in, k…, k); keep the centre of every kernel axis → (..., in, k).
    centre: tuple[Any, ...] = (Ellipsis, slice(None), *(size // 2 for size in kernel), slice(None))
    return grid[centre]


def alignment_matrix(u_prev: np.ndarray, v_next: np.ndarray, n: int | None = None) -> np.ndarray:
    """A_jk = |u_j(W_ℓ) · v_k(W_ℓ₊₁)| for the first n directions of each.

    Parameters
    ----------
    u_prev
        Left singular vectors of the earlier matrix, ``(..., m, k₁)``.
    v_next
        Right singular vectors of the later one, ``(..., m, k₂)`` (cut to the kernel centre
        for a convolution, see :func:`kernel_centre_vectors`).
    n
        How many leading directions; by default all that both keep.

    Returns
    -------
    numpy.ndarray
        ``(..., n, n)`` float64; row j is the earlier matrix's direction j.
    """
    n = _count(u_prev, v_next, n)
    u = np.asarray(u_prev, dtype=np.float64)[..., :n]
    v = np.asarray(v_next, dtype=np.float64)[..., :n]
    return np.abs(np.swapaxes(u, -1, -2) @ v)  # (..., n, n)


def alignment_diagonal(u_prev: np.ndarray, v_next: np.ndarray, n: int | None = None) -> np.ndarray:
    """The diagonal A_jj of :func:`alignment_matrix`, ``(..., n)``, without the rest."""
    n = _count(u_prev, v_next, n)
    u = np.asarray(u_prev, dtype=np.float64)[..., :n]
    v = np.asarray(v_next, dtype=np.float64)[..., :n]
    return np.abs((u * v).sum(axis=-2))


def alignment_score(u_prev: np.ndarray, v_next: np.ndarray) -> np.ndarray:
    """The mean of A_jj over the first min(10, k) directions, ``(...)``."""
    return diagonal_score(alignment_diagonal(u_prev, v_next))


def _count(u_prev: np.ndarray, v_next: np.ndarray, n: int | None) -> int:
    if u_prev.shape[-2] != v_next.shape[-2]:
        raise ValueError(
            f"the earlier matrix gives {u_prev.shape[-2]} outputs but the later one takes "
            f"{v_next.shape[-2]} inputs: the sizes do not connect"
        )
    kept = min(u_prev.shape[-1], v_next.shape[-1])
    return kept if n is None else min(n, kept)
