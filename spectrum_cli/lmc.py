"""Linear mode connectivity: the barrier on the straight line between two checkpoints.

Following Frankle et al. (*Linear Mode Connectivity and the Lottery Ticket Hypothesis*, ICML
2020) as Yunis et al. (arXiv 2408.11804) use it: for checkpoints θ_A and θ_B of one
architecture, every floating entry is interpolated in float32,

    θ(α) = (1 − α) θ_A + α θ_B,        α on an even grid from 0 to 1 (11 points by default),

integer entries (BatchNorm's ``num_batches_tracked``) are taken from A, and the loss f and the
error are measured at each point. The *barrier* is

    b = max_α [ f(θ(α)) − ((1 − α) f(θ_A) + α f(θ_B)) ]          (the paper's form)

and, beside it, max_α f(θ(α)) − (f(θ_A) + f(θ_B)) / 2 (over the mean of the end points), each
with the α where it peaks. BatchNorm running statistics are recomputed on the training data at
every point, the end points included, so that all points are measured alike.

Two checkpoints of one network may compute the same function with their hidden units in
another order. :func:`weight_matching` (Ainsworth et al., *Git Re-Basin*, ICLR 2023, weight
matching) permutes B's hidden units to match A's for a plain chain of linear and convolution
layers, solving one linear assignment per layer (``scipy.optimize.linear_sum_assignment``)
and sweeping over the layers until no permutation improves.

Beside the barrier: the per-layer agreement of A's and B's top singular vectors (the top-10
score of :mod:`spectrum_cli.metrics.agreement`), read from a store that holds both checkpoints
or decomposed here.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import ArrayLike

from spectrum_cli.errors import EvaluationError, StoreError, UsageError
from spectrum_cli.evaluation import (
    Evaluator,
    Scores,
    call_model,
    load_checkpoint,
    require_finite,
    state_differences,
)
from spectrum_cli.matrices import as_matrix, matrix_info
from spectrum_cli.metrics.agreement import SCORE_INDICES, agreement_score

if TYPE_CHECKING:
    from spectrum_cli.store import Store

log = logging.getLogger(__name__)

ALIGN_NONE = "none"
ALIGN_WEIGHTS = "weights"
#: Points on the α grid by default.
DEFAULT_POINTS = 11
#: The store read when none is named, if it exists and holds both checkpoints.
DEFAULT_STORE = Path("spectrum.zarr")

# BatchNorm statistics move with their units but are not weights to match.
_STATISTICS = ("running_mean", "running_var")

Tensors = dict[str, torch.Tensor]
Vectors = dict[str, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------- the barrier


@dataclass(frozen=True)
class Barrier:
    """The barrier of one quantity (loss or error) along the interpolation.

    Attributes
    ----------
    height
        max over α of f(θ(α)) − ((1−α) f(θ_A) + α f(θ_B)); 0 when no point lies above the
        straight line between the end points.
    alpha
        The α where that maximum is reached (the first, on ties); None when ``height`` is 0
        (or undefined), as a barrier of 0 peaks nowhere.
    height_over_mean
        max over α of f(θ(α)) − (f(θ_A) + f(θ_B)) / 2.
    alpha_over_mean
        The α where f(θ(α)) peaks; None when ``height_over_mean`` is 0 (or undefined).
    """

    height: float
    alpha: float | None
    height_over_mean: float
    alpha_over_mean: float | None


def alpha_grid(points: int = DEFAULT_POINTS) -> np.ndarray:
    """An even grid of ``points`` values of α from 0 to 1, both included."""
    if points < 2:
        raise UsageError(f"--alphas needs at least 2 points (the two checkpoints), got {points}")
    return np.linspace(0.0, 1.0, points)


def interpolation_barrier(alphas: ArrayLike, values: ArrayLike) -> Barrier:
    """The barrier of values measured along the interpolation, in both forms.

    Parameters
    ----------
    alphas
        The grid, ascending, from 0 to 1: the first and last values are f(θ_A) and f(θ_B).
    values
        f(θ(α)) at each α.

    Returns
    -------
    Barrier
        Exactly 0 in both forms, with no α, when every value is the same. A NaN value makes
        the barrier NaN.
    """
    grid = np.asarray(alphas, dtype=np.float64)
    f = np.asarray(values, dtype=np.float64)
    if grid.shape != f.shape or grid.ndim != 1 or len(grid) < 2:
        raise ValueError(f"need matching grids of 2+ points, got {grid.shape}, {f.shape}")
    if grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError(f"the grid must run from 0 to 1, got {grid[0]} to {grid[-1]}")

    # The straight line between the end values, exact at both ends (as torch.lerp computes it).
    start, end = f[0], f[-1]
    line = np.where(grid < 0.5, start + grid * (end - start), end - (1 - grid) * (end - start))
    above = f - line
    peak_line, peak = int(np.argmax(above)), int(np.argmax(f))
    height, height_over_mean = float(above[peak_line]), float(f[peak] - (start + end) / 2)
    return Barrier(
        height=height,
        alpha=float(grid[peak_line]) if height > 0 else None,
        height_over_mean=height_over_mean,
        alpha_over_mean=float(grid[peak]) if height_over_mean > 0 else None,
    )


# ---------------------------------------------------------------------------- pairing


def pair_checkpoints(a: Path, b: Path) -> tuple[Tensors, Tensors]:
    """Load two checkpoints and pair their entries by normalised name.

    Parameters
    ----------
    a, b
        Checkpoint files or directories.

    Returns
    -------
    tuple of dict
        A's and B's tensors by name, in A's order.

    Raises
    ------
    UsageError
        If a checkpoint cannot be read; one message naming every entry of either checkpoint
        that holds NaN or ±Inf; one message listing every entry found on one side only, and
        every entry whose shape or kind (floating or integer) differs.
    """
    a_tensors, b_tensors = load_checkpoint(Path(a)), load_checkpoint(Path(b))
    require_finite({f"A ({a})": a_tensors, f"B ({b})": b_tensors})
    problems = state_differences(
        a_tensors, b_tensors, f"only in A ({Path(a).name})", f"only in B ({Path(b).name})"
    )
    if problems:
        raise UsageError(
            f"{a} and {b} do not pair by layer: {'; '.join(problems)}; interpolate two "
            "checkpoints of one architecture"
        )
    return a_tensors, {name: b_tensors[name] for name in a_tensors}


class LinearPath:
    """θ(α) = (1 − α) θ_A + α θ_B, written in place into an evaluator's one working model.

    A and B are kept on the evaluation device in float32; each point costs one ``torch.lerp``
    per entry (into the parameter itself where it is float32), a BatchNorm pass when asked,
    and the evaluation.

    Parameters
    ----------
    evaluator
        The working model and its data; A must fit it (:meth:`Evaluator.check_fit`).
    a, b
        Paired tensors (:func:`pair_checkpoints`).
    bn_reset
        Recompute BatchNorm statistics on the train split at every point (when the model has
        BatchNorm layers).
    """

    def __init__(self, evaluator: Evaluator, a: Tensors, b: Tensors, *, bn_reset: bool) -> None:
        self.evaluator = evaluator
        self.bn_reset = bn_reset and evaluator.has_batchnorm
        device = evaluator.device
        self._floating: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._fixed: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, target in evaluator.entries.items():
            if a[name].is_floating_point():
                start = a[name].to(device=device, dtype=torch.float32)
                end = b[name].to(device=device, dtype=torch.float32)
                self._floating.append((target, start, end))
            else:
                self._fixed.append((target, a[name].to(device)))

    def load(self, alpha: float) -> None:
        """Write θ(α) into the working model, then recompute BatchNorm statistics if asked."""
        with torch.no_grad():
            for target, start, end in self._floating:
                if target.dtype == torch.float32 and target.is_contiguous():
                    torch.lerp(start, end, alpha, out=target)
                else:
                    target.copy_(torch.lerp(start, end, alpha))
            for target, value in self._fixed:
                target.copy_(value)
        if self.bn_reset:
            self.evaluator.reset_batchnorm()

    def evaluate_at(self, alpha: float, split: str) -> Scores:
        """Loss and error of θ(α) on a split."""
        self.load(alpha)
        return self.evaluator.evaluate(split)


# ---------------------------------------------------------------------------- weight matching


@dataclass(frozen=True)
class UnitLayer:
    """One matrix of a chain and the entries whose rows are its units.

    Attributes
    ----------
    weight
        The matrix entry: (out, in) or a kernel (out, in, k…).
    units
        Its number of outputs, ``out``.
    companions
        The 1-D entries of length ``out`` of its own module (its bias) and of the modules of
        vectors only that follow it before the next layer (a BatchNorm's weight, bias and
        running statistics).
    """

    weight: str
    units: int
    companions: tuple[str, ...]


@dataclass(frozen=True)
class UnitMatching:
    """B's hidden units permuted to match A's.

    Attributes
    ----------
    chain
        The layers, in tensor order; the last one's outputs are never permuted.
    permutations
        One per hidden layer (all but the last): entry i is the unit of B matched to A's unit i.
    sweeps
        Passes over the layers until none improved.
    """

    chain: tuple[UnitLayer, ...]
    permutations: tuple[np.ndarray, ...]
    sweeps: int

    @property
    def moved_units(self) -> dict[str, int]:
        """How many units of each hidden layer the alignment moves."""
        return {
            layer.weight: int((perm != np.arange(len(perm))).sum())
            for layer, perm in zip(self.chain, self.permutations, strict=False)
        }


def unit_chain(state: Mapping[str, torch.Tensor]) -> list[UnitLayer]:
    """Read a plain chain of linear and convolution layers from a state dict's tensor order.

    Entries are grouped by module (``features.3.weight`` belongs to ``features.3``), modules in
    the order they first appear. A module with one floating entry of two or more dimensions is a
    layer, and each layer must feed the next:
    its ``out`` equals the next layer's input channels (``in``), or, for a kernel followed by a
    2-D matrix, divides the next layer's inputs (a flattened feature map, channel-major).

    Parameters
    ----------
    state
        Tensors by name, modules in the order the model runs them (a model's own state-dict
        order is best; a checkpoint's order is often sorted).

    Returns
    -------
    list of UnitLayer

    Raises
    ------
    UsageError
        When two consecutive layers do not connect (residual connections, attention and
        embeddings are not plain chains).
    """
    # Group entries by module (the key up to its last dot), in order of first appearance.
    modules: dict[str, list[str]] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            modules.setdefault(name.rpartition(".")[0], []).append(name)

    # A module with a matrix is a layer; a module of vectors only (BatchNorm, LayerNorm)
    # belongs to the layer before it when its vectors have that layer's length.
    layers: list[tuple[str, int, list[str]]] = []
    for module, names in modules.items():
        matrices = [name for name in names if state[name].dim() >= 2]
        if len(matrices) > 1:
            raise UsageError(
                f"--align weights needs a plain chain of linear and convolution layers, but "
                f"module {module!r} holds several matrices ({', '.join(matrices)})"
            )
        if matrices:
            layers.append((matrices[0], int(state[matrices[0]].shape[0]), []))
        if layers:
            units = layers[-1][1]
            layers[-1][2].extend(
                name for name in names if state[name].dim() == 1 and state[name].shape[0] == units
            )
    chain = [UnitLayer(name, units, tuple(companions)) for name, units, companions in layers]

    for layer, following in itertools.pairwise(chain):
        inputs = int(state[following.weight].shape[1])
        flattened = state[layer.weight].dim() > 2 and state[following.weight].dim() == 2
        if inputs != layer.units and not (flattened and inputs % layer.units == 0):
            raise UsageError(
                f"--align weights needs a plain chain of linear and convolution layers in tensor "
                f"order, but {following.weight} takes {inputs} inputs, not the {layer.units} "
                f"units of {layer.weight}; residual connections, attention and embeddings are "
                "not supported"
            )
    return chain


def weight_matching(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
) -> UnitMatching:
    """Permute B's hidden units to maximise Σ_ℓ ⟨W_ℓ^A, P_ℓ W_ℓ^B P_ℓ₋₁ᵀ⟩ (weight matching).

    For each hidden layer in turn (in a seeded random order), the units of B are assigned to
    those of A by ``scipy.optimize.linear_sum_assignment`` on the similarity of everything that
    touches them: the layer's own rows (weight, bias, BatchNorm weight and bias; running
    statistics are not matched) and the next layer's columns, with the other permutations
    held fixed. Sweeps repeat until one changes nothing. The first layer's inputs and the last
    layer's outputs are never permuted.

    Parameters
    ----------
    a, b
        Paired tensors of one architecture (:func:`pair_checkpoints`).
    max_sweeps
        Stop after this many passes over the layers even if one still improves.
    seed
        Seed of the order the layers are visited in.

    Returns
    -------
    UnitMatching
        Apply it to B with :func:`permute_units`.
    """
    from scipy.optimize import linear_sum_assignment

    chain = unit_chain(a)
    hidden = len(chain) - 1
    permutations = [np.arange(layer.units) for layer in chain[:hidden]]
    if hidden < 1:
        return UnitMatching(tuple(chain), (), 0)

    # A's side of every similarity is fixed: unit rows (n, ·) once and for all, in float64.
    a_rows = [_unit_rows(a, chain, i) for i in range(hidden)]
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):  # noqa: B007 (the count is reported)
        improved = False
        for i in rng.permutation(hidden):
            b_rows = _unit_rows(b, chain, i, permutations)
            similarity = sum(
                (a_part @ b_part.T for a_part, b_part in zip(a_rows[i], b_rows, strict=True)),
                start=torch.zeros(chain[i].units, chain[i].units, dtype=torch.float64),
            ).numpy()  # (n, n): A's unit × B's unit
            _, matched = linear_sum_assignment(similarity, maximize=True)
            units = np.arange(chain[i].units)
            before = similarity[units, permutations[i]].sum()
            after = similarity[units, matched].sum()
            if after > before + 1e-12 * max(1.0, abs(before)):
                permutations[i] = matched
                improved = True
        if not improved:
            break
    log.info("weight matching: %d sweeps over %d hidden layers", sweeps, hidden)
    return UnitMatching(tuple(chain), tuple(permutations), sweeps)


def _unit_rows(
    state: Mapping[str, torch.Tensor],
    chain: Sequence[UnitLayer],
    i: int,
    permutations: Sequence[np.ndarray] | None = None,
) -> list[torch.Tensor]:
    """Everything that touches hidden layer i's units, one (units, ·) float64 matrix per entry.

    With ``permutations``, the other layers' permutations are applied first: layer i's inputs
    come from layer i − 1 and layer i + 1's outputs are its own units.
    """
    layer, following = chain[i], chain[i + 1]
    n = layer.units
    rows = []

    # The layer's own rows: its matrix (out, in, k…) with its inputs permuted, bias, BN affine.
    weight = state[layer.weight].to(torch.float64)
    if permutations is not None and i > 0:
        previous = torch.as_tensor(permutations[i - 1])
        weight = weight.reshape(n, len(previous), -1).index_select(1, previous)
    rows.append(weight.reshape(n, -1))  # (n, in·k…)
    for name in layer.companions:
        if not name.endswith(_STATISTICS):
            rows.append(state[name].to(torch.float64).reshape(n, 1))

    # The next layer's columns: (out', in', k…) seen as (out', n, rest), units first.
    after = state[following.weight].to(torch.float64)
    after = after.reshape(after.shape[0], n, -1)  # (out', n, rest)
    if permutations is not None and i + 1 < len(permutations):
        after = after.index_select(0, torch.as_tensor(permutations[i + 1]))
    rows.append(after.permute(1, 0, 2).reshape(n, -1))  # (n, out'·rest)
    return rows


def permute_units(state: Mapping[str, torch.Tensor], alignment: UnitMatching) -> Tensors:
    """Apply an alignment to a state dict: hidden units reordered, the function unchanged.

    Parameters
    ----------
    state
        B's tensors.
    alignment
        From :func:`weight_matching`.

    Returns
    -------
    dict
        A new state dict; entries that no permutation touches are the same tensors.
    """
    permuted = dict(state)
    for i, perm in enumerate(alignment.permutations):
        layer, following = alignment.chain[i], alignment.chain[i + 1]
        index = torch.as_tensor(perm)
        permuted[layer.weight] = permuted[layer.weight].index_select(0, index)
        for name in layer.companions:
            permuted[name] = permuted[name].index_select(0, index)

        # The next layer's inputs (out', n, rest) follow the units.
        after = permuted[following.weight]
        permuted[following.weight] = (
            after.reshape(after.shape[0], layer.units, -1)
            .index_select(1, index)
            .reshape(after.shape)
        )
    return permuted


def _permute_vectors(
    layer: str, u: np.ndarray, v: np.ndarray, alignment: UnitMatching
) -> tuple[np.ndarray, np.ndarray]:
    """B's singular vectors of one layer after alignment: u (m, k) by output, v (n, k) by input."""
    names = [unit.weight for unit in alignment.chain]
    i = names.index(layer)
    if i < len(alignment.permutations):
        u = u[alignment.permutations[i]]
    if i > 0:
        previous = alignment.permutations[i - 1]
        k = v.shape[1]
        v = v.reshape(len(previous), -1, k)[previous].reshape(-1, k)  # (in, rest, k) → (n, k)
    return u, v


# ---------------------------------------------------------------------------- spectral view


@dataclass(frozen=True)
class LayerAgreement:
    """How far A's and B's top singular vectors agree in one layer.

    Attributes
    ----------
    layer
        The normalised state-dict key.
    matrix_shape
        (m, n) of the matrix.
    agreement
        The top-10 score, mean over i < 10 of |(u_i^A · u_i^B)(v_i^A · v_i^B)|; None where a
        matrix holds non-finite values.
    aligned_agreement
        The same with B's units permuted by the alignment; None without one.
    """

    layer: str
    matrix_shape: tuple[int, int]
    agreement: float | None
    aligned_agreement: float | None = None


def find_in_store(store: Store, checkpoint: Path) -> tuple[str, int] | None:
    """The (run, step) under which a store recorded a checkpoint, matched by source path.

    The store records each checkpoint's path relative to the folder ``analyze`` was given and
    its size in bytes: a checkpoint matches when its absolute path ends with the recorded path
    and, for files, the sizes agree. The longest match wins; ties are not guessed.

    Parameters
    ----------
    store
        An open store.
    checkpoint
        A checkpoint file or directory.

    Returns
    -------
    tuple or None
        The run and step, or None when no single entry matches.
    """
    target = Path(checkpoint).resolve()
    size = target.stat().st_size if target.is_file() else None
    found: dict[int, set[tuple[str, int]]] = {}
    for run in store.runs():
        for step, source in store.checkpoints(run).items():
            recorded = Path(str(source.get("path", "")))
            if not recorded.parts or recorded == Path("."):
                continue
            if recorded.is_absolute():
                same = recorded.resolve() == target
            else:
                same = target.parts[-len(recorded.parts) :] == recorded.parts
            if same and (size is None or source.get("bytes") in (None, size)):
                found.setdefault(len(recorded.parts), set()).add((run, step))
    if not found:
        return None
    best = found[max(found)]
    if len(best) > 1:
        log.info(
            "%s matches %d entries of %s equally well; not using them",
            target,
            len(best),
            store.path,
        )
        return None
    return next(iter(best))


def stored_vectors(store: Store, run: str, step: int) -> Vectors:
    """The top singular vectors of every layer a store holds for one checkpoint.

    Parameters
    ----------
    store
        An open store.
    run, step
        As :func:`find_in_store` gives them.

    Returns
    -------
    dict
        Layer → (u (m, k), v (n, k)); layers failed or missing at that step are left out.
    """
    vectors: Vectors = {}
    for layer in store.layers(run):
        rows = store.read(run, layer, ("u", "v"), at_steps=[step])  # one row, if done
        if len(rows.steps) and rows.u is not None and rows.v is not None:
            vectors[layer] = (np.asarray(rows.u[0]), np.asarray(rows.v[0]))
    return vectors


def top_vectors(tensors: Mapping[str, torch.Tensor], known: Vectors | None = None) -> Vectors:
    """The top-10 singular vectors of every matrix: from ``known`` where it fits, else decomposed.

    Parameters
    ----------
    tensors
        A checkpoint's tensors.
    known
        Vectors read from a store; used for a layer when they are its matrix's top singular
        pairs (at least 10 of them, or all there are).

    Returns
    -------
    dict
        Layer → (u (m, k), v (n, k)); layers with non-finite entries are left out.
    """
    from spectrum_cli.spectra import DecompositionError, decompose

    known = known or {}
    vectors: Vectors = {}
    for name, tensor in tensors.items():
        info = matrix_info(name, tensor)
        if info is None:
            continue
        matrix = as_matrix(tensor)  # (out, in·k…)
        stored = known.get(name)
        if stored is not None and _are_singular_pairs(matrix, *stored):
            vectors[name] = stored
            continue
        if stored is not None:
            log.warning(
                "%s: the stored singular vectors do not fit the checkpoint (changed since it was "
                "analysed?); decomposing it",
                name,
            )
        try:
            spectrum = decompose(matrix, SCORE_INDICES)  # (m, n) → u (m, k), v (n, k)
        except DecompositionError as error:
            log.warning("%s: no singular vectors: %s", name, error)
            continue
        vectors[name] = (spectrum.u, spectrum.v)
    return vectors


def _are_singular_pairs(matrix: torch.Tensor, u: np.ndarray, v: np.ndarray) -> bool:
    """Whether stored vectors hold the top singular pairs of a matrix: W v_i = σ_i u_i, i < 10.

    A store matches a checkpoint by path and size; this catches a checkpoint overwritten since
    (a run trained again into the same folder) at the cost of one product W V.
    """
    m, n = matrix.shape
    k = min(SCORE_INDICES, m, n)
    if u.shape != (m, u.shape[1]) or v.shape != (n, v.shape[1]) or min(u.shape[1], v.shape[1]) < k:
        return False
    w = matrix.to(torch.float64)
    u_k = torch.from_numpy(np.asarray(u[:, :k], dtype=np.float64))  # (m, k)
    wv = w @ torch.from_numpy(np.asarray(v[:, :k], dtype=np.float64))  # (m, k)
    sigma = (u_k * wv).sum(dim=0)  # (k,)
    residual = torch.linalg.norm(wv - u_k * sigma)
    return bool(residual <= 1e-3 * torch.linalg.norm(w))


def layer_agreements(
    a: Mapping[str, torch.Tensor],
    a_vectors: Vectors,
    b_vectors: Vectors,
    alignment: UnitMatching | None = None,
) -> list[LayerAgreement]:
    """The top-10 agreement score of A's and B's singular vectors, layer by layer.

    Parameters
    ----------
    a
        A's tensors, for the layer order and matrix shapes.
    a_vectors, b_vectors
        From :func:`top_vectors`.
    alignment
        When given, also the score with B's vectors permuted as its units were.

    Returns
    -------
    list of LayerAgreement
        In tensor order.
    """
    reports = []
    for name, tensor in a.items():
        info = matrix_info(name, tensor)
        if info is None:
            continue
        if name not in a_vectors or name not in b_vectors:
            reports.append(LayerAgreement(name, info.shape, None))
            continue
        (u_a, v_a), (u_b, v_b) = a_vectors[name], b_vectors[name]
        score = float(agreement_score(u_a, v_a, u_b, v_b))
        aligned = None
        if alignment is not None:
            u_p, v_p = _permute_vectors(name, u_b, v_b, alignment)
            aligned = float(agreement_score(u_a, v_a, u_p, v_p))
        reports.append(LayerAgreement(name, info.shape, score, aligned))
    return reports


def _spectra_for(
    store_path: Path | None, a_path: Path, b_path: Path, a: Tensors, b: Tensors
) -> tuple[Vectors, Vectors, str]:
    """A's and B's top vectors, from the store when it holds both checkpoints; and whence."""
    from spectrum_cli.store import Store

    # A named store that cannot serve is worth a warning; the default store is only a chance.
    named = store_path is not None
    if store_path is None and (DEFAULT_STORE / "zarr.json").is_file():
        store_path = DEFAULT_STORE
    warn = log.warning if named else log.info
    a_known: Vectors = {}
    b_known: Vectors = {}
    if store_path is not None:
        try:
            store = Store.open(store_path)
            a_at, b_at = find_in_store(store, a_path), find_in_store(store, b_path)
            if a_at is not None and b_at is not None:
                a_known, b_known = stored_vectors(store, *a_at), stored_vectors(store, *b_at)
            else:
                warn("%s does not hold both checkpoints; decomposing them instead", store_path)
        except StoreError as error:
            warn("%s; decomposing the checkpoints instead", error)
    a_vectors, b_vectors = top_vectors(a, a_known), top_vectors(b, b_known)
    from_store = sum(a_vectors[k] is a_known.get(k) for k in a_vectors) + sum(
        b_vectors[k] is b_known.get(k) for k in b_vectors
    )
    if from_store == 0:
        source = "decomposed"
    elif from_store == len(a_vectors) + len(b_vectors):
        source = f"store {store_path}"
    else:
        source = f"store {store_path}, the rest decomposed"
    return a_vectors, b_vectors, source


# ---------------------------------------------------------------------------- the whole measurement


@dataclass(frozen=True)
class ConnectivityReport:
    """Everything ``spectrum lmc`` reports for one pair of checkpoints.

    Attributes
    ----------
    a, b
        The checkpoints.
    model, data
        Where the model and data came from.
    split
        The split the curve is measured on, and ``examples`` its number of examples.
    alphas, loss, error
        The curve; ``error`` is None when the data define no error.
    loss_barrier, error_barrier
        The barriers of loss and error.
    batchnorm
        Whether the model has BatchNorm layers.
    bn_reset
        Whether BatchNorm statistics were recomputed at every α (False when it has none).
    align
        ``"none"`` or ``"weights"``; ``alignment_sweeps`` and ``moved_units`` describe it.
    spectra
        Where the singular vectors came from: a store, or decomposed here.
    layers
        The per-layer agreement of A's and B's top singular vectors.
    """

    a: str
    b: str
    model: str
    data: str
    split: str
    examples: int
    alphas: list[float]
    loss: list[float]
    error: list[float] | None
    loss_barrier: Barrier
    error_barrier: Barrier | None
    batchnorm: bool
    bn_reset: bool
    align: str
    alignment_sweeps: int | None
    moved_units: dict[str, int] | None
    spectra: str
    layers: list[LayerAgreement]


def linear_mode_connectivity(
    a_path: Path,
    b_path: Path,
    evaluator: Evaluator,
    *,
    points: int = DEFAULT_POINTS,
    split: str = "train",
    bn_reset: bool = True,
    align: str = ALIGN_NONE,
    store: Path | None = None,
) -> ConnectivityReport:
    """Interpolate two checkpoints, measure loss and error along the line, and the barrier.

    Parameters
    ----------
    a_path, b_path
        The checkpoints θ_A (α = 0) and θ_B (α = 1).
    evaluator
        The working model and data (:func:`spectrum_cli.evaluation.evaluator_for`).
    points
        Points on the α grid, ends included.
    split
        The split to measure on.
    bn_reset
        Recompute BatchNorm statistics on the train split at every point.
    align
        ``"none"``, or ``"weights"`` to permute B's hidden units to A's first.
    store
        A store that may hold both checkpoints' singular vectors; by default
        ``spectrum.zarr`` when it exists. Without both checkpoints in it, they are decomposed.

    Returns
    -------
    ConnectivityReport
    """
    if align not in (ALIGN_NONE, ALIGN_WEIGHTS):
        raise UsageError(f"--align must be {ALIGN_NONE!r} or {ALIGN_WEIGHTS!r}, got {align!r}")
    alphas = alpha_grid(points)

    # Pair the checkpoints, and check that they fit the model.
    a, b = pair_checkpoints(a_path, b_path)
    evaluator.check_fit(a, str(a_path))
    evaluator.batches(split)  # an unknown split fails before any work

    # Permute B's hidden units to A's, layers in the model's order, and check that B still
    # computes what it did.
    alignment = None
    b_saved = b
    if align == ALIGN_WEIGHTS:
        alignment = weight_matching({name: a[name] for name in evaluator.entries}, b)
        aligned = permute_units(b, alignment)
        _check_same_function(evaluator, b, aligned, split)
        b = aligned

    # Measure every point on the line in one working model.
    path = LinearPath(evaluator, a, b, bn_reset=bn_reset)
    scores = []
    for alpha in alphas:
        scores.append(path.evaluate_at(float(alpha), split))
        log.info("α = %.3f: loss %.4f", alpha, scores[-1].loss)
    loss = [s.loss for s in scores]
    error = None if scores[0].error is None else [float(s.error or 0.0) for s in scores]

    # The spectral view beside the barrier.
    a_vectors, b_vectors, source = _spectra_for(store, Path(a_path), Path(b_path), a, b_saved)
    layers = layer_agreements(a, a_vectors, b_vectors, alignment)

    return ConnectivityReport(
        a=str(a_path),
        b=str(b_path),
        model=evaluator.model_source,
        data=evaluator.data_source,
        split=split,
        examples=scores[0].examples,
        alphas=[float(alpha) for alpha in alphas],
        loss=loss,
        error=error,
        loss_barrier=interpolation_barrier(alphas, loss),
        error_barrier=None if error is None else interpolation_barrier(alphas, error),
        batchnorm=evaluator.has_batchnorm,
        bn_reset=path.bn_reset,
        align=align,
        alignment_sweeps=None if alignment is None else alignment.sweeps,
        moved_units=None if alignment is None else alignment.moved_units,
        spectra=source,
        layers=layers,
    )


def _check_same_function(evaluator: Evaluator, b: Tensors, aligned: Tensors, split: str) -> None:
    """Raise EvaluationError unless the permuted B gives B's outputs on every batch of a split.

    The outputs compared are the first tensor found in what the model returns (a tensor, or the
    first in a mapping, sequence or dataclass such as a Hugging Face ``ModelOutput``).
    """
    for i, (inputs, _) in enumerate(evaluator.batches(split)):
        outputs = []
        for state in (b, aligned):
            evaluator.load(state)
            evaluator.model.eval()
            with torch.inference_mode():
                outputs.append(first_tensor(call_model(evaluator.model, inputs)))
        before, after = outputs
        if before is None or after is None:
            raise EvaluationError(
                "--align weights cannot check that the permuted B computes what B did: the "
                "model's output holds no tensor to compare; use --align none"
            )
        scale = float(before.abs().max()) if before.numel() else 0.0
        same = before.shape == after.shape and torch.allclose(
            before, after, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True
        )
        if not same:
            raise EvaluationError(
                f"--align weights changed what B computes (batch {i} of split {split!r}): the "
                "model is not the plain chain its tensor order suggests (residual connections "
                "or reordered layers); use --align none"
            )


def first_tensor(output: object) -> torch.Tensor | None:
    """The first tensor in a model's output, searched depth first; None when it holds none.

    Parameters
    ----------
    output
        A tensor, or a mapping, tuple, list or dataclass (a Hugging Face ``ModelOutput`` is an
        ordered mapping) holding one somewhere.

    Returns
    -------
    torch.Tensor or None
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        parts: Iterable[object] = output.values()
    elif isinstance(output, (tuple, list)):
        parts = output
    elif is_dataclass(output) and not isinstance(output, type):
        parts = (getattr(output, field.name) for field in fields(output))
    else:
        return None
    for part in parts:
        found = first_tensor(part)
        if found is not None:
            return found
    return None
