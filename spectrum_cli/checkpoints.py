"""Find the runs and checkpoints under a folder, and read their weights without running code.

A *run* is a directory of checkpoints from one training run, named by its path under the
analysed root; a *checkpoint* is one weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``,
``.ckpt``) or one directory holding a model in Hugging Face layout (``model.safetensors``,
``pytorch_model.bin``, or shards listed in an ``*.index.json``). :func:`discover` reads each
checkpoint's step from its name, or from metadata inside when the name has none, and leaves out
optimizer, scheduler, scaler and RNG files, and files named as masks (``mask.safetensors``,
``lottery_mask.pt``). :func:`load_tensors` yields a checkpoint's weights one tensor at a time,
unwrapped from the usual containers (``state_dict``, ``model_state``, …) and with wrapper
prefixes (``module.``, ``_orig_mod.``, Lightning's ``model.``) stripped; a weight pruned with
``torch.nn.utils.prune`` is yielded masked, and :func:`load_with_masks` gives it unmasked with
its mask. Files and container keys are told apart by whole words of their names: ``lr_scheduler``
is scheduler state, ``upscaler`` a model. What a reader leaves out of a checkpoint (a second
model beside the one read, tensors of a dtype it cannot read) it names in a note.

Pickled checkpoints are read with PyTorch's weights-only unpickler and memory-mapped where the
file format allows. Classes and functions that unpickler does not know (a whole pickled
``nn.Module``, a Lightning module's hyper-parameters, or a payload that names ``exec``) are
replaced by inert stand-ins that keep data and run nothing; globals from ``os`` and ``sys`` are
refused outright by PyTorch. Formats followed: safetensors
(https://huggingface.co/docs/safetensors), ``torch.save`` zip and legacy files, Hugging Face
sharded checkpoints, PyTorch Lightning ``.ckpt`` files.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import mmap
import os
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spectrum_cli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_HF_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_HF_SHARD = re.compile(r"^(?:model|pytorch_model)-\d+-of-(\d+)\.(?:safetensors|bin)$")
# NumPy's type for each safetensors dtype it holds (not BF16, nor the F8 kinds): little-endian.
_NUMPY_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}  # fmt: skip
# Words that name optimizer, scheduler, scaler or RNG state, not weights: whole words of a name,
# so that ``lr_scheduler`` and ``optim_states_1`` are such state and ``upscaler`` is not.
_NOT_MODEL_WORD = re.compile(
    r"(?:optim(?:izer|iser)?|(?:lr)?scheduler|(?:grad|amp)?scaler)s?|rngs?", re.IGNORECASE
)
# Words that may follow "mask" in the name of a file that holds a mask: its step, round, …
_MASK_TAIL = frozenset(
    ("step", "steps", "global", "epoch", "epochs", "iter", "iteration", "iterations", "it",
     "checkpoint", "ckpt", "round", "rounds", "level", "levels", "rank", "sparsity", "final",
     "best", "last", "latest", "init", "initial", "v", "fp", "bf", "float")
)  # fmt: skip
_LIGHTNING_LAST = re.compile(r"^last(?:-v\d+)?$")
_STEP_WORD = re.compile(r"(?<![a-z])(?:global_?)?steps?[-_=]?(\d+)", re.IGNORECASE)
# Words after which a number counts training progress (``checkpoint-500``, ``iter_400``).
_COUNTER_WORD = re.compile(
    r"(?<![a-z])(?:checkpoint|ckpt|iter|iteration|epoch|model|weights)s?(?![a-z])", re.IGNORECASE
)
# A number that follows a counter word, or stands alone between separators: not ``resnet50``.
_COUNT = re.compile(
    r"(?:(?<![a-z])(?:checkpoint|ckpt|iter|iteration|epoch|model|weights)s?[-_=]?|"
    r"(?<![a-z0-9]))(\d+)(?![a-z0-9])",
    re.IGNORECASE,
)
# A minus sign before a number, after a separator or at the start: ``step_-5``, ``-5``.
_NEGATIVE = re.compile(r"(?:^|[^a-z0-9])-\d", re.IGNORECASE)
_DTYPE_WORD = re.compile(r"(?<![a-z0-9])(?:fp|bf|float|u?int)\d+(?![0-9])", re.IGNORECASE)
_CHECKPOINT_DIR = re.compile(r"(?:checkpoint|ckpt|step|iter|epoch)[-_=]?\d+", re.IGNORECASE)
_CONTAINER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.nn.utils.prune saves a pruned `fc.weight` as `fc.weight_orig` and `fc.weight_mask`.
PRUNE_ORIG, PRUNE_MASK = "_orig", "_mask"
# Files that mark a directory as a training checkpoint even when its weights are missing.
_CHECKPOINT_MARKERS = ("config.json", "trainer_state.json", "generation_config.json")
# The store keeps steps as int64.
_MAX_STEP = 2**63 - 1
# Deeper nesting than this is no state dict: a pickle that contains itself, or a hostile one.
_MAX_DEPTH = 64
# A pickle naming more unknown classes than this is no checkpoint.
_MAX_STAND_INS = 256
# safe_globals edits a process-wide allowlist, and catch_warnings the process-wide warning
# filters: one pickle load at a time across threads.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True, order=True)
class Checkpoint:
    """One saved model of one run: its run name, training step and weights path.

    ``folder`` is the run's folder, which holds every checkpoint of the run (for a model that
    is a run of its own, the model itself); it does not take part in comparisons.
    """

    run: str
    step: int
    path: Path
    folder: Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Discovery:
    """The checkpoints found under a root, sorted by (run, step), and one note per decision."""

    checkpoints: list[Checkpoint]
    notes: list[str]


def step_from_name(name: str) -> int | None:
    """Read a training step from a file or directory name.

    An explicit ``step`` token wins (``epoch=3-step=900`` gives 900, ``global_step1200`` gives
    1200). Otherwise a name with a counter word (``checkpoint``, ``ckpt``, ``iter``,
    ``iteration``, ``epoch``, ``model``, ``weights``) gives its last number that follows such a
    word or stands alone between separators (``ckpt_epoch_7`` gives 7, ``checkpoint_3_500``
    gives 500), and a name of digits and separators alone gives its last number (``000400``).
    Other names give none, so that a number in a model's name is no step (``resnet50``,
    ``llama-3-8b``), and neither does a name with a negative number (``step_-5``). Dtype words
    such as ``fp16`` are not numbers here.

    Parameters
    ----------
    name : str
        A file name (its weights suffix is ignored) or a directory name.

    Returns
    -------
    int or None
        The step, or None when the name gives none by these rules.
    """
    stem = name[: -len(Path(name).suffix)] if name.endswith(WEIGHT_SUFFIXES) else name
    if _NEGATIVE.search(stem):
        return None
    stem = _DTYPE_WORD.sub("_", stem)
    explicit = _STEP_WORD.findall(stem)
    if explicit:
        return int(explicit[-1])
    bare = not re.search(r"[^\W\d_]", stem)  # no letters left
    counts = _COUNT.findall(stem)
    if counts and (bare or _COUNTER_WORD.search(stem)):
        return int(counts[-1])
    return None


def normalise_name(key: str) -> str:
    """Strip the leading wrapper prefixes ``module.`` and ``_orig_mod.`` from a state-dict key.

    ``module._orig_mod.fc.weight`` (DataParallel around ``torch.compile``) becomes ``fc.weight``.
    """
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _words(name: str) -> list[str]:
    """The words of a name, lower-cased: its runs of letters (``optim_states_1``: optim, states)."""
    return re.findall(r"[a-z]+", name.lower())


def _not_model(name: str) -> bool:
    """Whether a file name or a container's key names optimizer, scheduler, scaler or RNG state.

    Whole words count: ``optimizer``, ``optim_states``, ``lr_scheduler``, ``grad_scaler``,
    ``rng_state``, ``training_args``; ``upscaler``, ``optimized`` and ``generator`` do not.
    """
    words = _words(name)
    pairs = itertools.pairwise(words)
    return any(map(_NOT_MODEL_WORD.fullmatch, words)) or ("training", "args") in pairs


def _mask_name(name: str) -> bool:
    """Whether a weights file's name says it holds a pruning mask rather than a model.

    The word ``mask`` (or ``masks``) followed by nothing but numbers and words of progress
    (``mask.safetensors``, ``lottery_mask_05.pt``, ``mask_step_100.pt``) names a mask; followed
    by other words it names a model (``mask_rcnn_step_400.pt``), and ``masked`` is no mask.
    """
    stem = name[: -len(Path(name).suffix)] if name.endswith(WEIGHT_SUFFIXES) else name
    words = _words(stem)
    last = max((i for i, word in enumerate(words) if word in ("mask", "masks")), default=None)
    return last is not None and all(word in _MASK_TAIL for word in words[last + 1 :])


def discover(root: Path) -> Discovery:
    """Find every run and checkpoint under a root folder.

    Parameters
    ----------
    root : Path
        A folder of runs (runs may nest: ``root/sweep/lr1/step_1.pt`` is run ``sweep/lr1``),
        one run's folder, one checkpoint directory, or one checkpoint file.

    Returns
    -------
    Discovery
        Checkpoints sorted by (run, step), and notes on what was skipped and why.

    Raises
    ------
    UsageError
        If the root does not exist or holds no checkpoint.
    """
    root = Path(root).absolute()
    if not root.exists():
        raise UsageError(f"{root} does not exist; give a folder of training runs or a checkpoint")
    found: list[Checkpoint] = []
    notes: list[str] = []
    weights = root if root.is_file() else _checkpoint_dir_weights(root, _listing(root, notes))
    if weights is None:
        _scan(root, root, found, notes, visited={os.path.realpath(root)})
    elif root.is_dir() or _is_model_file(root, root.parent, notes):
        # One step of a run (step_300.pt, checkpoint-500/) belongs to the run of its folder,
        # named as `analyze FOLDER` names it; a model without a step is a run of its own.
        alone = not (step_from_name(root.name) is not None and root.parent.name)
        run = (root.stem if root.is_file() else root.name) if alone else root.parent.name
        checkpoint = _checkpoint(run, weights, notes, named=root, default_step=0)
        if checkpoint is not None:
            found.append(replace(checkpoint, folder=root) if alone else checkpoint)
    if not found:
        skipped = "; ".join(notes[:3])
        raise UsageError(
            f"no checkpoint under {root}: looked for files ending in {', '.join(WEIGHT_SUFFIXES)} "
            "and Hugging Face checkpoint directories" + (f" ({skipped})" if skipped else "")
        )
    checkpoints = _drop_duplicate_steps(found, notes)
    for run, group in itertools.groupby(checkpoints, key=lambda checkpoint: checkpoint.run):
        steps = [checkpoint.step for checkpoint in group]
        held = (
            f"1 checkpoint, step {steps[0]}"
            if len(steps) == 1
            else f"{len(steps)} checkpoints, steps {steps[0]} to {steps[-1]}"
        )
        notes.append(f"run {run}: {held}")
    return Discovery(checkpoints=checkpoints, notes=notes)


def _scan(
    directory: Path, root: Path, found: list[Checkpoint], notes: list[str], visited: set[str]
) -> None:
    """Collect the checkpoints of the run in ``directory`` and recurse into nested runs."""
    run = directory.relative_to(root).as_posix() if directory != root else root.name
    for name in _listing(directory, notes):
        path = directory / name
        checkpoint = None
        if path.is_dir():
            real = os.path.realpath(path)
            if real in visited:
                continue
            visited.add(real)
            names = _listing(path, notes)
            weights = _checkpoint_dir_weights(path, names)
            if weights is None and _looks_like_a_checkpoint(path, names):
                weights = path  # loading it says what it lacks
            if weights is None:
                _scan(path, root, found, notes, visited)
            else:
                checkpoint = _checkpoint(run, weights, notes, named=path)
        elif _is_model_file(path, root, notes):
            checkpoint = _checkpoint(run, path, notes, named=path)
        if checkpoint is not None:
            found.append(checkpoint)


def _listing(directory: Path, notes: list[str]) -> list[str]:
    """The visible entries of a directory, sorted; a note instead of an error if unreadable."""
    try:
        return sorted(name for name in os.listdir(directory) if not name.startswith("."))
    except OSError as error:
        notes.append(f"skipped {directory}: cannot list it ({error.strerror})")
        return []


def _is_model_file(path: Path, root: Path, notes: list[str]) -> bool:
    """Whether a file holds a model's weights; weights-like files that do not get a note."""
    if not path.name.endswith(WEIGHT_SUFFIXES):
        return False
    where = path.relative_to(root).as_posix()
    if not path.is_file():
        # Never opened: reading a FIFO would wait for a writer that may never come.
        if path.is_symlink() and not path.exists():
            what = f"a broken symbolic link (to {os.readlink(path)})"
        else:
            what = "not a regular file (a FIFO, socket or device)"
        notes.append(f"skipped {where}: {what}; point it at a checkpoint or remove it")
        return False
    if _not_model(path.stem):
        notes.append(f"skipped {where}: optimizer, scheduler, scaler or RNG state, not weights")
        return False
    if _mask_name(path.name):
        notes.append(f"skipped {where}: a mask by its name, not weights (`spectrum masks --mask`)")
        return False
    if path.suffix == ".ckpt" and _LIGHTNING_LAST.match(path.stem):
        notes.append(f"skipped {where}: {path.name} repeats a step saved under another name")
        return False
    return True


def _single_model_file(names: list[str]) -> str | None:
    """The one weights file among ``names`` that is not optimizer or RNG state, if just one."""
    models = [
        n for n in names if n.endswith(WEIGHT_SUFFIXES) and not _not_model(n) and not _mask_name(n)
    ]
    return models[0] if len(models) == 1 else None


def _checkpoint_dir_weights(directory: Path, names: list[str]) -> Path | None:
    """What to load for a directory that is one checkpoint, or None if it is not one.

    A Hugging Face layout gives the directory itself; a directory named like a checkpoint
    (``global_step1200``, ``checkpoint-500``) that holds exactly one model file gives that file.
    """
    if any(name in names for layout in _HF_LAYOUTS for name in layout):
        return directory
    if any(_HF_SHARD.match(name) for name in names):
        return directory
    single = _single_model_file(names) if _CHECKPOINT_DIR.search(directory.name) else None
    if single is not None and (directory / single).is_file():
        return directory / single
    return None


def _looks_like_a_checkpoint(directory: Path, names: list[str]) -> bool:
    """Whether a directory without weights is a checkpoint that lost them, not a run.

    It is named like a checkpoint (``checkpoint-500``, ``global_step300``), holds no folder and
    no weights file, and is empty or holds what trainers save beside weights (``config.json``,
    ``trainer_state.json``, optimizer or RNG state).
    """
    if not _CHECKPOINT_DIR.search(directory.name):
        return False
    if any((directory / name).is_dir() for name in names):
        return False
    if any(name.endswith(WEIGHT_SUFFIXES) and not _not_model(name) for name in names):
        return False
    marked = (
        name in _CHECKPOINT_MARKERS or name.endswith(".index.json") or _not_model(name)
        for name in names
    )
    return not names or any(marked)


def _checkpoint(
    run: str, weights: Path, notes: list[str], named: Path, default_step: int | None = None
) -> Checkpoint | None:
    """A checkpoint with its step from the name, else from metadata; None with a note if neither.

    ``named`` is the file or directory whose name may carry the step; ``weights`` is what
    :func:`load_tensors` will read.
    """
    where = f"{named.name} in run {run}"
    step = step_from_name(named.name)
    if step is None:
        try:
            step = _step_from_metadata(named, weights)
        except CheckpointError as error:
            if default_step is not None:  # the one checkpoint asked for: say why, and stop
                raise UsageError(f"{error}; give a checkpoint spectrum can read") from None
            notes.append(f"skipped {where}: {error}")
            return None
        if step is not None:
            notes.append(f"{where}: step {step} read from its metadata")
    if step is None and default_step is not None:
        notes.append(f"{where}: no step in its name or metadata; taken as step {default_step}")
        step = default_step
    suffix = named.suffix if named.is_file() else ""
    if step is None:
        named_as = "a negative step" if _NEGATIVE.search(named.name) else "no step"
        notes.append(
            f"skipped {where}: {named_as} in its name and none in its metadata; "
            f"rename it with its step, e.g. step_100{suffix}"
        )
        return None
    if step > _MAX_STEP:
        notes.append(
            f"skipped {where}: step {step} is beyond the largest step a store keeps "
            f"({_MAX_STEP}); rename it with its step, e.g. step_100{suffix}"
        )
        return None
    return Checkpoint(run=run, step=step, path=weights, folder=named.parent)


def _step_from_metadata(named: Path, weights: Path) -> int | None:
    """The step recorded inside a checkpoint: trainer state, safetensors metadata or pickle."""
    candidates: list[Any] = []
    try:
        trainer_state = named / "trainer_state.json"
        if named.is_dir() and trainer_state.is_file():
            candidates.append(json.loads(trainer_state.read_text()).get("global_step"))
        metadata = read_metadata(weights)
        candidates.append(metadata.get("step"))
        if "spectrum" in metadata:
            ours = json.loads(metadata["spectrum"])
            candidates.append(ours.get("step") if isinstance(ours, dict) else None)
    except (OSError, ValueError, AttributeError, RecursionError) as error:
        raise CheckpointError(f"cannot read its metadata: {_brief(error)}") from error
    if weights.is_file() and weights.suffix != ".safetensors":
        loaded = _read_pickle(weights)
        if isinstance(loaded, Mapping):
            candidates += [loaded.get("global_step"), loaded.get("step")]
    for value in candidates:
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value >= 0:
            return value
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
            return int(value)
    return None


def _drop_duplicate_steps(found: list[Checkpoint], notes: list[str]) -> list[Checkpoint]:
    """Keep one checkpoint per (run, step): safetensors first, then the shortest name."""
    claims: dict[tuple[str, int], list[Checkpoint]] = defaultdict(list)
    for checkpoint in found:
        claims[checkpoint.run, checkpoint.step].append(checkpoint)
    kept = []
    for (run, step), claimants in sorted(claims.items()):
        claimants.sort(key=lambda c: (c.path.suffix != ".safetensors", len(c.path.name), c.path))
        kept.append(claimants[0])
        if len(claimants) > 1:
            skipped = ", ".join(c.path.name for c in claimants[1:])
            notes.append(
                f"{len(claimants)} files claim step {step} in run {run}: "
                f"kept {claimants[0].path.name}, skipped {skipped}"
            )
    return kept


def read_metadata(path: Path) -> dict[str, str]:
    """Read the safetensors header metadata of a file, or of the first shard of a directory.

    Parameters
    ----------
    path : Path
        A ``.safetensors`` file or a Hugging Face checkpoint directory.

    Returns
    -------
    dict of str to str
        The ``__metadata__`` entries; empty for other formats or where there are none.
    """
    path = Path(path)
    files = _weight_files(path) if path.is_dir() else [path]
    if not files or files[0].suffix != ".safetensors":
        return {}
    metadata = _read_header(files[0]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{files[0]} has a malformed safetensors header: __metadata__ is a "
            f"{type(metadata).__name__}, expected a JSON object of strings"
        )
    return {str(key): str(value) for key, value in metadata.items()}


def load_tensors(
    path: Path, *, numpy: bool = False, notes: list[str] | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield the model weights of one checkpoint, one tensor at a time where the format allows.

    A weight pruned with ``torch.nn.utils.prune`` is saved as two tensors, ``fc.weight_orig``
    and ``fc.weight_mask``; it is yielded as the weight the model computes with, ``fc.weight``
    = orig ⊙ mask.

    Parameters
    ----------
    path : Path
        A weights file, or a directory in Hugging Face layout (single file or shards).
    numpy : bool
        Yield NumPy arrays where the file allows: safetensors files whose dtypes NumPy has
        (all but bfloat16 and the 8-bit floats) are then read without importing torch.
    notes : list of str, optional
        Where to add a note on each thing of the checkpoint left out: a tensor of a dtype that
        cannot be read (safetensors' 4- and 6-bit floats), a second model beside the one read
        (``{"model": …, "ema": …}``). Without it, each note is logged as a warning.

    Yields
    ------
    tuple of (str, torch.Tensor or numpy.ndarray)
        The normalised state-dict key and its tensor, in the checkpoint's own order. Tensors of
        every shape and of every dtype but those left out with a note are yielded, sparse ones
        made dense; optimizer and scheduler state never are.

    Raises
    ------
    CheckpointError
        As :func:`load_with_masks`.
    """
    for name, tensor, mask in load_with_masks(path, numpy=numpy, notes=notes):
        if mask is not None:
            mask = mask.astype(tensor.dtype) if _is_array(mask) else mask.to(tensor.dtype)
            tensor = tensor * mask
        yield name, tensor


def load_with_masks(
    path: Path, *, numpy: bool = False, notes: list[str] | None = None
) -> Iterator[tuple[str, Any, Any]]:
    """Yield a checkpoint's weights with the ``torch.nn.utils.prune`` mask of each pruned one.

    Parameters
    ----------
    path : Path
        A weights file, or a directory in Hugging Face layout (single file or shards).
    numpy, notes
        As for :func:`load_tensors`.

    Yields
    ------
    tuple of (str, torch.Tensor, torch.Tensor or None)
        The layer, its tensor and its mask: a pair ``fc.weight_orig``, ``fc.weight_mask`` gives
        (``fc.weight``, the unmasked weight, the mask as stored); every other tensor, a half
        without its partner included, gives (its key, itself, None). In the checkpoint's order,
        a pair where its second half is found and lone halves last.

    Raises
    ------
    CheckpointError
        As :func:`load_tensors` without masks, and if the two halves of a pair differ in shape.
    """
    pending: dict[str, tuple[str, Any]] = {}
    for name, tensor in _stored_tensors(path, numpy, notes):
        half = next((end for end in (PRUNE_ORIG, PRUNE_MASK) if name.endswith(end)), None)
        if half is None:
            yield name, tensor, None
            continue
        layer = name.removesuffix(half)
        if layer not in pending:
            pending[layer] = (half, tensor)
            continue
        _, partner = pending.pop(layer)
        orig, mask = (tensor, partner) if half == PRUNE_ORIG else (partner, tensor)
        if orig.shape != mask.shape:
            raise CheckpointError(
                f"{path}: pruned layer {layer!r} has weight shape {tuple(orig.shape)} but mask "
                f"shape {tuple(mask.shape)}; expected torch.nn.utils.prune's pair of one shape"
            )
        yield layer, orig, mask
    for layer, (half, tensor) in pending.items():
        yield layer + half, tensor, None


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy"


def _stored_tensors(
    path: Path, numpy: bool = False, notes: list[str] | None = None
) -> Iterator[tuple[str, Any]]:
    """The tensors of one checkpoint as stored, one at a time where the format allows.

    Raises
    ------
    CheckpointError
        If the checkpoint is empty, truncated, not a checkpoint, misses a shard or holds no
        tensors.
    """
    path = Path(path)
    files = _weight_files(path)
    index = _index_of(path, _names_in(path)) if path.is_dir() else None
    indexed = _names_by_shard(index) if index is not None else {}
    seen: set[str] = set()
    for file in files:
        held: set[str] = set()  # with the tensors left out, unreadable
        if file.suffix == ".safetensors":
            tensors = _safetensors_tensors(file, numpy, notes, left_out=held)
        else:
            tensors = _pickled(file, notes)
        for name, tensor in tensors:
            if name in seen:
                raise CheckpointError(f"{path}: layer {name!r} is held by two of its shards")
            seen.add(name)
            held.add(name)
            yield name, tensor
        missing = sorted(set(indexed.get(file.name, ())) - held)
        if missing:
            raise CheckpointError(
                f"{path}: its index names {len(missing)} tensors that shard {file.name} does "
                f"not hold ({', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}); "
                "the checkpoint is incomplete or its index is stale"
            )
    if not seen:
        raise CheckpointError(
            f"{path} holds no tensors; expected a state dict of weights, e.g. from "
            "torch.save(model.state_dict(), path)"
        )


def in_model_order(path: Path) -> bool:
    """Whether :func:`load_tensors` yields a checkpoint's tensors in the model's own order.

    ``torch.save`` files keep the state dict's order, which is the order the modules were
    registered in; safetensors files store their keys sorted, so their order says nothing about
    the model.

    Parameters
    ----------
    path : Path
        A weights file, or a directory in Hugging Face layout.
    """
    return not any(file.suffix == ".safetensors" for file in _weight_files(Path(path)))


def _weight_files(path: Path) -> list[Path]:
    """The files that together hold the model saved at ``path``, in shard order."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")
    names = _names_in(path)
    for single, index in _HF_LAYOUTS:
        if single in names:
            return [path / single]
        if index in names:
            return _shards_from_index(path / index)
    shards = sorted(
        (match.string, int(match.group(1))) for match in map(_HF_SHARD.match, names) if match
    )
    if shards:
        if len(shards) != shards[0][1]:
            raise CheckpointError(f"{path} holds {len(shards)} of {shards[0][1]} shards, no index")
        return [path / name for name, _ in shards]
    model_file = _single_model_file(sorted(names))
    if model_file is None:
        raise CheckpointError(
            f"{path} holds no model: expected model.safetensors, pytorch_model.bin, their "
            "shards with an index JSON, or exactly one weights file"
        )
    return [path / model_file]


def _names_in(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as error:
        raise CheckpointError(f"cannot list {directory}: {error.strerror}") from error


def _index_of(directory: Path, names: list[str]) -> Path | None:
    """The shard index of a Hugging Face checkpoint directory, if it has one and no single file."""
    for single, index in _HF_LAYOUTS:
        if single in names:
            return None
        if index in names:
            return directory / index
    return None


def _weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index: tensor key to shard file name, checked."""
    try:
        content = json.loads(index.read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"cannot read the shard index {index}: {_brief(error)}") from error
    if not isinstance(content, dict) or "weight_map" not in content:
        raise CheckpointError(
            f"the shard index {index} has no weight_map: expected a JSON object "
            '{"weight_map": {tensor name: shard file name}}, as save_pretrained writes; '
            "re-save the checkpoint, or remove the index to read the shards without it"
        )
    weight_map = content["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(key, str) and isinstance(name, str) for key, name in weight_map.items()
    ):
        raise CheckpointError(
            f"cannot read the shard index {index}: expected weight_map to map tensor names to "
            "shard file names"
        )
    outside = sorted(
        {n for n in weight_map.values() if n in ("", ".", "..") or "/" in n or "\\" in n}
    )
    if outside:
        raise CheckpointError(
            f"{index} names shards outside its folder ({', '.join(outside[:3])}); "
            "expected plain file names beside the index"
        )
    return weight_map


def _names_by_shard(index: Path) -> dict[str, list[str]]:
    """The normalised layer names a shard index assigns to each shard file."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for key, shard in _weight_map(index).items():
        by_shard[shard].append(normalise_name(key))
    return by_shard


def _shards_from_index(index: Path) -> list[Path]:
    """The shard files an ``*.index.json`` names, each checked to exist."""
    shards = [index.parent / name for name in sorted(set(_weight_map(index).values()))]
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise CheckpointError(f"{index.parent} misses shards named in {index.name}: {missing}")
    return shards


def _read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size."""
    try:
        with open(file, "rb") as handle:
            prefix = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
            if len(prefix) < 8:
                raise CheckpointError(f"{file} is not a safetensors file: only {size} bytes")
            (length,) = struct.unpack("<Q", prefix)
            if length > size - 8:
                raise CheckpointError(
                    f"{file} is truncated or not safetensors: its header claims {length} bytes, "
                    f"only {size - 8} follow"
                )
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(
            f"cannot read the safetensors header of {file}: {_brief(error)}"
        ) from error
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file} is not a safetensors file: expected a JSON object as header, "
            f"got a {type(header).__name__}"
        )
    return header


def _safetensors_tensors(
    file: Path,
    numpy: bool = False,
    notes: list[str] | None = None,
    left_out: set[str] | None = None,
) -> Iterator[tuple[str, Any]]:
    """A safetensors file's tensors: as NumPy arrays when asked and NumPy has every dtype.

    Tensors of a dtype that cannot be read (the 4- and 6-bit floats) are left out with a note,
    and their names added to ``left_out``.
    """
    from safetensors import SafetensorError, safe_open

    header = _read_header(file)
    keys = _stored_order(header, file)
    names = dict(zip(keys, _unique_names(keys, lightning=False, file=file), strict=True))
    unreadable: dict[str, list[str]] = defaultdict(list)  # by dtype
    for key in keys:
        if not _readable(header[key]["dtype"]):
            unreadable[header[key]["dtype"]].append(key)
    skipped = {key for group in unreadable.values() for key in group}
    keys = [key for key in keys if key not in skipped]
    if left_out is not None:
        left_out.update(names[key] for key in skipped)
    numpy = numpy and all(header[key]["dtype"] in _NUMPY_DTYPES for key in keys)
    try:
        # Opening checks the file's whole layout: each tensor's bytes lie inside it, sized as
        # its dtype and shape say.
        with safe_open(file, framework="numpy" if numpy else "pt") as handle:
            for dtype, group in sorted(unreadable.items()):
                _note(
                    notes,
                    f"{file}: left out {len(group)} tensor{'s' if len(group) > 1 else ''} of "
                    f"dtype {dtype}, which spectrum cannot read ({', '.join(group[:3])}"
                    f"{', …' if len(group) > 3 else ''}); its other tensors are read",
                )
            if numpy:
                arrays = _mapped_arrays(file, header, keys)
                yield from zip((names[key] for key in keys), arrays, strict=True)
                return
            for key in keys:
                yield names[key], handle.get_tensor(key)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(_describe_safetensors_failure(file, header, error)) from error


# torch's dtype for each safetensors dtype that torch holds and NumPy does not.
_TORCH_DTYPES = {
    "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu", "C64": "complex64",
}  # fmt: skip


@functools.cache
def _readable(dtype: str) -> bool:
    """Whether tensors of a safetensors dtype can be read, and upcast if they are floats.

    The 4- and 6-bit floats (``F4``, ``F6_E2M3``, ``F6_E3M2``) cannot: torch has no 6-bit
    floats, and its packed ``float4_e2m1fn_x2`` (two values a byte) converts to no other dtype.
    """
    if dtype in _NUMPY_DTYPES:
        return True
    if dtype not in _TORCH_DTYPES:
        return False
    import torch

    kind = getattr(torch, _TORCH_DTYPES[dtype], None)
    if not isinstance(kind, torch.dtype):
        return False
    if not kind.is_floating_point:
        return True
    try:
        torch.zeros(1, dtype=kind).to(torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def _describe_safetensors_failure(file: Path, header: dict[str, Any], error: Exception) -> str:
    """One line on why the safetensors library refused a file whose header parsed."""
    text = _brief(error)
    if "not fully covered" in text:
        # The library checked that the tensors lie end to end from the start of the data.
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            size = os.fstat(handle.fileno()).st_size
        ends = [spec["data_offsets"][-1] for key, spec in header.items() if key != "__metadata__"]
        expected = 8 + length + max(ends, default=0)
        found = (
            f"it is truncated or damaged: its header describes {expected} bytes, the file "
            f"holds only {size}"
            if size < expected
            else f"it is damaged: {size - expected} bytes follow the {expected} its header "
            "describes"
        )
        return f"cannot read {file} as safetensors: {found}; re-save it or remove it"
    unknown = re.search(r"unknown variant `([^`]+)`", text)
    if unknown:
        return (
            f"cannot read {file} as safetensors: a tensor has dtype {unknown.group(1)}, which "
            "the installed safetensors library does not know; upgrade safetensors, or re-save "
            "the weights in another dtype"
        )
    return f"cannot read {file} as safetensors: {text}"


def _mapped_arrays(file: Path, header: dict[str, Any], keys: list[str]) -> Iterator[Any]:
    """Read-only NumPy views of a checked safetensors file's tensors, mapped from the file.

    Nothing is copied: pages are read as the arrays are, and a checkpoint is resident once
    (safetensors' own NumPy arrays are copies, which cost a pass over the bytes and, from its
    default mapping, a second resident copy).
    """
    import numpy as np

    with open(file, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    (length,) = struct.unpack_from("<Q", mapping, 0)
    start = 8 + length
    for key in keys:
        spec = header[key]
        shape, dtype = tuple(spec["shape"]), np.dtype(_NUMPY_DTYPES[spec["dtype"]])
        count = math.prod(shape)
        if count == 0:
            yield np.zeros(shape, dtype)
            continue
        offset = start + spec["data_offsets"][0]
        yield np.frombuffer(mapping, dtype, count, offset).reshape(shape)


def _stored_order(header: dict[str, Any], file: Path) -> list[str]:
    """Tensor keys in the order of their bytes, or in natural order if that order says nothing.

    The safetensors library writes tensors sorted by dtype and then by name, which loses the
    model's order; for such files ``layers.2`` before ``layers.10`` is the better guess.
    """
    entries = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if not (
            isinstance(offsets, list)
            and offsets
            and all(type(offset) is int for offset in offsets)
            and isinstance(dtype, str)
        ):
            raise CheckpointError(
                f"{file} has a malformed safetensors header: tensor {key!r} needs a dtype "
                f"string and integer data_offsets, got {json.dumps(spec)[:80]}"
            )
        entries.append((offsets[0], key, dtype))
    entries.sort()
    by_dtype: dict[str, list[str]] = defaultdict(list)
    for _, key, dtype in entries:
        by_dtype[dtype].append(key)
    keys = [key for _, key, _ in entries]
    if all(group == sorted(group) for group in by_dtype.values()):
        return sorted(keys, key=_natural_key)
    return keys


def _natural_key(key: str) -> list[tuple[int, int, str]]:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _pickled(file: Path, notes: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The weights of a ``torch.save`` file, unwrapped from their container.

    Sparse tensors (a pruned model's COO or CSR weights) are yielded dense. A second model
    beside the one taken (``{"model": …, "ema": …}``) is left out, with a note naming it.
    """
    import torch

    loaded = _read_pickle(file)
    if _is_optimizer_state(loaded):
        raise CheckpointError(
            f"{file} holds an optimizer's state, not model weights; pass the file the model "
            "was saved to, or move this one out of the run's folder"
        )
    lightning = isinstance(loaded, Mapping) and "state_dict" in loaded
    lightning = lightning and ("pytorch-lightning_version" in loaded or "global_step" in loaded)
    left_out: list[tuple[str, str]] = []
    try:
        tensors = list(_flatten(_model_state(loaded, left_out=left_out), prefix=""))
    except _TooDeep:
        raise CheckpointError(
            f"cannot read {file}: its containers nest more than {_MAX_DEPTH} levels deep or "
            "contain themselves; expected a state dict of tensors"
        ) from None
    names = _unique_names([key for key, _ in tensors], lightning=lightning, file=file)
    for taken, others in itertools.groupby(left_out, key=lambda pair: pair[0]):
        _note(
            notes,
            f"{file}: read the weights under {taken!r}; left out the weights under "
            f"{', '.join(repr(other) for _, other in others)}: save them to a file of their "
            "own to analyse them",
        )
    for name, (_, tensor) in zip(names, tensors, strict=True):
        yield name, tensor.to_dense() if tensor.layout != torch.strided else tensor


def _read_pickle(file: Path) -> Any:
    """Load a ``torch.save`` file on the CPU without running any code it names."""
    import torch

    try:
        with open(file, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot open {file}: {error.strerror}") from error
    if not magic:
        raise CheckpointError(f"{file} is empty; expected a torch.save checkpoint")
    zipped = magic == b"PK\x03\x04"  # legacy (pre-zip) files cannot be memory-mapped
    short = _short_record(file) if zipped else None
    if short is not None:
        raise CheckpointError(
            f"cannot read {file} as a torch.save checkpoint ({short}); the file is damaged: "
            "re-save it or remove it"
        )

    def load() -> Any:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)

    def load_inert() -> Any:
        # TODO(torch>=2.5 required): older PyTorch has no safe_globals, so there a pickle that
        # names a class outside the weights-only allowlist is refused rather than read inertly.
        if not hasattr(torch.serialization, "safe_globals"):
            return load()
        # Zip files list their globals up front; a legacy file names one per refusal.
        unknown: set[str] = set()
        while True:
            stand_ins: list[Any] = [(_stand_in(name), name) for name in sorted(unknown)]
            try:
                with torch.serialization.safe_globals(stand_ins):
                    return load()
            except pickle.UnpicklingError as error:
                found = set(_unknown_globals(file, error, zipped)) - unknown
                if not found or len(unknown) >= _MAX_STAND_INS:
                    raise
                logger.debug("%s: inert stand-ins for %s", file, ", ".join(sorted(found)))
                unknown |= found

    # PyTorch warns on stderr about odd bytes (an unusual pickle protocol, …): keep its warnings
    # for the debug log, so that a damaged file makes one failure line and a sound one none.
    with _LOAD_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return load_inert()
        except Exception as error:  # damaged bytes surface as RuntimeError, EOFError, IndexError, …
            raise CheckpointError(_describe_load_failure(file, error)) from error
        finally:
            for warning in caught:
                logger.debug("%s: %s", file, warning.message)


# Bytes per element of the storage types torch.save names (``torch.FloatStorage``, …).
_STORAGE_BYTES = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1,
    "ShortStorage": 2, "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4,
    "FloatStorage": 4, "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
}  # fmt: skip


def _short_record(file: Path) -> str | None:
    """Why a zip ``torch.save`` file's storage records cannot hold its tensors, if they cannot.

    Memory-mapped loading takes each storage's size from the pickle and does not check it
    against its record in the archive, so a record cut short would be read past its end. The
    pickle is read here for its storage records alone: every class it names becomes an inert
    stand-in, and nothing is imported or run. None when the records are long enough, or when
    the archive is too damaged to tell (loading it then says why).
    """
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
            pickled = next(e for e in entries if e.filename.rsplit("/", 1)[-1] == "data.pkl")
            folder = pickled.filename.removesuffix("data.pkl") + "data/"
            sizes = {
                entry.filename.removeprefix(folder): entry.file_size
                for entry in entries
                if entry.filename.startswith(folder)
            }
            storages = _StorageLister(archive.open(pickled)).storages()
    except Exception:  # whatever the damage, torch.load diagnoses it
        return None
    for key, needed in storages.items():
        held = sizes.get(key)
        if held is None:
            return f"its pickle names the storage data/{key}, which the archive lacks"
        if held < needed:
            return f"the storage data/{key} holds {held} bytes, its tensors need {needed}"
    return None


class _Inert:
    """Whatever a pickle builds while its storage records are listed: it keeps nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageLister(pickle.Unpickler):
    """Reads a ``torch.save`` pickle for the storages it names: key to bytes needed."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.named: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        per = _STORAGE_BYTES.get(name) if module.split(".")[0] == "torch" else None
        return type(name, (_Inert,), {"bytes_per_element": per})

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage type, key, location, number of elements)
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            per = getattr(pid[1], "bytes_per_element", None)
            if per is not None and type(pid[4]) is int:
                key = str(pid[2])
                self.named[key] = max(self.named.get(key, 0), per * pid[4])
        return _Inert()

    def storages(self) -> dict[str, int]:
        self.load()
        return self.named


def _unknown_globals(file: Path, error: Exception, zipped: bool) -> list[str]:
    """The classes and functions a pickle names that the weights-only unpickler does not know.

    Modules PyTorch blocks (``os``, ``sys``, …) are not among them: those stay refused.
    """
    import torch

    if zipped:
        listed = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        return list(listed(file)) if listed is not None else []
    named = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if named is None:
        return []
    name = named.group(1)
    return [name if "." in name else f"builtins.{name}"]  # PyTorch drops "builtins."


def _describe_load_failure(file: Path, error: Exception) -> str:
    """One line on why a pickle did not load, without PyTorch's advice to trust the file."""
    text = str(error)
    # PyTorch names the global as "GLOBAL os.system", or before 2.4 as "Unsupported class …".
    named = re.search(r"(?:GLOBAL|Unsupported class) (\S+)", text)
    if named and "is blocked" in text:
        return f"refused {file}: unpickling it would call {named.group(1)}"
    if named:
        return (
            f"cannot read {file} without running code: it names {named.group(1)}; "
            "re-save the weights with torch.save(model.state_dict(), path) or as safetensors"
        )
    # Keep PyTorch's diagnosis, not its advice: the weights-only unpickler's last line once its
    # pointer to the documentation is dropped, or the first sentence of any other error.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Check the documentation")]
    if len(lines) > 1 and "Weights only" in lines[0]:
        detail = lines[-1]
    else:
        detail = (lines or [""])[0].split(". ")[0]
    if not _starts_like_torch_save(file):
        detail = "it is neither a zip archive nor a pickle, the two forms torch.save writes"
    elif not re.search(r"[A-Za-z]{3}", detail):  # a bare key or number says nothing
        detail = f"the unpickler stopped: {type(error).__name__} {detail}".strip()
    return (
        f"cannot read {file} as a torch.save checkpoint ({detail or type(error).__name__}); "
        "the file is damaged or was not written by torch.save"
    )


def _starts_like_torch_save(file: Path) -> bool:
    """Whether a file begins as torch.save's files do: a zip archive, or a pickle (legacy)."""
    try:
        with open(file, "rb") as stream:
            head = stream.read(4)
    except OSError:
        return True  # unknown: leave the diagnosis to the loader's error
    return head.startswith((b"PK\x03\x04", b"\x80"))


class _StandIn:
    """An inert stand-in for a class or function a pickle names: it keeps data, runs nothing."""

    qualified_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.cache
def _stand_in(qualified_name: str) -> type[_StandIn]:
    name = qualified_name.rsplit(".", 1)[-1]
    return type(name, (_StandIn,), {"qualified_name": qualified_name})


class _TooDeep(Exception):
    """Containers nest deeper than any state dict does (or contain themselves)."""


def _model_state(
    loaded: Any, depth: int = 0, left_out: list[tuple[str, str]] | None = None, at: str = ""
) -> Mapping[str, Any]:
    """The state dict inside a loaded checkpoint: unwrap containers and pickled modules.

    Where a container key (``model``, ``state_dict``, …) is taken, each other key beside it
    whose value holds matrices (an EMA copy, a teacher) is left out; ``left_out`` then gets
    (the key taken, the key left out), both as dotted paths from the top.
    """
    import torch

    if depth > _MAX_DEPTH:
        raise _TooDeep
    if isinstance(loaded, _StandIn):
        return _module_state(loaded, depth)
    if not isinstance(loaded, Mapping) or _is_optimizer_state(loaded):
        return {}
    if all(isinstance(value, torch.Tensor) for value in loaded.values()):
        return loaded
    for key in _CONTAINER_KEYS:
        inner = _model_state(loaded.get(key), depth + 1, left_out, f"{at}{key}.")
        if any(_flatten(inner, prefix="", depth=depth + 1)):
            if left_out is not None:
                left_out += [
                    (f"{at}{key}", f"{at}{other}")
                    for other, value in loaded.items()
                    if other != key and _holds_matrices(other, value, depth + 1)
                ]
            return inner
    return {key: value for key, value in loaded.items() if not _not_model(str(key))}


def _holds_matrices(key: Any, value: Any, depth: int) -> bool:
    """Whether a value beside the model taken holds weights of its own: 2-D or larger floats.

    Optimizer, scheduler and RNG state is not counted, nor a 0-d score a callback keeps.
    """
    if _not_model(str(key)):
        return False
    if isinstance(value, _StandIn):
        value = _module_state(value, depth)
    if not isinstance(value, Mapping):
        return False
    return any(
        tensor.is_floating_point() and tensor.dim() >= 2
        for _, tensor in _flatten(value, prefix="", depth=depth)
    )


def _module_state(module: _StandIn, depth: int = 0) -> dict[str, Any]:
    """The state dict of a whole pickled ``nn.Module``: parameters, buffers, then submodules."""
    if depth > _MAX_DEPTH:
        raise _TooDeep
    state = module.state if isinstance(module.state, dict) else {}
    transient = state.get("_non_persistent_buffers_set") or set()
    parameters, buffers = state.get("_parameters") or {}, state.get("_buffers") or {}
    modules = state.get("_modules") or {}
    if not all(isinstance(part, Mapping) for part in (parameters, buffers, modules)):
        return {}
    tensors = dict(parameters)
    tensors.update((k, v) for k, v in buffers.items() if k not in transient)
    for name, child in modules.items():
        if isinstance(child, _StandIn):
            tensors[name] = _module_state(child, depth + 1)
    return tensors


def _flatten(
    state: Mapping[str, Any], prefix: str, depth: int = 0
) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a possibly nested state dict, keys joined with dots; other values dropped.

    Optimizer state is dropped whatever its key (``g_opt``, ``adam``): see `_is_optimizer_state`.
    """
    import torch

    if depth > _MAX_DEPTH:
        raise _TooDeep
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, Mapping) and not _is_optimizer_state(value):
            yield from _flatten(value, prefix=f"{prefix}{key}.", depth=depth + 1)


def _is_optimizer_state(value: Any) -> bool:
    """Whether a value has the shape of ``torch.optim.Optimizer.state_dict()``.

    That is ``{"state": {0: {...}, 1: {...}}, "param_groups": [{...}, ...]}``: per-parameter
    state under integer keys, which no model's state dict has.
    """
    if not isinstance(value, Mapping):
        return False
    state, groups = value.get("state"), value.get("param_groups")
    return (
        isinstance(state, Mapping)
        and all(type(key) is int for key in state)
        and isinstance(groups, (list, tuple))
        and all(isinstance(group, Mapping) for group in groups)
    )


def _unique_names(keys: list[str], lightning: bool, file: Path) -> list[str]:
    """Normalised names of a checkpoint's keys, checked to stay one name per layer."""
    names = [normalise_name(key) for key in keys]
    if lightning and names and all(name.startswith("model.") for name in names):
        names = [normalise_name(name.removeprefix("model.")) for name in names]
    clashes = [name for name, count in Counter(names).items() if count > 1]
    if clashes:
        clash = clashes[0]
        raise CheckpointError(
            f"{file}: two keys become layer {clash!r} once wrapper prefixes are stripped"
        )
    return names


def _note(notes: list[str] | None, note: str) -> None:
    """Keep a note on what a reader left out: in ``notes`` if given, else as a logged warning."""
    if notes is None:
        logger.warning("%s", note)
    else:
        notes.append(note)


def _brief(error: BaseException) -> str:
    """An exception as one short line: its message, or its type when the message is empty."""
    text = " ".join(str(error).split())
    return (text[:200] + "…") if len(text) > 200 else text or type(error).__name__
