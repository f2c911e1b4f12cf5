"""The models of the sample runs, built from the ``arch`` entry of a checkpoint's metadata.

Every sample model is a plain multilayer perceptron, ``nn.Sequential`` of ``Linear`` and
``ReLU``, so its state-dict keys are ``0.weight``, ``0.bias``, ``2.weight``, … in layer order
(and, with fewer than six layers, in sorted order too). The architecture entry reads::

    {"kind": "mlp", "widths": [64, 128, 128, 10], "activation": "relu"}

``widths`` runs from the input features to the classes; every width but the last is followed
by a ``Linear`` layer, every ``Linear`` but the last by the activation.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from spectrum_cli.errors import EvaluationError

MLP = "mlp"
ACTIVATIONS = {"relu": nn.ReLU}


def build_model(
    arch: Mapping[str, Any], *, seed: int | None = None, init_scale: float = 1.0
) -> nn.Sequential:
    """Build the model an architecture entry describes.

    Parameters
    ----------
    arch
        The metadata's ``arch`` entry: ``kind`` (``"mlp"``), ``widths`` and ``activation``.
    seed
        Seed of the initial weights (PyTorch's default ``Linear`` initialisation). The global
        random state is left as it was. ``None`` draws from the global state.
    init_scale
        Factor applied to every initial weight and bias; below 1 it puts training in the
        feature-learning regime, where the learned structure dominates the random start.

    Returns
    -------
    torch.nn.Sequential
        ``Linear``/activation layers; load a checkpoint into it with ``strict=True``.
    """
    kind = arch.get("kind")
    if kind != MLP:
        raise EvaluationError(f"unknown sample architecture kind {kind!r}; expected {MLP!r}")
    widths = [int(width) for width in arch.get("widths", [])]
    if len(widths) < 2 or min(widths) < 1:
        raise EvaluationError(f"an mlp needs two or more positive widths, got {widths}")
    activation = arch.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise EvaluationError(
            f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
        )

    # Draw the initial weights from their own seed without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
            if i > 0:
                layers.append(ACTIVATIONS[activation]())
            layers.append(nn.Linear(fan_in, fan_out))
        model = nn.Sequential(*layers)

    if init_scale != 1.0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(init_scale)
    return model
