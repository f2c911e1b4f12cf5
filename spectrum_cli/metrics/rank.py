"""Effective rank and the other scalar summaries of a spectrum.

Effective rank follows Roy & Vetterli, *The effective rank: a measure of effective
dimensionality* (EUSIPCO 2007): with p_i = σ_i / Σ_j σ_j, erank = exp(−Σ_i p_i ln p_i), taking
0·ln 0 = 0. Yunis et al. (arXiv 2408.11804) plot it divided by min(m, n); both are here, with
the stable rank Σσ²/σ₁², the spectral norm σ₁ and the Frobenius norm (Σσ²)^½.

Every function takes singular values along the last axis, ``(..., r)``, in any order, and
reduces that axis. A zero matrix has effective rank and stable rank 0, as its rank is.
"""

from __future__ import annotations

import numpy as np


def effective_rank(sigma: np.ndarray) -> np.ndarray:
    """Roy & Vetterli's effective rank of each spectrum.

    Parameters
    ----------
    sigma
        Singular values ``(..., r)``, non-negative.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64, between 1 and the number of non-zero singular values (0 for a
        zero matrix). Unchanged when the matrix is scaled.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    total = sigma.sum(axis=-1, keepdims=True)

    # The singular values as a distribution; a zero spectrum stays all zeros.
    p = np.divide(sigma, total, out=np.zeros_like(sigma), where=total > 0)
    plogp = np.zeros_like(p)
    np.multiply(p, np.log(p, out=np.zeros_like(p), where=p > 0), out=plogp)
    erank = np.exp(-plogp.sum(axis=-1))
    return np.where(total[..., 0] > 0, erank, 0.0)


def normalized_effective_rank(sigma: np.ndarray) -> np.ndarray:
    """Effective rank divided by min(m, n), the length of a full spectrum ``(..., r)``.

    Parameters
    ----------
    sigma
        All singular values ``(..., r)`` with r = min(m, n), as the store keeps them.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64 in [0, 1].
    """
    sigma = np.asarray(sigma)
    return effective_rank(sigma) / max(sigma.shape[-1], 1)


def stable_rank(sigma: np.ndarray) -> np.ndarray:
    """Stable rank Σσ²/σ₁², between 1 and the rank (0 for a zero matrix).

    Parameters
    ----------
    sigma
        Singular values ``(..., r)``.

    Returns
    -------
    numpy.ndarray
        ``(...)`` float64.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    top = np.max(sigma, axis=-1, initial=0.0)

    # Divide by σ₁ before squaring, so that tiny spectra do not underflow.
    scaled = np.divide(sigma, top[..., None], out=np.zeros_like(sigma), where=top[..., None] > 0)
    return (scaled**2).sum(axis=-1)


def spectral_norm(sigma: np.ndarray) -> np.ndarray:
    """The largest singular value σ₁ of each spectrum ``(..., r)`` → ``(...)``."""
    return np.max(np.asarray(sigma, dtype=np.float64), axis=-1, initial=0.0)


def frobenius_norm(sigma: np.ndarray) -> np.ndarray:
    """The Frobenius norm (Σσ²)^½ of each spectrum ``(..., r)`` → ``(...)``."""
    sigma = np.asarray(sigma, dtype=np.float64)
    top = np.max(sigma, axis=-1, initial=0.0)
    scaled = np.divide(sigma, top[..., None], out=np.zeros_like(sigma), where=top[..., None] > 0)
    return top * np.sqrt((scaled**2).sum(axis=-1))


def rank_summary(sigma: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of this module for spectra ``(..., r)``, each ``(...)``, by name.

    Parameters
    ----------
    sigma
        All singular values ``(..., r)`` with r = min(m, n).

    Returns
    -------
    dict
        ``effective_rank``, ``normalized_effective_rank``, ``stable_rank``,
        ``spectral_norm`` and ``frobenius_norm``.
    """
    erank = effective_rank(sigma)
    return {
        "effective_rank": erank,
        "normalized_effective_rank": erank / max(np.shape(sigma)[-1], 1),
        "stable_rank": stable_rank(sigma),
        "spectral_norm": spectral_norm(sigma),
        "frobenius_norm": frobenius_norm(sigma),
    }
