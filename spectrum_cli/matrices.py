"""Weight tensors as matrices, as the paper takes them.

Every floating tensor with two or more dimensions is a matrix. A 2-D weight is taken as stored
(out × in); a convolution kernel (out, in, k…) is flattened to out × (in·k…). Integer and
boolean tensors, and all 1-D tensors, are skipped. Half-precision weights are upcast to
float32 before decomposing (float64 weights are kept as they are); the stored dtype is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AS_STORED = "as stored (out × in)"
FLATTENED = "kernel (out, in, k…) flattened to out × (in·k…)"


@dataclass(frozen=True)
class MatrixInfo:
    """How one layer's tensor became a matrix."""

    layer: str
    tensor_shape: tuple[int, ...]
    shape: tuple[int, int]
    dtype: str
    formed: str

    @property
    def rank_bound(self) -> int:
        """min(m, n): the number of singular values."""
        return min(self.shape)


def matrix_info(layer: str, tensor: torch.Tensor) -> MatrixInfo | None:
    """Describe the matrix a tensor gives, or return None when it is not a matrix.

    Parameters
    ----------
    layer
        The normalised state-dict key.
    tensor
        The tensor as loaded; only its dtype and shape are read.
    """
    if not tensor.dtype.is_floating_point or tensor.dim() < 2:
        return None
    shape = tuple(int(d) for d in tensor.shape)
    if 0 in shape:
        return None
    out = shape[0]
    rest = math.prod(shape[1:])
    formed = AS_STORED if len(shape) == 2 else FLATTENED
    dtype = str(tensor.dtype).removeprefix("torch.")
    return MatrixInfo(layer, shape, (out, rest), dtype, formed)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """Return the matrix of a weight tensor: (out, in, k…) becomes (out, in·k…).

    Half-precision and float32 weights give a float32 matrix; float64 weights stay float64, so
    that no value is rounded (a finite 1e39 would become +Inf) before decomposing.
    """
    matrix = tensor.reshape(tensor.shape[0], -1)  # (out, in·k…)
    return matrix.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
