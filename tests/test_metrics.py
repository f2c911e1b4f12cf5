"""The metrics against values worked out by hand, and their invariants under hypothesis."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spectrum_cli.metrics.agreement import (
    agreement_diagonal,
    agreement_matrix,
    agreement_score,
    diagonal_score,
)
from spectrum_cli.metrics.alignment import (
    CONVOLUTION,
    DENSE,
    alignment_diagonal,
    alignment_matrix,
    alignment_score,
    connected_pairs,
    connection,
    kernel_centre_vectors,
)
from spectrum_cli.metrics.rank import (
    effective_rank,
    frobenius_norm,
    normalized_effective_rank,
    rank_summary,
    spectral_norm,
    stable_rank,
)


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random orthonormal columns ``(rows, cols)``."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def rotate(vectors: np.ndarray, i: int, j: int, theta: float) -> np.ndarray:
    """Rotate columns i and j by theta in their plane."""
    out = vectors.copy()
    c, s = math.cos(theta), math.sin(theta)
    out[:, i] = c * vectors[:, i] + s * vectors[:, j]
    out[:, j] = -s * vectors[:, i] + c * vectors[:, j]
    return out


# ---------------------------------------------------------------------------- rank


def test_effective_rank_by_hand():
    # p = (3/4, 1/4): H = -(3/4 ln 3/4 + 1/4 ln 1/4), erank = exp(H).
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(np.array([3.0, 1.0])) == pytest.approx(math.exp(entropy))
    assert effective_rank(np.ones(7)) == pytest.approx(7.0)
    assert effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)  # 0·ln 0 = 0
    assert effective_rank(np.zeros(4)) == 0.0
    assert normalized_effective_rank(np.ones(8)) == pytest.approx(1.0)
    assert normalized_effective_rank(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)


def test_effective_rank_reduces_the_last_axis():
    sigma = np.stack([np.ones(4), np.array([1.0, 0, 0, 0]), np.zeros(4)])  # (3, 4)
    assert effective_rank(sigma).tolist() == pytest.approx([4.0, 1.0, 0.0])
    assert effective_rank(np.ones((2, 5, 6))).shape == (2, 5)


def test_norms_and_stable_rank_match_the_matrix():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((30, 12))
    sigma = np.linalg.svd(w, compute_uv=False)
    assert spectral_norm(sigma) == pytest.approx(np.linalg.norm(w, 2))
    assert frobenius_norm(sigma) == pytest.approx(np.linalg.norm(w, "fro"))
    assert stable_rank(sigma) == pytest.approx(np.linalg.norm(w, "fro") ** 2 / sigma[0] ** 2)
    assert stable_rank(np.array([2.0, 1.0])) == pytest.approx(1.25)
    assert stable_rank(np.zeros(3)) == 0.0
    summary = rank_summary(sigma)
    assert set(summary) == {
        "effective_rank",
        "normalized_effective_rank",
        "stable_rank",
        "spectral_norm",
        "frobenius_norm",
    }


spectra = arrays(
    np.float64,
    st.integers(1, 40),
    elements=st.floats(0, 1e4, allow_nan=False, allow_subnormal=False),
)


@given(spectra, st.floats(1e-3, 1e3))
def test_effective_rank_bounds_and_scale_invariance(sigma, scale):
    nonzero = int((sigma > 0).sum())
    erank = float(effective_rank(sigma))
    if nonzero == 0:
        assert erank == 0.0
        return
    assert 1 - 1e-9 <= erank <= nonzero * (1 + 1e-9)
    assert float(effective_rank(sigma * scale)) == pytest.approx(erank, rel=1e-9)
    assert float(effective_rank(sigma[::-1])) == pytest.approx(erank, rel=1e-9)
    assert 0 < float(normalized_effective_rank(sigma)) <= 1 + 1e-9
    assert 1 - 1e-9 <= float(stable_rank(sigma)) <= nonzero * (1 + 1e-9)


# ---------------------------------------------------------------------------- agreement


def test_identical_decompositions_agree_fully():
    u, v = orthonormal(20, 6, 1), orthonormal(9, 6, 2)
    s = agreement_matrix(u, v, u, v)
    np.testing.assert_allclose(s, np.eye(6), atol=1e-12)
    assert agreement_score(u, v, u, v) == pytest.approx(1.0)


def test_float32_vectors_a_rounding_above_unit_agree_at_most_fully():
    # Stored vectors are float32: their norms, and so self-overlaps, can exceed 1 slightly.
    u = np.full((3, 1), np.float32(1 / np.sqrt(3)) * np.float32(1 + 2e-7), dtype=np.float32)
    v = np.ones((1, 1), dtype=np.float32)
    assert float(np.sum(u.astype(np.float64) ** 2)) > 1
    assert agreement_matrix(u, v, u, v)[0, 0] == 1.0
    assert agreement_diagonal(u, v, u, v)[0] == 1.0
    assert agreement_score(u, v, u, v) == 1.0


def test_rotated_pair_by_hand():
    # Rotate u_1, u_2 and v_1, v_2 by theta in their planes: u'_1·u_1 = v'_1·v_1 = cos theta,
    # u'_1·u_2 = v'_1·v_2 = sin theta, so S_11 = S_22 = cos² theta and S_12 = S_21 = sin² theta.
    theta = 0.3
    u, v = orthonormal(30, 10, 3), orthonormal(12, 10, 4)
    u_t, v_t = rotate(u, 0, 1, theta), rotate(v, 0, 1, theta)

    s = agreement_matrix(u_t, v_t, u, v)
    c2, s2 = math.cos(theta) ** 2, math.sin(theta) ** 2
    np.testing.assert_allclose(s[:2, :2], [[c2, s2], [s2, c2]], atol=1e-12)
    np.testing.assert_allclose(np.diag(s)[2:], 1.0, atol=1e-12)
    assert agreement_score(u_t, v_t, u, v) == pytest.approx((2 * c2 + 8) / 10)

    # Rotating only the left vectors leaves the right ones equal: S_11 = |cos theta|.
    assert agreement_diagonal(u_t, v, u, v)[0] == pytest.approx(math.cos(theta))


def test_score_takes_the_first_ten_or_all_when_fewer():
    assert diagonal_score(np.r_[np.ones(10), np.zeros(5)]) == pytest.approx(1.0)
    assert diagonal_score(np.array([1.0, 0.0, 0.5])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        diagonal_score(np.zeros(0))


def test_agreement_broadcasts_steps_against_a_reference():
    u, v = orthonormal(16, 4, 5), orthonormal(8, 4, 6)
    thetas = [0.0, 0.5, 1.0]
    u_t = np.stack([rotate(u, 0, 1, t) for t in thetas])  # (3, 16, 4)
    v_t = np.stack([v] * 3)  # (3, 8, 4)
    diagonal = agreement_diagonal(u_t, v_t, u, v)
    assert diagonal.shape == (3, 4)
    np.testing.assert_allclose(diagonal[:, 0], np.cos(thetas), atol=1e-12)
    assert agreement_matrix(u_t, v_t, u, v, n=2).shape == (3, 2, 2)


def test_agreement_refuses_other_shapes():
    u, v = orthonormal(16, 4, 5), orthonormal(8, 4, 6)
    with pytest.raises(ValueError, match="different shapes"):
        agreement_matrix(u, v, orthonormal(15, 4, 0), v)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(2, 12),
    st.integers(2, 12),
    st.integers(0, 2**31 - 1),
    st.lists(st.sampled_from([-1.0, 1.0]), min_size=12, max_size=12),
)
def test_agreement_in_unit_interval_and_blind_to_signs(m, n, seed, signs):
    k = min(m, n)
    u_a, v_a = orthonormal(m, k, seed), orthonormal(n, k, seed + 1)
    u_b, v_b = orthonormal(m, k, seed + 2), orthonormal(n, k, seed + 3)
    s = agreement_matrix(u_a, v_a, u_b, v_b)
    assert (s >= 0).all() and (s <= 1 + 1e-12).all()

    # An SVD may flip u_i and v_i together, or a caller one of them: S does not change.
    flips = np.asarray(signs[:k])
    np.testing.assert_allclose(agreement_matrix(u_a * flips, v_a * flips, u_b, v_b), s)
    np.testing.assert_allclose(agreement_matrix(u_a * flips, v_a, u_b, v_b), s)
    np.testing.assert_allclose(agreement_matrix(u_a, v_a, u_b * flips, v_b), s)
    np.testing.assert_allclose(np.diagonal(s), agreement_diagonal(u_a, v_a, u_b, v_b))


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (((64, 32), (64, 32)), ((10, 64), (10, 64)), DENSE),
        (((32, 1, 3, 3), (32, 9)), ((64, 32, 3, 3), (64, 288)), CONVOLUTION),
        (((16, 8, 1, 1), (16, 8)), ((4, 16, 1, 1), (4, 16)), CONVOLUTION),
        (((64, 32, 3, 3), (64, 288)), ((10, 1600), (10, 1600)), None),  # flattened: no
        (((64, 32, 3, 3), (64, 288)), ((10, 64), (10, 64)), DENSE),  # after global pooling
        (((64, 32), (64, 32)), ((10, 63), (10, 63)), None),
        (((8, 4, 3), (8, 12)), ((8, 8, 3, 3), (8, 72)), None),  # 1-D then 2-D kernels
    ],
)
def test_connection_by_size(before, after, expected):
    assert connection(before[0], before[1], after[0], after[1]) == expected


def test_connected_pairs_follow_tensor_order():
    layers = ["conv1", "conv2", "fc1", "fc2", "head"]
    tensor = {
        "conv1": (32, 1, 3, 3),
        "conv2": (64, 32, 3, 3),
        "fc1": (128, 1600),
        "fc2": (64, 128),
        "head": (10, 64),
    }
    matrix = {name: (shape[0], math.prod(shape[1:])) for name, shape in tensor.items()}
    assert connected_pairs(layers, tensor, matrix) == [
        ("conv1", "conv2", CONVOLUTION),
        ("fc1", "fc2", DENSE),
        ("fc2", "head", DENSE),
    ]


def test_kernel_centre_vectors_pick_the_centre_without_rescaling():
    # One right vector of a kernel (out, 2, 3, 3), as (in, kh, kw): 0.48 and 0.36 at the centre
    # of channels 0 and 1, and 0.8 at a corner of channel 1, so |v| = 1 while the centre slice
    # (0.48, 0.36) has length sqrt(0.2304 + 0.1296) = 0.6.
    kernel = np.zeros((2, 3, 3))
    kernel[0, 1, 1], kernel[1, 1, 1], kernel[1, 0, 0] = 0.48, 0.36, 0.8
    v = kernel.reshape(18, 1)  # as a kernel (out, in, kh, kw) flattens: (in·kh·kw, k)
    assert np.linalg.norm(v) == pytest.approx(1.0)

    cut = kernel_centre_vectors(v, (4, 2, 3, 3))
    np.testing.assert_allclose(cut, [[0.48], [0.36]], atol=1e-15)
    assert np.linalg.norm(cut) == pytest.approx(0.6)

    # Against the earlier layer's unit direction (0.8, 0.6): A = 0.8·0.48 + 0.6·0.36 = 0.6,
    # where rescaling the cut to unit length would have given 1.
    u = np.array([[0.8], [0.6]])
    assert alignment_diagonal(u, cut) == pytest.approx([0.6])

    # Leading (step) axes pass through; every kernel axis is cut at index k // 2.
    rng = np.random.default_rng(7)
    grid = rng.standard_normal((3, 5, 3, 2))  # (steps, in, kw, k) of a 1-D kernel
    cut = kernel_centre_vectors(grid.reshape(3, 15, 2), (7, 5, 3))
    np.testing.assert_array_equal(cut, grid[:, :, 1, :])


def test_alignment_of_a_chain_whose_vectors_line_up():
    # W2 = U2 S V2ᵀ with V2 = U1: the outputs of W1 feed W2's top directions one to one.
    u1 = orthonormal(24, 6, 8)
    v2 = u1.copy()
    assert alignment_score(u1, v2) == pytest.approx(1.0)
    np.testing.assert_allclose(alignment_matrix(u1, v2), np.eye(6), atol=1e-12)

    # Swap two directions of W2: the diagonal loses them, the off-diagonal finds them.
    swapped = v2[:, [1, 0, 2, 3, 4, 5]]
    a = alignment_matrix(u1, swapped)
    assert a[0, 1] == pytest.approx(1.0) and a[0, 0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(alignment_diagonal(u1, swapped), [0, 0, 1, 1, 1, 1], atol=1e-12)
    assert alignment_score(u1, swapped) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="do not connect"):
        alignment_matrix(u1, orthonormal(23, 6, 0))
