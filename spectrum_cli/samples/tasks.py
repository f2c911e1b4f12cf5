"""The data of the sample runs, rebuilt from the ``data`` entry of a checkpoint's metadata.

Two tasks. *Modular addition* (Power et al. 2022, the grokking task): every pair (a, b) with
0 ≤ a, b < p, input one-hot(a) ⊕ one-hot(b), label (a + b) mod p, a seeded fraction of the
pairs for training and the rest for validation. *Digits*: the 1,797 8 × 8 handwritten digits of
UCI optdigits (Alpaydin & Kaynak 1998, CC BY 4.0, as scikit-learn ships them), read from the
``data/digits.npz`` file beside the samples, with a seeded train/validation split and, on
request, seeded shuffled training labels.

Every random choice here goes through :func:`numpy.random.default_rng`, so the same metadata
gives the same split on any machine. Nothing here needs scikit-learn.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrum_cli.errors import EvaluationError

MODULAR_ADDITION = "modular_addition"
DIGITS = "digits"

# Where the digits live, relative to the samples root.
DIGITS_FILE = "data/digits.npz"


@dataclass(frozen=True)
class Split:
    """One split of a task: inputs ``x`` (n, features) float32 and labels ``y`` (n,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TaskData:
    """A task's training and validation splits and its number of classes."""

    train: Split
    val: Split
    num_classes: int


def default_samples_root() -> Path:
    """The ``sample_checkpoints`` directory of this source tree."""
    return Path(__file__).resolve().parents[2] / "sample_checkpoints"


def modular_addition(p: int, train_fraction: float, seed: int) -> TaskData:
    """The pairs (a, b) of residues mod p, labelled (a + b) mod p, split at random.

    Parameters
    ----------
    p
        The modulus; there are p² pairs and p classes.
    train_fraction
        The fraction of pairs used for training, rounded to a whole number of pairs.
    seed
        Seed of the permutation that chooses the training pairs.

    Returns
    -------
    TaskData
        Inputs one-hot(a) ⊕ one-hot(b), shape (n, 2p); pairs in permuted order.
    """
    if p < 2 or not 0.0 < train_fraction < 1.0:
        raise EvaluationError(
            f"modular addition needs p ≥ 2 and 0 < train_fraction < 1, "
            f"got p={p}, train_fraction={train_fraction}"
        )

    # Pair index i stands for (a, b) = (i // p, i % p).
    pairs = np.random.default_rng(seed).permutation(p * p)
    a, b = pairs // p, pairs % p
    eye = np.eye(p, dtype=np.float32)
    x = torch.from_numpy(np.concatenate([eye[a], eye[b]], axis=1))  # (p², 2p)
    y = torch.from_numpy((a + b) % p).long()

    n_train = round(train_fraction * p * p)
    return TaskData(Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), p)


def write_digits(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write digits as an ``.npz`` whose bytes depend on the arrays alone.

    :func:`numpy.savez_compressed` stamps the archive with the current time; this writer
    fixes the timestamp so that regenerating the file gives the same bytes.

    Parameters
    ----------
    path
        The file to write.
    images
        uint8 (n, 8, 8), values 0–16.
    labels
        uint8 (n,), values 0–9.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in (("images", images), ("labels", labels)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def digits(
    path: Path,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    shuffled_labels: bool = False,
    label_seed: int | None = None,
) -> TaskData:
    """The UCI optdigits images, pixels scaled to [0, 1], split into train and validation.

    Parameters
    ----------
    path
        The ``digits.npz`` file (uint8 ``images`` (n, 8, 8) and ``labels`` (n,)).
    val_fraction
        The fraction of images held out for validation, rounded to a whole number.
    split_seed
        Seed of the permutation that chooses the validation images.
    shuffled_labels
        Permute the training labels at random (validation labels stay true), so that the
        training set can only be memorised.
    label_seed
        Seed of that permutation; needed when ``shuffled_labels``.

    Returns
    -------
    TaskData
        Inputs (n, 64) float32, 10 classes.
    """
    if not path.is_file():
        raise EvaluationError(
            f"digits data not found at {path}; run scripts/make_samples.py (needs scikit-learn) "
            "to write it"
        )
    if shuffled_labels and label_seed is None:
        raise EvaluationError("shuffled digits labels need a label_seed, got none")

    with np.load(path, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 16.0)  # (n, 64)
    y = torch.from_numpy(labels.astype(np.int64))

    # The first n_val images of a seeded permutation are held out.
    order = torch.from_numpy(np.random.default_rng(split_seed).permutation(len(y)))
    n_val = round(val_fraction * len(y))
    val, train = order[:n_val], order[n_val:]
    y_train = y[train]
    if shuffled_labels:
        y_train = y_train[
            torch.from_numpy(np.random.default_rng(label_seed).permutation(len(train)))
        ]
    return TaskData(Split(x[train], y_train), Split(x[val], y[val]), 10)


def build_data(task: str, data: Mapping[str, Any], *, root: Path | None = None) -> TaskData:
    """Rebuild a sample run's data from its checkpoint metadata.

    Parameters
    ----------
    task
        The metadata's ``task``: ``"modular_addition"`` or ``"digits"``.
    data
        The metadata's ``data`` entry.
    root
        The samples root that relative data files are resolved against; by default the
        ``sample_checkpoints`` directory of this source tree.

    Returns
    -------
    TaskData
        The same splits, in the same order, as the run was trained on.
    """
    try:
        if task == MODULAR_ADDITION:
            return modular_addition(
                int(data["p"]), float(data["train_fraction"]), int(data["seed"])
            )
        if task == DIGITS:
            path = (root or default_samples_root()) / data.get("file", DIGITS_FILE)
            return digits(
                path,
                val_fraction=float(data["val_fraction"]),
                split_seed=int(data["split_seed"]),
                shuffled_labels=bool(data.get("shuffled_labels", False)),
                label_seed=data.get("label_seed"),
            )
    except KeyError as missing:
        raise EvaluationError(
            f"{task} data metadata lacks {missing}; got keys {sorted(data)}"
        ) from None
    raise EvaluationError(
        f"unknown sample task {task!r}; expected {MODULAR_ADDITION!r} or {DIGITS!r}"
    )


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classifier on a split, in one batch.

    Parameters
    ----------
    model
        Maps inputs (n, features) to logits (n, classes).
    split
        The examples to score.

    Returns
    -------
    tuple of float
        (loss, accuracy).
    """
    was_training = model.training
    model.eval()
    logits = model(split.x)
    model.train(was_training)
    loss = nn.functional.cross_entropy(logits, split.y).item()
    accuracy = (logits.argmax(dim=1) == split.y).float().mean().item()
    return loss, accuracy
