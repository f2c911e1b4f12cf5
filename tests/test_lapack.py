"""The BLAS and LAPACK routines called without Python's lock, against NumPy's float64 results."""

from __future__ import annotations

import numpy as np
import pytest

from spectrum_cli import lapack


def symmetric(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, n + 3))
    return np.asfortranarray(x @ x.T)  # (n, n), positive definite


@pytest.mark.parametrize("order", ["C", "F"])
def test_syrk_adds_the_gram_matrix_of_a_block_in_either_order(order):
    block = np.asarray(np.random.default_rng(1).standard_normal((70, 40)), order=order)
    gram = np.asfortranarray(np.eye(40))

    lapack.syrk_lower(gram, block)

    expected = np.eye(40) + block.T @ block
    np.testing.assert_allclose(np.tril(gram), np.tril(expected), rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3, 45, 130])
def test_tridiagonal_route_gives_every_eigenvalue_and_the_top_eigenvectors(n):
    a = symmetric(n, seed=n)
    values, vectors = np.linalg.eigh(a)
    k = min(7, n)

    d, e, tau, info = lapack.sytrd_lower(a.copy(order="F"))
    assert info == 0
    reduced = a.copy(order="F")
    lapack.sytrd_lower(reduced)
    every, info = lapack.sterf(d, e)
    assert info == 0
    top, z, info = lapack.stemr_top(d, e, k)
    assert info == 0
    assert lapack.apply_reflectors(reduced, tau, z) == 0
    by_values, info = lapack.stein(d, e, every[-k:])
    assert info == 0
    assert lapack.apply_reflectors(reduced, tau, by_values) == 0

    scale = values[-1]
    np.testing.assert_allclose(every, values, atol=1e-12 * scale)
    np.testing.assert_allclose(top, values[-k:], atol=1e-12 * scale)
    # Eigenvectors up to sign: |zᵀ v| = 1 column by column, by MRRR and by inverse iteration.
    for found in (z, by_values):
        overlap = np.abs(np.sum(found * vectors[:, -k:], axis=0))
        np.testing.assert_allclose(overlap, 1.0, atol=1e-8)


def test_inverse_iteration_keeps_the_vectors_of_a_cluster_orthonormal():
    # Eigenvalues 5 + 1e-9 i (ten of them), far above the rest: one tight cluster on top.
    n, k = 60, 10
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.concatenate([rng.uniform(0.1, 1.0, n - k), 5 + 1e-9 * np.arange(k)])
    a = np.asfortranarray((q * values) @ q.T)
    reduced = a.copy(order="F")
    d, e, tau, _ = lapack.sytrd_lower(reduced)
    every, _ = lapack.sterf(d, e)

    z, info = lapack.stein(d, e, every[-k:])
    assert info == 0
    lapack.apply_reflectors(reduced, tau, z)

    np.testing.assert_allclose(z.T @ z, np.eye(k), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(a @ z - z * every[-k:], axis=0), 0, atol=1e-12 * 5)
    # They span the cluster's eigenspace: its projector is q_top q_topᵀ.
    top = q[:, -k:]
    np.testing.assert_allclose(z @ z.T, top @ top.T, atol=1e-8)


def test_inputs_in_the_wrong_layout_are_refused():
    with pytest.raises(ValueError, match="Fortran order"):
        lapack.sytrd_lower(np.ascontiguousarray(symmetric(5, seed=0)))
    with pytest.raises(ValueError, match="float64"):
        lapack.syrk_lower(np.zeros((4, 4), order="F"), np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="expected"):
        lapack.syrk_lower(np.zeros((4, 4), order="F"), np.ones((3, 5)))


@pytest.mark.parametrize(
    "call",
    [
        lambda: lapack.sytrd_lower(np.zeros((20000, 1), order="F")),
        lambda: lapack.sytrd_lower(np.zeros(20000)),
        lambda: lapack.apply_reflectors(
            np.asfortranarray(np.eye(3)), np.ones(2), np.asfortranarray(np.ones((20000, 4)))
        ),
        lambda: lapack.apply_reflectors(
            np.asfortranarray(np.eye(5)), np.ones(1), np.asfortranarray(np.ones((5, 2)))
        ),
        lambda: lapack.sterf(np.ones(2_000_000), np.ones(1)),
        lambda: lapack.stemr_top(np.ones(5), np.ones(4), 0),
        lambda: lapack.stemr_top(np.ones(5), np.ones(4), 6),
        lambda: lapack.stemr_top(np.ones(5), np.ones(2), 2),
        lambda: lapack.stein(np.ones(5), np.ones(4), np.ones(6)),
        lambda: lapack.stein(np.ones(5), np.ones(4), np.ones((2, 2))),
        lambda: lapack.stein(np.ones(5), np.ones(2), np.ones(2)),
    ],
)
def test_sizes_that_would_send_lapack_past_its_arrays_are_refused(call):
    # Each of these would read or write outside an array: refused before LAPACK runs.
    with pytest.raises(ValueError):
        call()
