"""The decomposition engine: all singular values and the top-k singular vectors of a matrix.

One SVD per matrix per checkpoint, reused by every later command. The route is exact in the
sense that matters for float32 weights: the Gram matrix of the smaller side is formed in
float64 (squaring a float32 matrix there loses nothing a float32 SVD would keep) and its
eigenvalues are the squared singular values. A wide matrix is decomposed as its transpose.
Vectors come from the Gram eigenvectors; where the top-k reach singular values that are
numerically zero, the matrix falls back to a direct float64 SVD so no vector is made of noise.

Signs are fixed so that stored vectors compare across steps: the entry of largest magnitude in
each left vector is positive, and the right vector flips with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from spectrum_cli.errors import SpectrumError, UsageError

log = logging.getLogger(__name__)

# Singular values below this fraction of σ₁ (times the size) are zero for float32 input.
_ZERO_TOLERANCE = float(torch.finfo(torch.float32).eps)
# The store keeps float32: larger singular values cannot be stored.
_LARGEST = float(torch.finfo(torch.float32).max)


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


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``, ``cpu`` or ``cuda[:i]`` into a device; ``auto`` takes CUDA when present.

    Raises
    ------
    UsageError
        When the name is not a device, not a CPU or CUDA device, or not on this machine.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    return device


def check_finite(matrix: torch.Tensor) -> None:
    """Refuse a matrix whose singular values would not be finite in the float32 store.

    Raises
    ------
    DecompositionError
        Naming how many NaN, +Inf and −Inf entries the matrix holds, or, for finite entries
        so large that σ₁ exceeds the largest float32 (3.4e38), the value of σ₁.
    """
    if bool(torch.isfinite(matrix).all()):
        # The Frobenius norm bounds σ₁ from above: only beyond the float32 range is σ₁ computed.
        if float(torch.linalg.vector_norm(matrix, dtype=torch.float64)) <= _LARGEST:
            return
        top = float(torch.linalg.matrix_norm(matrix.to(torch.float64), ord=2))
        if top <= _LARGEST:
            return
        raise DecompositionError(
            f"singular values beyond the float32 range of the store (σ₁ = {top:.3g} > "
            f"{_LARGEST:.3g}); such weights usually mean the run diverged"
        )
    counts = {
        "NaN": int(torch.isnan(matrix).sum()),
        "+Inf": int(torch.isposinf(matrix).sum()),
        "-Inf": int(torch.isneginf(matrix).sum()),
    }
    found = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
    raise DecompositionError(f"non-finite entries ({found} of {matrix.numel()})")


def decompose(matrix: torch.Tensor, top_k: int, device: torch.device | None = None) -> Spectrum:
    """Decompose one matrix: all singular values, top-k singular vectors, signs fixed.

    Parameters
    ----------
    matrix
        An (m, n) floating matrix; it is read in float64.
    top_k
        How many singular vectors to keep; at most min(m, n) are kept.
    device
        Where to compute; the CPU by default.

    Raises
    ------
    DecompositionError
        When the matrix holds NaN or ±Inf.
    """
    return decompose_batch(matrix.unsqueeze(0), top_k, device)[0]


def decompose_batch(
    matrices: torch.Tensor, top_k: int, device: torch.device | None = None
) -> list[Spectrum]:
    """Decompose a stack of same-shaped matrices (B, m, n) in one batched pass.

    Every matrix must be finite (see `check_finite`); this is the engine's inner loop.
    """
    device = device or torch.device("cpu")
    for matrix in matrices:
        check_finite(matrix)
    batch, m, n = matrices.shape

    # Work on the tall orientation: a wide (m < n) matrix is decomposed as its transpose.
    wide = m < n
    w = matrices.to(device=device, dtype=torch.float64)
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
        left, sigma_svd, vh = torch.linalg.svd(w, full_matrices=False)
        left, right = left[..., :k], vh.transpose(1, 2)[..., :k]
        sigma = sigma_svd

    if wide:
        left, right = right, left  # back to (m, k) and (n, k)
    left, right = _fix_signs(left, right)

    # A last guard: nothing non-finite reaches the store (check_finite should have said why).
    for values in (sigma, left, right):
        if not bool(torch.isfinite(values.to(torch.float32)).all()):
            raise DecompositionError("the decomposition gave values that float32 cannot hold")

    out = []
    for i in range(batch):
        out.append(
            Spectrum(
                sigma=sigma[i].to("cpu", torch.float32).numpy(),
                u=left[i].to("cpu", torch.float32).numpy(),
                v=right[i].to("cpu", torch.float32).numpy(),
            )
        )
    return out


def _fix_signs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each (u, v) pair so the largest-magnitude entry of u is positive."""
    if left.shape[-1] == 0:
        return left, right
    peak = left.abs().argmax(dim=-2, keepdim=True)  # (B, 1, k)
    signs = torch.sign(torch.gather(left, -2, peak))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return left * signs, right * signs
