"""Weight tensors as matrices, as the paper takes them.

Every floating tensor with two or more dimensions is a matrix. A 2-D weight is taken as stored
(out × in); a convolution kernel (out, in, k…) is flattened to out × (in·k…). Integer and
boolean tensors, all 1-D tensors, and masks (keys ending in ``_mask``, as ``torch.nn.utils.prune``
and attention masks are named) are skipped. Half-precision weights are upcast to float32 before
decomposing (float64 weights are kept as they are); the stored dtype is recorded. Tensors may
be torch tensors or NumPy arrays, and stay what they are.
:func:`output_layer` names the matrix that pruning leaves whole by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from spectrum_cli.checkpoints import PRUNE_MASK
from spectrum_cli.errors import UsageError

if TYPE_CHECKING:
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


def matrix_info(layer: str, tensor: torch.Tensor | np.ndarray) -> MatrixInfo | None:
    """Describe the matrix a tensor gives, or return None when it is not a matrix.

    Parameters
    ----------
    layer
        The normalised state-dict key.
    tensor
        The tensor as loaded; only its dtype and shape are read.
    """
    if not _floating(tensor.dtype) or len(tensor.shape) < 2 or layer.endswith(PRUNE_MASK):
        return None
    shape = tuple(int(d) for d in tensor.shape)
    if 0 in shape:
        return None
    out = shape[0]
    rest = math.prod(shape[1:])
    formed = AS_STORED if len(shape) == 2 else FLATTENED
    dtype = str(tensor.dtype).removeprefix("torch.")  # torch.float16 and NumPy's float16 alike
    return MatrixInfo(layer, shape, (out, rest), dtype, formed)


def as_matrix(tensor: torch.Tensor | np.ndarray) -> Any:
    """Return the matrix of a weight tensor: (out, in, k…) becomes (out, in·k…).

    Half-precision and float32 weights give a float32 matrix; float64 weights stay float64, so
    that no value is rounded (a finite 1e39 would become +Inf) before decomposing. A NumPy
    array gives an array, a torch tensor a tensor.
    """
    matrix = tensor.reshape(tensor.shape[0], -1)  # (out, in·k…)
    if isinstance(matrix, np.ndarray):
        return matrix.astype(np.float64 if matrix.dtype == np.float64 else np.float32, copy=False)
    import torch

    return matrix.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def _floating(dtype: Any) -> bool:
    """Whether a torch or NumPy dtype is a floating-point type."""
    flag = getattr(dtype, "is_floating_point", None)
    return bool(flag) if flag is not None else np.dtype(dtype).kind == "f"


# Top-level modules that hold a model's output layer under the usual names: torchvision's
# `fc` and `classifier`, timm's `head`, Hugging Face's `classifier`, `lm_head` and `score`,
# Meta's `output`.
OUTPUT_MODULES = ("classifier", "fc", "head", "lm_head", "logits", "out", "output", "score")


def output_layer(
    layers: Sequence[str], *, model_order: bool, name: str | None = None
) -> str | None:
    """The matrix taken as a model's output layer, which pruning leaves whole by default.

    The rule, in order: the layer the user named; in the model's own order, the last matrix;
    otherwise (keys stored sorted, as safetensors files store them) the last matrix whose
    top-level module has an output name (:data:`OUTPUT_MODULES`: ``fc.weight``,
    ``classifier.6.weight``, ``lm_head.weight``), and failing that the last matrix in the
    order given.

    Parameters
    ----------
    layers
        The layer names of a checkpoint's matrices, in the order it yields them.
    model_order
        Whether that order is the model's own, as :func:`spectrum_cli.checkpoints.in_model_order`
        tells for a checkpoint (true for ``torch.save`` files, false for safetensors).
    name
        A layer the user named as the output layer.

    Returns
    -------
    str or None
        The output layer; None when there is no matrix.

    Raises
    ------
    UsageError
        If ``name`` is not one of ``layers``.
    """
    layers = list(layers)
    if name is not None:
        if name not in layers:
            raise UsageError(
                f"no matrix {name!r} to take as the output layer; the matrices are "
                f"{', '.join(layers) or 'none'}"
            )
        return name
    if not layers:
        return None
    if not model_order:
        named = [layer for layer in layers if layer.split(".")[0] in OUTPUT_MODULES]
        if named:
            return named[-1]
    return layers[-1]
