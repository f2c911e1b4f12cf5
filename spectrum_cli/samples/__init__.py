"""The sample checkpoints: rebuild a sample run's model and data from one checkpoint.

Each checkpoint that ``scripts/make_samples.py`` writes is a safetensors file whose metadata
holds one entry, ``"spectrum"``, a JSON object::

    {"task": "digits", "step": 1200,
     "arch": {"kind": "mlp", "widths": [64, 128, 128, 10], "activation": "relu"},
     "data": {"file": "data/digits.npz", "val_fraction": 0.2, "split_seed": 0, ...},
     "hparams": {"optimizer": "adamw", "lr": 0.002, "batch_size": 128, ...}}

and, for runs that branch off another, ``"spawn"`` (parent run and step) or ``"mask"`` (mask
file, kept fraction, rewind step). That is enough to rebuild the model
(:func:`~spectrum_cli.samples.models.build_model`) and its data
(:func:`~spectrum_cli.samples.tasks.build_data`) with no code from the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from spectrum_cli.errors import CheckpointError
from spectrum_cli.samples.models import build_model
from spectrum_cli.samples.tasks import (
    DIGITS,
    DIGITS_FILE,
    MODULAR_ADDITION,
    Split,
    TaskData,
    build_data,
    default_samples_root,
    digits,
    evaluate,
    modular_addition,
)

__all__ = [
    "DIGITS",
    "DIGITS_FILE",
    "METADATA_KEY",
    "MODULAR_ADDITION",
    "Sample",
    "Split",
    "TaskData",
    "build_data",
    "build_model",
    "default_samples_root",
    "digits",
    "evaluate",
    "find_samples_root",
    "load_sample",
    "modular_addition",
    "read_metadata",
    "rebuild_sample",
]

# The safetensors metadata key that holds a sample checkpoint's description.
METADATA_KEY = "spectrum"


@dataclass
class Sample:
    """A sample checkpoint brought back to life: its model with weights, data and metadata."""

    model: nn.Sequential
    data: TaskData
    metadata: dict[str, Any]


def read_metadata(path: Path) -> dict[str, Any]:
    """Read the ``"spectrum"`` metadata entry of a sample checkpoint.

    Parameters
    ----------
    path
        A ``.safetensors`` file written by ``scripts/make_samples.py``.

    Returns
    -------
    dict
        The parsed entry: ``task``, ``step``, ``arch``, ``data``, ``hparams`` and, for branched
        runs, ``spawn`` or ``mask``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as checkpoint:
            metadata = checkpoint.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"cannot read {path} as safetensors: {error}") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{path} has no {METADATA_KEY!r} metadata (found keys {sorted(metadata)}); "
            "only sample checkpoints carry it, pass --model and --data for others"
        )
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: {METADATA_KEY!r} metadata is not JSON: {error}") from None


def find_samples_root(checkpoint: Path) -> Path:
    """The samples root of a checkpoint: the nearest directory above it holding the digits.

    Parameters
    ----------
    checkpoint
        A checkpoint file anywhere below a samples root.

    Returns
    -------
    Path
        The first parent with ``data/digits.npz``; the source tree's ``sample_checkpoints``
        when none has.
    """
    for parent in Path(checkpoint).resolve().parents:
        if (parent / DIGITS_FILE).is_file():
            return parent
    return default_samples_root()


def rebuild_sample(path: Path) -> Sample:
    """Rebuild a sample checkpoint's model and data from its metadata, without its weights.

    Parameters
    ----------
    path
        A ``.safetensors`` checkpoint written by ``scripts/make_samples.py``.

    Returns
    -------
    Sample
        The model with fresh initial weights, the task's splits, and the parsed metadata.
    """
    path = Path(path)
    metadata = read_metadata(path)
    for key in ("task", "arch", "data"):
        if key not in metadata:
            raise CheckpointError(f"{path}: sample metadata lacks {key!r}")
    model = build_model(metadata["arch"])
    data = build_data(metadata["task"], metadata["data"], root=find_samples_root(path))
    return Sample(model, data, metadata)


def load_sample(path: Path) -> Sample:
    """Rebuild a sample checkpoint's model, load its weights strictly, and rebuild its data.

    Parameters
    ----------
    path
        A ``.safetensors`` checkpoint written by ``scripts/make_samples.py``.

    Returns
    -------
    Sample
        The model (in eval mode), the task's splits, and the parsed metadata.
    """
    from safetensors.torch import load_file

    sample = rebuild_sample(path)
    try:
        sample.model.load_state_dict(load_file(path), strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path} does not fit its own arch {sample.metadata['arch']}: {error}"
        ) from None
    sample.model.eval()
    return sample
