"""Lottery-ticket masks against the top singular directions of the weights.

The claim tested here (Yunis et al., arXiv 2408.11804, section on lottery tickets): a magnitude
mask, which keeps the largest |w|, keeps the top singular directions of a weight matrix W, and
a random mask of the same density does not. For each masked matrix this module reports

- the *density* of its mask M (the kept fraction of its entries);
- the *agreement score* between W and M⊙W: the mean of the first 10 diagonal entries of
  S_ij = |(u_i·u'_j)(v_i·v'_j)| (see :mod:`spectrum_cli.metrics.agreement`), in [0, 1];
- the same score for a seeded random mask of equal density, the control;
- the overlap (IoU) between the magnitude mask of W and the magnitude mask of its rank-k
  approximation at the same density, for k = 1, 2, 4, …, r, and the IoU of the random mask
  with the magnitude mask of W, the control line (about d / (2 − d) at density d). Both
  depend on W and the density only, not on which entries the given mask keeps; at density 0
  they are undefined (None).

Masks come from a file of 0/1 tensors keyed like the weights, from ``torch.nn.utils.prune``'s
``weight_orig``/``weight_mask`` pairs inside the checkpoint, or are computed by magnitude over
all prunable matrices at once or per layer; the output layer
(:func:`spectrum_cli.matrices.output_layer`) is left whole unless asked for. Weights are
masked here (M⊙W), so they should be stored unmasked.

Over training, :func:`agreement_over_training` compares a dense run with a masked run from the
stored spectra: the agreement score of their top singular vectors at each step both have.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from spectrum_cli.checkpoints import PRUNE_MASK, in_model_order, load_with_masks
from spectrum_cli.errors import CheckpointError, StoreError, UsageError
from spectrum_cli.matrices import as_matrix, matrix_info, output_layer
from spectrum_cli.metrics.agreement import SCORE_INDICES, agreement_score
from spectrum_cli.spectra import Spectrum, decompose_batch

if TYPE_CHECKING:
    from spectrum_cli.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointWeights:
    """What a checkpoint holds for masking.

    Attributes
    ----------
    path
        The checkpoint.
    matrices
        Every matrix-shaped weight by layer name, unmasked, in the checkpoint's tensor order.
    shapes
        The shape of every tensor by layer name, vectors included.
    masks
        Boolean masks found as ``torch.nn.utils.prune`` pairs, by layer; empty when none.
    model_order
        Whether the tensor order is the model's own (see
        :func:`spectrum_cli.checkpoints.in_model_order`).
    """

    path: Path
    matrices: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    masks: dict[str, torch.Tensor]
    model_order: bool


@dataclass(frozen=True)
class MaskedWeights:
    """The matrices of one checkpoint and the mask of each pruned one.

    Attributes
    ----------
    weights
        Every matrix-shaped weight by layer name, unmasked, in the checkpoint's tensor order.
    masks
        Boolean masks by layer, each the shape of its weight tensor; layers without one are
        left whole and not reported.
    source
        How the masks came about, in words.
    output_layer
        The matrix taken as the output layer; None when not known.
    """

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    source: str
    output_layer: str | None = None
    unmasked: list[str] = field(init=False)

    def __post_init__(self) -> None:
        unmasked = [layer for layer in self.weights if layer not in self.masks]
        object.__setattr__(self, "unmasked", unmasked)


@dataclass(frozen=True)
class LayerMaskReport:
    """The numbers for one masked matrix.

    Attributes
    ----------
    layer
        The normalised state-dict key.
    matrix_shape
        (m, n) of the matrix the tensor gives.
    density
        Kept fraction of the mask.
    agreement
        Agreement score between W and M⊙W, in [0, 1]; 0 for an empty mask.
    random_agreement
        Agreement score between W and R⊙W for a random mask R of the same density.
    ranks
        k = 1, 2, 4, …, r with r = min(m, n).
    iou
        IoU of the magnitude mask of W with that of its rank-k approximation, one per rank;
        None when the mask keeps nothing, where no overlap is defined.
    random_iou
        IoU of the random mask R with the magnitude mask of W; None when the mask keeps nothing.
    """

    layer: str
    matrix_shape: tuple[int, int]
    density: float
    agreement: float
    random_agreement: float
    ranks: list[int]
    iou: list[float] | None
    random_iou: float | None


@dataclass(frozen=True)
class StepAgreement:
    """Agreement score between two runs' top singular vectors of one layer at one step."""

    layer: str
    step: int
    agreement: float


# ---------------------------------------------------------------------------- masks in


def load_weights(checkpoint: Path) -> CheckpointWeights:
    """Read a checkpoint's matrices, with the masks of ``torch.nn.utils.prune`` pairs.

    A pruned module saves ``fc.weight_orig`` (the unmasked weight) and ``fc.weight_mask``;
    together they become layer ``fc.weight`` with its mask
    (:func:`spectrum_cli.checkpoints.load_with_masks`).

    Parameters
    ----------
    checkpoint
        A weights file or Hugging Face checkpoint directory.

    Returns
    -------
    CheckpointWeights

    Raises
    ------
    CheckpointError
        If the checkpoint holds no weight matrix.
    """
    matrices: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    masks: dict[str, torch.Tensor] = {}
    for layer, tensor, mask in load_with_masks(checkpoint):
        shapes[layer] = tuple(tensor.shape)
        if matrix_info(layer, tensor) is None:
            continue
        matrices[layer] = tensor
        if mask is not None:
            masks[layer] = _as_bool(mask, layer, checkpoint)
    if not matrices:
        raise CheckpointError(f"{checkpoint} holds no weight matrices to mask")
    return CheckpointWeights(checkpoint, matrices, shapes, masks, in_model_order(checkpoint))


def read_masks(
    path: Path, checkpoint: CheckpointWeights, output: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a file of 0/1 tensors keyed like the weights, checked against them both ways.

    Keys are normalised as for checkpoints; a file saved from a pruned model's state dict is
    read through its masks. Masks may be boolean or any numeric dtype holding only 0 and 1.
    Every mask must name a tensor of the checkpoint and have its shape, vectors (bias masks)
    included, and every matrix but the output layer must have a mask. Only the masks of
    matrices are returned.

    Parameters
    ----------
    path
        The mask file (safetensors or ``torch.save``).
    checkpoint
        The checkpoint's tensors, as :func:`load_weights` returns them.
    output
        The output layer, which the file may leave out (it is then left whole).

    Returns
    -------
    dict of str to torch.Tensor
        Boolean masks by layer, in the checkpoint's tensor order.

    Raises
    ------
    UsageError
        If the file cannot be read, or listing every difference at once: mask keys with no
        tensor, shapes that differ, matrices left without a mask; or naming masks that hold
        values other than 0 and 1.
    """
    if not path.is_file():
        raise UsageError(f"mask file {path} does not exist; pass a safetensors or torch file")
    try:
        entries = list(load_with_masks(path))
    except CheckpointError as error:
        raise UsageError(f"cannot read mask file {path}: {error}") from None

    # A pruned model's state dict holds its masks as pairs, or as lone `*_mask` tensors.
    loaded = {layer: mask for layer, _, mask in entries if mask is not None}
    if not loaded:
        loaded = {name: tensor for name, tensor, _ in entries}
        if any(name.endswith(PRUNE_MASK) for name in loaded):
            loaded = {
                name.removesuffix(PRUNE_MASK): tensor
                for name, tensor in loaded.items()
                if name.endswith(PRUNE_MASK)
            }

    # Collect every difference before stopping, so one run shows them all.
    differences = []
    for layer, mask in loaded.items():
        expected = checkpoint.shapes.get(layer)
        if expected is None:
            differences.append(f"mask {layer!r} has no tensor in the checkpoint")
        elif tuple(mask.shape) != expected:
            differences.append(
                f"{layer!r}: mask shape {tuple(mask.shape)}, weight shape {expected}"
            )
        elif mask.dim() >= 2 and layer not in checkpoint.matrices:
            differences.append(f"mask {layer!r} is for a tensor that is not a weight matrix")
    unmasked = [layer for layer in checkpoint.matrices if layer not in loaded and layer != output]
    if unmasked:
        differences.append(f"matrices without a mask: {', '.join(unmasked)}")
    if differences:
        raise UsageError(
            f"mask {path} does not match checkpoint {checkpoint.path} "
            f"({len(differences)} differences): {'; '.join(differences)}"
        )
    checked = {layer: _as_bool(mask, layer, path) for layer, mask in loaded.items()}
    masks = {layer: checked[layer] for layer in checkpoint.matrices if layer in checked}
    if not masks:
        raise UsageError(f"mask {path} covers no weight matrix of {checkpoint.path}")
    return masks


def _as_bool(mask: torch.Tensor, layer: str, where: Path) -> torch.Tensor:
    """A 0/1 mask of any dtype as booleans; UsageError if it holds anything else."""
    if mask.dtype == torch.bool:
        return mask
    binary = bool(((mask == 0) | (mask == 1)).all())
    if not binary:
        values = torch.unique(mask)[:5].tolist()
        raise UsageError(
            f"{where}: mask {layer!r} holds values other than 0 and 1 (e.g. {values}); "
            "save masks as booleans or 0/1 numbers"
        )
    return mask != 0


def prunable_layers(
    weights: Mapping[str, torch.Tensor], output: str | None, include_output: bool = False
) -> list[str]:
    """The layers magnitude pruning may touch: every matrix but the output layer, unless included.

    Raises
    ------
    UsageError
        If that leaves no matrix.
    """
    layers = [layer for layer in weights if include_output or layer != output]
    if not layers:
        raise UsageError(
            f"the only matrix, {output}, is the output layer; pass --include-output to prune it"
        )
    return layers


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    keep: float,
    scope: str = "global",
    include_output: bool = False,
    output: str | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the largest |w|, over all prunable matrices at once or layer by layer.

    Parameters
    ----------
    weights
        The checkpoint's matrices in tensor order.
    keep
        The kept fraction, in (0, 1].
    scope
        ``"global"``: one threshold over every prunable matrix; ``"layer"``: the same fraction
        in each.
    include_output
        Prune the output layer too.
    output
        The output layer; by default the last matrix of ``weights``.

    Returns
    -------
    dict of str to torch.Tensor
        Boolean masks of the prunable layers, each the shape of its weight tensor.
    """
    if not 0 < keep <= 1:
        raise UsageError(f"--keep must be a fraction in (0, 1], got {keep}")
    if scope not in ("global", "layer"):
        raise UsageError(f"--scope must be global or layer, got {scope!r}")
    if output is None:
        output = output_layer(list(weights), model_order=True)
    layers = prunable_layers(weights, output, include_output)
    if scope == "layer":
        return {
            layer: magnitude_mask(weights[layer], max(1, round(keep * weights[layer].numel())))
            for layer in layers
        }

    # One ranking of |w| over every prunable entry, then cut back into layers.
    flat = torch.cat([weights[layer].detach().abs().flatten().float() for layer in layers])
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[torch.topk(flat, max(1, round(keep * flat.numel())), sorted=False).indices] = True
    sizes = [weights[layer].numel() for layer in layers]
    return {
        layer: part.reshape(weights[layer].shape)
        for layer, part in zip(layers, torch.split(kept, sizes), strict=True)
    }


def magnitude_mask(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """The boolean mask of the ``count`` entries of largest magnitude (ties broken by order)."""
    kept = torch.zeros(tensor.numel(), dtype=torch.bool)
    if count > 0:
        kept[torch.topk(tensor.detach().abs().flatten(), count, sorted=False).indices] = True
    return kept.reshape(tensor.shape)


def random_mask(shape: tuple[int, ...], count: int, seed: int, layer: str) -> torch.Tensor:
    """A uniformly random mask of exactly ``count`` kept entries, reproducible per seed and layer.

    The generator is seeded from ``seed`` and the layer name, so a layer's mask does not depend
    on which other layers are analysed.
    """
    rng = np.random.default_rng([seed, zlib.crc32(layer.encode())])
    kept = np.zeros(int(np.prod(shape)), dtype=bool)
    kept[rng.choice(kept.size, size=count, replace=False)] = True
    return torch.from_numpy(kept.reshape(shape))


def collect_masks(
    checkpoint: Path,
    *,
    mask: Path | None = None,
    keep: float | None = None,
    scope: str | None = None,
    include_output: bool = False,
    output: str | None = None,
) -> MaskedWeights:
    """Read a checkpoint and find its masks: from a file, from prune pairs, or by magnitude.

    Masks given (a file, or ``keep``) take the place of prune pairs in the checkpoint, with a
    warning; options that would change nothing are refused.

    Parameters
    ----------
    checkpoint
        The weights to mask, stored unmasked.
    mask
        A file of 0/1 tensors keyed like the weights (see :func:`read_masks`).
    keep
        Compute magnitude masks keeping this fraction instead (see :func:`magnitude_masks`).
    scope
        As for :func:`magnitude_masks`; ``"global"`` when not given. Only with ``keep``.
    include_output
        As for :func:`magnitude_masks`. Only with ``keep``.
    output
        The output layer by name, in place of :func:`spectrum_cli.matrices.output_layer`'s
        choice. Only with ``mask`` or ``keep``.

    Raises
    ------
    UsageError
        When both or neither of ``mask`` and ``keep`` are given and the checkpoint carries no
        prune pairs, when an option applies to neither, or when the mask does not fit the
        checkpoint.
    """
    if mask is not None and keep is not None:
        raise UsageError("give either --mask or --keep, not both")
    if keep is None:
        ignored = [
            flag
            for flag, given in (
                ("--scope", scope is not None),
                ("--include-output", include_output),
            )
            if given
        ]
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            raise UsageError(f"{' and '.join(ignored)} {verb} to --keep only")
    loaded = load_weights(checkpoint)
    if mask is None and keep is None and loaded.masks and output is not None:
        raise UsageError("--output-layer applies to --mask and --keep, not to prune masks")
    out = output_layer(list(loaded.matrices), model_order=loaded.model_order, name=output)
    given = "--mask FILE" if mask is not None else f"--keep {keep:g}" if keep is not None else ""
    if given and loaded.masks:
        log.warning(
            "%s carries torch.nn.utils.prune masks; they are ignored and %s is used "
            "on its unmasked weights",
            checkpoint,
            given,
        )
    if mask is not None:
        masks = read_masks(mask, loaded, out)
        return MaskedWeights(loaded.matrices, masks, f"mask file {mask}", out)
    if keep is not None:
        scope = scope or "global"
        masks = magnitude_masks(loaded.matrices, keep, scope, include_output, out)
        output_note = ", output layer included" if include_output else ""
        source = f"magnitude, {scope} scope, keep {keep:g}{output_note}"
        return MaskedWeights(loaded.matrices, masks, source, out)
    if loaded.masks:
        source = "torch.nn.utils.prune masks in the checkpoint"
        return MaskedWeights(loaded.matrices, loaded.masks, source, out)
    raise UsageError(
        f"{checkpoint} carries no prune masks; give --mask FILE or --keep FRACTION (e.g. 0.05)"
    )


# ---------------------------------------------------------------------------- numbers out


def rank_grid(rank: int) -> list[int]:
    """k = 1, 2, 4, … doubling up to ``rank``, with ``rank`` itself last."""
    ranks = [1 << i for i in range(max(rank, 1).bit_length()) if 1 << i < rank]
    return [*ranks, rank]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Intersection over union of two boolean masks; None (undefined) when both are empty."""
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else None


def low_rank_overlap(matrix: torch.Tensor, count: int) -> tuple[list[int], list[float] | None]:
    """IoU of the magnitude mask of W with that of its rank-k approximations.

    Parameters
    ----------
    matrix
        An (m, n) matrix; decomposed here with a full float64 SVD.
    count
        How many entries each magnitude mask keeps.

    Returns
    -------
    ranks : list of int
        k = 1, 2, 4, …, r with r = min(m, n).
    iou : list of float or None
        One IoU per rank; None when ``count`` is 0, where two empty masks have no overlap.
    """
    w = matrix.to(torch.float64)
    ranks = rank_grid(min(w.shape))
    if count <= 0:
        return ranks, None
    reference = magnitude_mask(w, count)

    # Full SVD once: (m, r) · (r,) · (r, n) with r = min(m, n).
    left, sigma, right_h = torch.linalg.svd(w, full_matrices=False)
    ious = []
    for k in ranks:
        approx = (left[:, :k] * sigma[:k]) @ right_h[:k]  # (m, n), rank k
        iou = mask_iou(reference, magnitude_mask(approx, count))
        assert iou is not None  # both masks keep count > 0 entries
        ious.append(iou)
    return ranks, ious


def compare_masks(masked: MaskedWeights, seed: int = 0) -> list[LayerMaskReport]:
    """Measure what each mask keeps of its matrix's top singular directions.

    Warns (on the ``spectrum_cli.masks`` logger) when a mask keeps nothing, where the IoU is
    undefined, and when W is already zero wherever its mask is: such weights were stored
    masked, M⊙W = W, and the agreement score is 1 by construction.

    Parameters
    ----------
    masked
        Weights and masks, as :func:`collect_masks` returns them.
    seed
        Seed of the random control masks.

    Returns
    -------
    list of LayerMaskReport
        One per masked matrix, in tensor order.
    """
    reports = []
    for layer, mask in masked.masks.items():
        tensor = masked.weights[layer]
        w = as_matrix(tensor)  # (out, in·k…) float32
        kept = as_matrix(mask)  # same shape, 0/1
        count = int(kept.sum())
        control = as_matrix(random_mask(tuple(tensor.shape), count, seed, layer))
        if count == 0:
            log.warning("%s: the mask keeps nothing (density 0); its IoU is undefined", layer)
        elif count < w.numel() and not bool(w[kept == 0].any()):
            log.warning(
                "%s: W is already zero wherever the mask is 0 (stored masked?), so M⊙W = W and "
                "its agreement is 1 by construction; give the unmasked weights",
                layer,
            )

        # Decompose W, M⊙W and R⊙W together; each gives its top singular vectors.
        whole, pruned, shuffled = decompose_batch(
            torch.stack([w, kept * w, control * w]), SCORE_INDICES
        )
        ranks, ious = low_rank_overlap(w, count)
        reports.append(
            LayerMaskReport(
                layer=layer,
                matrix_shape=(int(w.shape[0]), int(w.shape[1])),
                density=count / w.numel(),
                agreement=_score(whole, pruned, count),
                random_agreement=_score(whole, shuffled, count),
                ranks=ranks,
                iou=ious,
                random_iou=mask_iou(control.bool(), magnitude_mask(w, count)),
            )
        )
    return reports


def _score(a: Spectrum, b: Spectrum, count: int) -> float:
    """Agreement score of two spectra's top vectors, in [0, 1]; an empty mask keeps none.

    Products of unit vectors can pass 1 by a rounding error; the score is clipped to [0, 1].
    """
    if not count:
        return 0.0
    return float(np.clip(agreement_score(a.u, a.v, b.u, b.v), 0.0, 1.0))


# ---------------------------------------------------------------------------- over training


def resolve_run(store: Store, name: str) -> str:
    """The store's run for a run name, or for a run directory's path.

    A path is matched by its trailing parts: ``runs/masked/dense`` names run ``masked/dense``
    (or run ``dense``, when that is what the store holds); the longest match wins.

    Raises
    ------
    UsageError
        If the store holds no such run.
    """
    runs = store.runs()
    if name in runs:
        return name
    parts = Path(name).resolve().parts
    matches = [run for run in runs if tuple(run.split("/")) == parts[-len(run.split("/")) :]]
    if not matches:
        raise UsageError(
            f"no run {name!r} in {store.path} (runs: {', '.join(runs) or 'none'}); "
            f"run `spectrum analyze` on it with --store {store.path}"
        )
    return max(matches, key=len)


def agreement_over_training(
    dense: Store, dense_run: str, masked: Store, masked_run: str
) -> list[StepAgreement]:
    """Agreement score of a dense and a masked run's top singular vectors at each shared step.

    Parameters
    ----------
    dense, masked
        The stores holding each run (often the same store).
    dense_run, masked_run
        Run names in those stores.

    Returns
    -------
    list of StepAgreement
        One per layer both runs have and step both have, by layer then step; scores in [0, 1].
        Layers only one run has, or that differ in shape, are named in a warning.

    Raises
    ------
    StoreError
        When the runs share no layer or no step.
    """
    # Layers of the dense run, in its order, that the masked run has with the same shape.
    shapes_a = {
        layer: dense.layer_attrs(dense_run, layer)["matrix_shape"]
        for layer in dense.layers(dense_run)
    }
    shapes_b = {
        layer: masked.layer_attrs(masked_run, layer)["matrix_shape"]
        for layer in masked.layers(masked_run)
    }
    layers = [layer for layer, shape in shapes_a.items() if shapes_b.get(layer) == shape]
    unshared = {
        f"only in {dense_run!r}": [layer for layer in shapes_a if layer not in shapes_b],
        f"only in {masked_run!r}": [layer for layer in shapes_b if layer not in shapes_a],
        "of another shape in each": [
            layer for layer in shapes_a if layer in shapes_b and layer not in layers
        ],
    }
    if any(unshared.values()):
        log.warning(
            "layers left out: %s",
            "; ".join(f"{where}: {', '.join(names)}" for where, names in unshared.items() if names),
        )
    if not layers:
        raise StoreError(f"runs {dense_run!r} and {masked_run!r} share no layer of one shape")
    rows = []
    for layer in layers:
        a = dense.read(dense_run, layer, ("u", "v"))
        b = masked.read(masked_run, layer, ("u", "v"))
        assert a.u is not None and a.v is not None and b.u is not None and b.v is not None

        # Score every shared step at once: u (steps, m, k), v (steps, n, k) → (steps,).
        shared, rows_a, rows_b = np.intersect1d(a.steps, b.steps, return_indices=True)
        scores = agreement_score(a.u[rows_a], a.v[rows_a], b.u[rows_b], b.v[rows_b])
        scores = np.clip(scores, 0.0, 1.0)  # unit-vector products may pass 1 by rounding
        rows += [
            StepAgreement(layer, int(t), float(s)) for t, s in zip(shared, scores, strict=True)
        ]
    if not rows:
        steps_a, steps_b = dense.done_steps(dense_run), masked.done_steps(masked_run)
        raise StoreError(
            f"runs {dense_run!r} (steps {_span(steps_a)}) and {masked_run!r} "
            f"(steps {_span(steps_b)}) share no step"
        )
    return rows


def compare_runs(dense_run: str, masked_run: str, store: Path | None = None) -> list[StepAgreement]:
    """Compare a dense and a masked run over training, from a store or analysed afresh.

    Parameters
    ----------
    dense_run, masked_run
        Run names in ``store``, or run directories.
    store
        A store holding both runs. Without one, each run directory is analysed into a
        temporary store of its own (top 10 singular vectors) that is removed afterwards.

    Raises
    ------
    UsageError
        If the store does not exist, names no such run, or a run directory is not one.
    """
    from spectrum_cli.store import Store

    if store is not None:
        if not store.exists():
            raise UsageError(
                f"store {store} does not exist; run `spectrum analyze RUNS --store {store}` "
                "first, or leave out --store to analyse the run directories afresh"
            )
        both = Store.open(store)
        dense, masked = resolve_run(both, dense_run), resolve_run(both, masked_run)
        return agreement_over_training(both, dense, both, masked)

    with tempfile.TemporaryDirectory(prefix="spectrum-masks-") as scratch:
        dense_store, dense = _analyse_run(Path(dense_run), Path(scratch) / "dense.zarr")
        masked_store, masked = _analyse_run(Path(masked_run), Path(scratch) / "masked.zarr")
        return agreement_over_training(dense_store, dense, masked_store, masked)


def _analyse_run(directory: Path, path: Path) -> tuple[Store, str]:
    """Analyse one run directory into a fresh store; its one run and the store, for reading."""
    from spectrum_cli.analysis import analyze
    from spectrum_cli.store import Store

    if not directory.is_dir():
        raise UsageError(
            f"{directory} is not a run directory; pass run directories, or run names with --store"
        )
    log.info("analysing %s into a temporary store", directory)
    summary = analyze(directory, path, top_k=SCORE_INDICES)
    for failure in summary.failed_checkpoints + summary.failed_matrices:
        log.warning("failed: %s", failure)
    opened = Store.open(path)
    runs = opened.runs()
    if len(runs) != 1:
        raise UsageError(
            f"{directory} holds {len(runs)} runs ({', '.join(runs)}), expected one; "
            "analyse them with `spectrum analyze` and pass run names with --store"
        )
    return opened, runs[0]


def _span(steps: Iterable[int]) -> str:
    steps = list(steps)
    return f"{steps[0]} to {steps[-1]}" if steps else "none"
