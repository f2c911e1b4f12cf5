"""Singular-value pruning: evaluate a checkpoint with its matrices cut to top or bottom components.

Yunis et al. (arXiv 2408.11804) test where a trained network keeps what it has learned by
replacing each weight matrix W = U Σ Vᵀ with only some of its singular components,

    W_top = Σ_{i < q} σ_i u_i v_iᵀ       or       W_bottom = Σ_{i ≥ r − q} σ_i u_i v_iᵀ,

with r = min(m, n) and q = round(f · r) for a kept fraction f (halves round up), and comparing
the loss and error before and after. Every matrix is pruned but the output layer, the last
matrix in the model's own module order (a checkpoint's tensor order is often sorted, which puts
``classifier`` before ``features`` and ``fc`` before ``layer4``; without a model, the rule of
:func:`spectrum_cli.matrices.output_layer`); a convolution kernel (out, in, k…) is pruned as its
out × (in·k…) matrix and reshaped back. Biases and other 1-D entries are left as they are.

The bottom components are needed, which the store does not keep (it keeps the top k singular
vectors), so each matrix is decomposed here in full, in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spectrum_cli.errors import UsageError
from spectrum_cli.evaluation import Evaluator, Scores, load_checkpoint, require_finite
from spectrum_cli.matrices import matrix_info, output_layer

log = logging.getLogger(__name__)

KEEP_TOP = "top"
KEEP_BOTTOM = "bottom"


@dataclass(frozen=True)
class LayerPruning:
    """What pruning kept of one matrix.

    Attributes
    ----------
    layer
        The normalised state-dict key.
    matrix_shape
        (m, n) of the matrix.
    rank_bound
        r = min(m, n), the number of singular components.
    kept
        How many components were kept.
    pruned
        False for the output layer, which is left whole.
    """

    layer: str
    matrix_shape: tuple[int, int]
    rank_bound: int
    kept: int
    pruned: bool


@dataclass(frozen=True)
class SplitComparison:
    """Loss and error on one split with the full and with the pruned matrices.

    Attributes
    ----------
    split
        The split name; ``examples`` its number of examples.
    loss_before, loss_after
        Mean loss with the checkpoint as saved, and pruned.
    error_before, error_after
        Mean error, or None when the data define no error.
    """

    split: str
    examples: int
    loss_before: float
    loss_after: float
    error_before: float | None
    error_after: float | None


@dataclass(frozen=True)
class PruningReport:
    """Everything ``spectrum prune-eval`` reports for one checkpoint.

    Attributes
    ----------
    checkpoint
        The checkpoint evaluated.
    model, data
        Where the model and data came from.
    keep, fraction
        ``"top"`` or ``"bottom"``, and the kept fraction of each matrix's components.
    layers
        One entry per matrix, in the model's module order.
    splits
        One comparison per split.
    """

    checkpoint: str
    model: str
    data: str
    keep: str
    fraction: float
    layers: list[LayerPruning]
    splits: list[SplitComparison]


def kept_components(rank_bound: int, fraction: float) -> int:
    """q = round(f · r), halves rounded up: how many of r components a fraction keeps."""
    return min(rank_bound, math.floor(fraction * rank_bound + 0.5))


def prune_matrix(tensor: torch.Tensor, keep: str, fraction: float) -> torch.Tensor:
    """A weight tensor reduced to its top or bottom singular components, in its own dtype.

    Parameters
    ----------
    tensor
        A matrix (m, n) or a kernel (out, in, k…), taken as out × (in·k…).
    keep
        ``"top"`` (the largest singular values) or ``"bottom"`` (the smallest).
    fraction
        Kept fraction of the r = min(m, n) components.

    Returns
    -------
    torch.Tensor
        The same shape and dtype as ``tensor``.
    """
    matrix = tensor.reshape(tensor.shape[0], -1).to(torch.float64)  # (out, in·k…)
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, r), (r,), (r, n)
    r = sigma.shape[0]
    q = kept_components(r, fraction)
    chosen = slice(0, q) if keep == KEEP_TOP else slice(r - q, r)
    pruned = (u[:, chosen] * sigma[chosen]) @ vh[chosen]  # (m, n)
    return pruned.reshape(tensor.shape).to(tensor.dtype)


def prune_singular_values(
    tensors: Mapping[str, torch.Tensor],
    keep: str,
    fraction: float,
    order: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[LayerPruning]]:
    """Prune every matrix of a checkpoint but the output layer.

    Parameters
    ----------
    tensors
        A checkpoint's tensors by name.
    keep
        ``"top"`` or ``"bottom"``.
    fraction
        Kept fraction of each matrix's components, in [0, 1].
    order
        The entries in the model's own order (its state dict's): the output layer is the last
        matrix in it. Without it, the tensors' own order is not taken as the model's, and the
        output layer is the one :func:`spectrum_cli.matrices.output_layer` finds by name.

    Returns
    -------
    tuple
        The pruned tensors (the others are passed through), and one entry per matrix, in
        ``order`` (else in tensor order).
    """
    if keep not in (KEEP_TOP, KEEP_BOTTOM):
        raise UsageError(f"--keep must be {KEEP_TOP!r} or {KEEP_BOTTOM!r}, got {keep!r}")
    if not 0.0 <= fraction <= 1.0:
        raise UsageError(f"--fraction must lie in [0, 1], got {fraction}")
    names = [name for name in order if name in tensors] if order is not None else list(tensors)
    matrices = {name: info for name in names if (info := matrix_info(name, tensors[name]))}
    if not matrices:
        raise UsageError("the checkpoint holds no weight matrix to prune")
    output = output_layer(list(matrices), model_order=order is not None)
    if len(matrices) == 1:
        log.warning("the only matrix, %s, is the output layer: nothing is pruned", output)

    pruned = dict(tensors)
    layers = []
    for name, info in matrices.items():
        whole = name == output
        if not whole:
            pruned[name] = prune_matrix(tensors[name], keep, fraction)
        kept = info.rank_bound if whole else kept_components(info.rank_bound, fraction)
        layers.append(LayerPruning(name, info.shape, info.rank_bound, kept, not whole))
    return pruned, layers


def pruned_evaluation(
    checkpoint: Path, evaluator: Evaluator, *, keep: str = KEEP_TOP, fraction: float = 0.5
) -> PruningReport:
    """Evaluate a checkpoint on every split, as saved and with its matrices pruned.

    Parameters
    ----------
    checkpoint
        The checkpoint.
    evaluator
        Its model and data (:func:`spectrum_cli.evaluation.evaluator_for`).
    keep
        ``"top"`` or ``"bottom"`` singular components.
    fraction
        Kept fraction of each matrix's r = min(m, n) components.

    Returns
    -------
    PruningReport
    """
    tensors = load_checkpoint(Path(checkpoint))
    require_finite({str(checkpoint): tensors})
    evaluator.check_fit(tensors, str(checkpoint))
    pruned, layers = prune_singular_values(tensors, keep, fraction, list(evaluator.entries))

    # Score the checkpoint as saved, then pruned, on every split.
    before: dict[str, Scores] = {}
    after: dict[str, Scores] = {}
    for state, scores in ((tensors, before), (pruned, after)):
        evaluator.load(state)
        for split in evaluator.split_names:
            scores[split] = evaluator.evaluate(split)

    splits = [
        SplitComparison(
            split,
            before[split].examples,
            before[split].loss,
            after[split].loss,
            before[split].error,
            after[split].error,
        )
        for split in evaluator.split_names
    ]
    return PruningReport(
        str(checkpoint),
        evaluator.model_source,
        evaluator.data_source,
        keep,
        fraction,
        layers,
        splits,
    )
