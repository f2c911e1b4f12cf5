"""Shared fixtures: tiny deterministic training runs written in tmp_path, and store comparison."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

# Real checkpoints trained by other people: SPECTRUM_REAL_CHECKPOINTS, else the folder
# ../shared/real beside the checkout. Tests that need them skip when neither is there.
REAL = Path(
    os.environ.get("SPECTRUM_REAL_CHECKPOINTS")
    or Path(__file__).resolve().parents[2] / "shared" / "real"
)

# The default layers of a tiny model: a conv kernel, a tall and a wide matrix, a bias and an
# integer buffer (neither is a matrix).
TINY_LAYERS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "conv.weight": ((8, 3, 3, 3), torch.float32),  # a matrix of 8 × 27
    "conv.bias": ((8,), torch.float32),
    "fc.weight": ((40, 24), torch.float32),
    "head.weight": ((5, 40), torch.float32),
    "head.num_batches_tracked": ((3, 3), torch.int64),
}


def tiny_weights(
    run: str, step: int, layers: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> dict[str, torch.Tensor]:
    """The weights a run holds at a step: the same for the same (run, step), whatever the order."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{run}@{step}".encode()))
    weights = {}
    for name, (shape, dtype) in (layers or TINY_LAYERS).items():
        if dtype.is_floating_point:
            weights[name] = torch.randn(shape, generator=generator).to(dtype)
        else:
            high = 2 if dtype == torch.bool else 100
            weights[name] = torch.randint(0, high, shape, generator=generator).to(dtype)
    return weights


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor]) -> Path:
    """Write weights as safetensors or ``torch.save``, by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    return path


@pytest.fixture
def make_run(tmp_path: Path) -> Callable[..., Path]:
    """Write a run of checkpoints ``ROOT/RUN/step_S.SUFFIX`` and return the root folder.

    Called as ``make_run("a", [0, 10], suffix=".pt", layers={...}, root=...)``; the weights
    of a step depend only on the run name and the step (see `tiny_weights`).
    """

    def make(
        run: str,
        steps: list[int],
        *,
        suffix: str = ".safetensors",
        layers: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
        root: Path | None = None,
    ) -> Path:
        root = root or tmp_path / "runs"
        for step in steps:
            save_checkpoint(root / run / f"step_{step}{suffix}", tiny_weights(run, step, layers))
        return root

    return make


def run_cli(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``python -m spectrum_cli ARGS`` in a subprocess, with output captured as text."""
    env = {k: v for k, v in os.environ.items() if k not in _TERMINAL_VARIABLES}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(
        [sys.executable, "-m", "spectrum_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=kwargs.pop("timeout", 300),
        check=False,
        **kwargs,
    )


# Variables that make rich treat a pipe as a terminal.
_TERMINAL_VARIABLES = ("FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def run_cli_on_a_terminal(*args: str | Path) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """Run ``python -m spectrum_cli ARGS`` with stderr on a pseudo-terminal, stdout a pipe.

    Returns the finished process (its stdout as bytes) and all it wrote to the terminal.
    """
    env = {k: v for k, v in os.environ.items() if k not in _TERMINAL_VARIABLES}
    env |= {"TERM": "xterm-256color", "COLUMNS": "100"}
    leader, follower = pty.openpty()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(leader, chunks), daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "spectrum_cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=env,
            timeout=300,
            check=False,
        )
    finally:
        os.close(follower)
        reader.join(timeout=10)
        os.close(leader)
    return done, b"".join(chunks).decode(errors="replace")


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pty until its other end closes, so the child never blocks on a full buffer."""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


def store_contents(path: Path) -> dict[str, object]:
    """Everything in a spectra store that matters, as plain values for ``==`` comparison.

    Attributes of every node (the tool version aside) and every array, keyed by node path;
    rows are in row order, so two stores compare equal only if their rows line up too.
    """
    import zarr

    contents: dict[str, object] = {}
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    attrs.pop("spectrum_version", None)
    contents[""] = attrs
    for run in attrs["runs"]:
        group = root[run]
        contents[run] = json.loads(json.dumps(dict(group.attrs)))
        for layer in group.attrs["layers"]:
            node = group[layer]
            contents[f"{run}/{layer}"] = json.loads(json.dumps(dict(node.attrs)))
            for name in ("step", "sigma", "u", "v", "status"):
                contents[f"{run}/{layer}/{name}"] = _Array(node[name][:])
    return contents


class _Array:
    """A numpy array that compares by dtype, shape and values: exactly, or within ``rtol``."""

    rtol: float | None = None

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Array) or self.values.dtype != other.values.dtype:
            return False
        if self.rtol is None or self.values.dtype.kind != "f":
            return np.array_equal(self.values, other.values)
        scale = np.abs(other.values).max(initial=0)
        return self.values.shape == other.values.shape and np.allclose(
            self.values, other.values, rtol=self.rtol, atol=self.rtol * scale
        )

    def __repr__(self) -> str:
        return f"array({self.values.dtype}, {self.values.shape})"


def assert_same_store(got: Path, expected: Path, rtol: float | None = None) -> None:
    """Assert two stores hold the same attributes and arrays, naming the first difference.

    Arrays compare exactly unless ``rtol`` is given: floating values computed with another
    number of BLAS threads may differ in the last bits.
    """
    have, want = store_contents(got), store_contents(expected)
    assert list(have) == list(want)
    for key, value in want.items():
        if isinstance(value, _Array):
            value.rtol = rtol
        assert value == have[key], f"{key} differs"
