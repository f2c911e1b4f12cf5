"""Write the sample checkpoints: small, real training runs that show the paper's effects.

Usage::

    python scripts/make_samples.py [--out sample_checkpoints] [--only digits-true ...]

Six families of runs, on the CPU, single-threaded and seeded, so that a second run writes the
same bytes on the same machine and library versions (about a minute on two cores):

- ``modadd-wd``, ``modadd-nowd``: modular addition with and without weight decay; grokking and
  the fall in effective rank that comes with it (Yunis et al. 2024, section 5).
- ``digits-true``, ``digits-shuffled``: a digits classifier on true and on shuffled labels;
  memorisation keeps the rank high.
- ``spawn``: children spawned from one parent at several steps, and a child of a parent with
  another initialisation; siblings agree more and sit in one basin the later they split.
- ``masked``: a dense run, its 5 % magnitude mask, and a masked run rewound to an early step.

Each run directory holds ``step_<N>.safetensors`` checkpoints whose ``"spectrum"`` metadata
rebuilds model and data (see :mod:`spectrum_cli.samples`) and a ``metrics.csv``. The digits
come from scikit-learn the first time (``data/digits.npz``); later runs read that file only.
``tests/test_samples.py`` checks the effects on what this script wrote.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from spectrum_cli.samples import (
    DIGITS,
    DIGITS_FILE,
    METADATA_KEY,
    MODULAR_ADDITION,
    TaskData,
    build_data,
    build_model,
    evaluate,
)
from spectrum_cli.samples.tasks import write_digits

log = logging.getLogger("make_samples")

ROOT = Path(__file__).resolve().parents[1]
MASK_FILE = "masked/mask.safetensors"

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """Everything that defines one training run: task, model, data, optimiser and schedule."""

    run: str  # the run directory, relative to the samples root
    task: str
    arch: dict[str, Any]
    data: dict[str, Any]
    hparams: dict[str, Any]
    save_steps: tuple[int, ...]
    log_every: int
    extra: dict[str, Any] = field(default_factory=dict)  # "spawn" or "mask" metadata


# ----------------------------------------------------------------------------- the recipes

MODADD = Recipe(
    run="modadd-wd",
    task=MODULAR_ADDITION,
    arch={"kind": "mlp", "widths": [118, 128, 128, 59], "activation": "relu"},
    data={"p": 59, "train_fraction": 0.4, "seed": 0},
    hparams={
        "optimizer": "adamw",
        "lr": 1e-2,
        "schedule": "constant",
        "betas": [0.9, 0.98],
        "weight_decay": 1.0,
        "batch_size": 1392,  # the whole training set: full-batch
        "steps": 3000,
        "init_seed": 0,
        "init_scale": 1.0,
    },
    save_steps=(0, 100, 300, 500, 600, 700, 800, 900, 1000, 1100, 1250, 1500, 2000, 3000),
    log_every=50,
)

DIGITS_TRUE = Recipe(
    run="digits-true",
    task=DIGITS,
    arch={"kind": "mlp", "widths": [64, 128, 128, 10], "activation": "relu"},
    data={
        "file": DIGITS_FILE,
        "val_fraction": 0.2,
        "split_seed": 0,
        "shuffled_labels": False,
        "label_seed": None,
    },
    hparams={
        "optimizer": "adamw",
        "lr": 2e-3,
        "schedule": "cosine",
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "batch_size": 128,
        "steps": 9600,
        "init_seed": 0,
        "init_scale": 0.3,
        "order_seed": 0,
    },
    save_steps=(0, 25, 50, 100, 200, 400, 800, 1200, 1800, 2400, 3600, 4800, 7200, 9600),
    log_every=120,
)

# The controls: the same run without weight decay, and on training labels permuted by a seed.
MODADD_NOWD = replace(MODADD, run="modadd-nowd", hparams={**MODADD.hparams, "weight_decay": 0.0})

DIGITS_SHUFFLED = replace(
    DIGITS_TRUE,
    run="digits-shuffled",
    data={**DIGITS_TRUE.data, "shuffled_labels": True, "label_seed": 1},
)

# Plain minibatch SGD: no optimiser state, so a child is defined by its parent's weights, the
# spawn step and its own data order.
DIGITS_SGD = replace(
    DIGITS_TRUE,
    hparams={
        "optimizer": "sgd",
        "lr": 0.2,
        "schedule": "constant",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "batch_size": 16,
        "steps": 3000,
        "init_seed": 10,
        "init_scale": 0.3,
        "order_seed": 10,
    },
    log_every=100,
)

SPAWN_STEPS = (0, 250, 1000, 2000)
STRANGER_SPAWN_STEP = 2000
MASK_KEPT_FRACTION = 0.05
MASK_REWIND_STEP = 100


# ----------------------------------------------------------------------------- training


def batches(order_seed: int, n: int, batch_size: int, start: int) -> Iterator[torch.Tensor]:
    """Minibatch indices from step ``start`` on: the data order is one stream per seed.

    The stream concatenates seeded permutations of the n examples and cuts it into batches;
    batch t is used at step t, so a run resumed at step k with the same seed sees the batches
    the original run saw after k.
    """
    generator = torch.Generator().manual_seed(order_seed)
    pending = torch.empty(0, dtype=torch.long)
    step = 0
    while True:
        if len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        batch, pending = pending[:batch_size], pending[batch_size:]
        if step >= start:
            yield batch
        step += 1


def make_optimizer(model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser a recipe names."""
    if hparams["optimizer"] == "adamw":
        return torch.optim.AdamW(
            model.parameters(),
            lr=hparams["lr"],
            betas=tuple(hparams["betas"]),
            weight_decay=hparams["weight_decay"],
        )
    if hparams["optimizer"] == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=hparams["lr"],
            momentum=hparams["momentum"],
            weight_decay=hparams["weight_decay"],
        )
    raise ValueError(f"unknown optimizer {hparams['optimizer']!r}")


def learning_rate(hparams: Mapping[str, Any], step: int) -> float:
    """The learning rate at a step: constant, or cosine-annealed to zero over the run."""
    if hparams["schedule"] == "cosine":
        return 0.5 * hparams["lr"] * (1.0 + math.cos(math.pi * step / hparams["steps"]))
    return hparams["lr"]


def metadata(recipe: Recipe, step: int) -> dict[str, str]:
    """The safetensors metadata of a checkpoint: one JSON entry, keys in a fixed order."""
    entry = {
        "task": recipe.task,
        "arch": recipe.arch,
        "step": step,
        "data": recipe.data,
        "hparams": recipe.hparams,
        **recipe.extra,
    }
    return {METADATA_KEY: json.dumps(entry)}


def write_checkpoint(path: Path, state: StateDict, recipe: Recipe, step: int) -> None:
    """Save fp32 weights in layer order with the recipe's metadata."""
    tensors = {key: value.detach().to(torch.float32).contiguous() for key, value in state.items()}
    save_file(tensors, str(path), metadata=metadata(recipe, step))


def write_metrics(path: Path, rows: list[tuple[int, float, float, float, float]]) -> None:
    """Write ``metrics.csv``: one row per evaluated step, six significant digits."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["step", "train_loss", "train_acc", "val_loss", "val_acc"])
        for step, *values in rows:
            writer.writerow([step, *(f"{value:.6g}" for value in values)])


def train(
    recipe: Recipe,
    out: Path,
    *,
    start: StateDict | None = None,
    start_step: int = 0,
    mask: StateDict | None = None,
) -> dict[int, StateDict]:
    """Train one run, writing its checkpoints and metrics under ``out / recipe.run``.

    Parameters
    ----------
    recipe
        The run.
    out
        The samples root.
    start
        Weights to start from (a parent's checkpoint); by default the recipe's initialisation.
    start_step
        The step ``start`` was taken at; training runs from it to ``hparams["steps"]``.
    mask
        0/1 tensors by layer; the weights are multiplied by them at the start and after every
        update, so the saved weights are already masked.

    Returns
    -------
    dict of int to state dict
        Copies of the weights at every saved step, for runs that branch off this one.
    """
    hparams = recipe.hparams
    data: TaskData = build_data(recipe.task, recipe.data, root=out)
    run_dir = out / recipe.run
    run_dir.mkdir(parents=True, exist_ok=True)

    # Start from the recipe's initialisation, or from the weights handed over.
    model = build_model(recipe.arch, seed=hparams["init_seed"], init_scale=hparams["init_scale"])
    if start is not None:
        model.load_state_dict(start, strict=True)
    parameters = dict(model.named_parameters())
    if mask is not None:
        with torch.no_grad():
            for layer, kept in mask.items():
                parameters[layer].mul_(kept)
    optimizer = make_optimizer(model, hparams)

    # Full batch in a fixed order when the batch holds the whole training set.
    n = len(data.train)
    full_batch = hparams["batch_size"] >= n
    order = (
        None if full_batch else batches(hparams["order_seed"], n, hparams["batch_size"], start_step)
    )

    saved: dict[int, StateDict] = {}
    rows = []
    last = hparams["steps"]
    for step in range(start_step, last + 1):
        if step in recipe.save_steps or step % recipe.log_every == 0 or step == last:
            rows.append((step, *evaluate(model, data.train), *evaluate(model, data.val)))
        if step in recipe.save_steps:
            state = {key: value.detach().clone() for key, value in model.state_dict().items()}
            saved[step] = state
            write_checkpoint(run_dir / f"step_{step:06d}.safetensors", state, recipe, step)
        if step == last:
            break

        # One update on the full training set or on the next minibatch.
        if full_batch:
            x, y = data.train.x, data.train.y
        else:
            index = next(order)
            x, y = data.train.x[index], data.train.y[index]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(hparams, step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if mask is not None:
            with torch.no_grad():
                for layer, kept in mask.items():
                    parameters[layer].mul_(kept)

    write_metrics(run_dir / "metrics.csv", rows)
    train_loss, train_acc, val_loss, val_acc = rows[-1][1:]
    log.info(
        "%-28s step %5d  train loss %.4f acc %.3f  val loss %.4f acc %.3f",
        recipe.run,
        last,
        train_loss,
        train_acc,
        val_loss,
        val_acc,
    )
    return saved


# ----------------------------------------------------------------------------- the families


def spawn_children(
    out: Path,
    parent: Recipe,
    states: dict[int, StateDict],
    prefix: str,
    spawn_steps: tuple[int, ...],
    children: dict[str, int],
) -> None:
    """Train children from a parent's checkpoints, each with its own data-order seed."""
    last = parent.hparams["steps"]
    for k in spawn_steps:
        for name, order_seed in children.items():
            child = replace(
                parent,
                run=f"{prefix}/spawn-{k:04d}/{name}",
                hparams={**parent.hparams, "order_seed": order_seed},
                save_steps=(k, (k + last) // 2, last),
                extra={"spawn": {"parent": parent.run, "step": k}},
            )
            train(child, out, start=states[k], start_step=k)


def make_spawn(out: Path) -> None:
    """A parent, two children from each spawn step, and a child of a differently seeded parent."""
    parent = replace(
        DIGITS_SGD,
        run="spawn/parent",
        save_steps=(0, 250, 500, 1000, 2000, 3000),
    )
    states = train(parent, out)
    spawn_children(out, parent, states, "spawn", SPAWN_STEPS, {"child-a": 1, "child-b": 2})

    # The cross-trunk control: another initialisation and data order, spawned as late.
    stranger = replace(
        parent,
        run="spawn/stranger/parent",
        hparams={**parent.hparams, "init_seed": 11, "order_seed": 11},
        save_steps=(0, 2000, 3000),
    )
    states = train(stranger, out)
    spawn_children(out, stranger, states, "spawn/stranger", (STRANGER_SPAWN_STEP,), {"child-a": 3})


def magnitude_mask(state: StateDict, layers: list[str], kept_fraction: float) -> StateDict:
    """Keep the largest |w| over all the given matrices together (one global threshold)."""
    magnitudes = torch.cat([state[layer].abs().flatten() for layer in layers])
    n_kept = round(kept_fraction * len(magnitudes))
    keep = torch.zeros(len(magnitudes))
    keep[torch.argsort(magnitudes, descending=True, stable=True)[:n_kept]] = 1.0

    # Cut the flat mask back into the matrices' shapes.
    masks, offset = {}, 0
    for layer in layers:
        size = state[layer].numel()
        masks[layer] = keep[offset : offset + size].reshape(state[layer].shape).contiguous()
        offset += size
    return masks


def make_masked(out: Path) -> None:
    """A dense run, its 5 % magnitude mask, and the masked run rewound to an early step."""
    dense = replace(
        DIGITS_SGD,
        run="masked/dense",
        hparams={
            **DIGITS_SGD.hparams,
            "weight_decay": 2e-3,
            "steps": 6000,
            "init_seed": 20,
            "init_scale": 0.1,
            "order_seed": 20,
        },
        save_steps=(0, 100, 250, 500, 1000, 2000, 4000, 6000),
    )
    states = train(dense, out)

    # Mask every hidden matrix by global magnitude; the output layer stays whole.
    last = dense.hparams["steps"]
    matrices = [key for key, value in states[last].items() if value.dim() == 2]
    layers, excluded = matrices[:-1], matrices[-1:]
    masks = magnitude_mask(states[last], layers, MASK_KEPT_FRACTION)
    description = {
        "kind": "magnitude_mask",
        "kept_fraction": MASK_KEPT_FRACTION,
        "scope": "global",
        "layers": layers,
        "excluded": excluded,
        "source": {"run": dense.run, "step": last},
        "density": {layer: round(mask.mean().item(), 6) for layer, mask in masks.items()},
    }
    save_file(masks, str(out / MASK_FILE), metadata={METADATA_KEY: json.dumps(description)})

    # Rewind to an early dense step and train with the mask held fixed.
    sparse = replace(
        dense,
        run="masked/sparse",
        save_steps=(MASK_REWIND_STEP, 500, 1000, 2000, 4000, 6000),
        extra={
            "mask": {
                "file": MASK_FILE,
                "kept_fraction": MASK_KEPT_FRACTION,
                "rewind_step": MASK_REWIND_STEP,
                "dense_run": dense.run,
            }
        },
    )
    train(sparse, out, start=states[MASK_REWIND_STEP], start_step=MASK_REWIND_STEP, mask=masks)


FAMILIES: dict[str, Callable[[Path], object]] = {
    "modadd-wd": partial(train, MODADD),
    "modadd-nowd": partial(train, MODADD_NOWD),
    "digits-true": partial(train, DIGITS_TRUE),
    "digits-shuffled": partial(train, DIGITS_SHUFFLED),
    "spawn": make_spawn,
    "masked": make_masked,
}


# ----------------------------------------------------------------------------- the command


def ensure_digits(out: Path, refresh: bool) -> None:
    """Write ``data/digits.npz`` from scikit-learn unless it is there already."""
    path = out / DIGITS_FILE
    if path.is_file() and not refresh:
        return
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            f"{path} is missing and scikit-learn is not installed; "
            "pip install 'spectrum-cli[samples]' and run again"
        ) from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)  # (1797, 8, 8), values 0–16
    labels = np.asarray(bunch.target, dtype=np.uint8)  # (1797,)
    write_digits(path, images, labels)
    log.info("wrote %s: %d images", path, len(labels))


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and write the requested runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "sample_checkpoints",
        help="the samples root to write (default: the repository's)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(FAMILIES),
        metavar="RUN",
        help=f"write only these families: {', '.join(FAMILIES)}",
    )
    parser.add_argument(
        "--refresh-data",
        action="store_true",
        help="rewrite data/digits.npz from scikit-learn even if it exists",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # One thread and deterministic kernels: the same bytes on every run of this machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    ensure_digits(out, args.refresh_data)
    began = time.perf_counter()
    for name in args.only or FAMILIES:
        shutil.rmtree(out / name, ignore_errors=True)
        FAMILIES[name](out)
    log.info("done in %.1f s", time.perf_counter() - began)


if __name__ == "__main__":
    main()
