"""Time ``spectrum rank`` (and, on request, ``stability`` and ``align``) on a large store.

Builds a synthetic store of one run with 100 layers × 200 steps in the store's own layout,
then runs the commands as a user would, in a subprocess, and prints the wall time of each::

    python benchmarks/bench_dynamics.py                    # build in a temporary folder, time rank
    python benchmarks/bench_dynamics.py --store big.zarr   # keep the store (built once)
    python benchmarks/bench_dynamics.py --vectors          # also store u, v; time stability, align

The layers are allocated through :class:`spectrum_cli.store.Store` (one checkpoint written the
ordinary way), then every row is filled in bulk through Zarr: writing 20,000 rows one
checkpoint at a time would time the writer, not the readers.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

from spectrum_cli.store import LayerResult, Store

RUN = "bench"


def build(path: Path, layers: int, steps: int, m: int, n: int, top_k: int, vectors: bool) -> None:
    """Write a store of one run: ``layers`` matrices at ``steps`` steps.

    Shapes alternate m × n and n × m, so that consecutive layers connect for ``align``.
    """
    import zarr

    rng = np.random.default_rng(0)
    names = [f"blocks.{i}.weight" for i in range(layers)]
    shapes = {name: (m, n) if i % 2 == 0 else (n, m) for i, name in enumerate(names)}
    all_steps = list(range(0, 10 * steps, 10))
    r, k = min(m, n), min(top_k, m, n)

    # Allocate through the store: one done checkpoint creates every layer's arrays.
    with Store.writing(path, top_k) as store:
        store.add_steps(RUN, all_steps)
        first = [
            LayerResult(
                name,
                shapes[name],
                shapes[name],
                "float32",
                "as stored (out × in)",
                sigma=np.sort(rng.random(r, dtype=np.float32))[::-1],
                u=np.zeros((shapes[name][0], k), np.float32),
                v=np.zeros((shapes[name][1], k), np.float32),
            )
            for name in names
        ]
        store.write_checkpoint(RUN, all_steps[0], first, {"path": f"{RUN}/step_0.pt"})

    # Fill every row at once, then mark every step done.
    root = zarr.open_group(path, mode="r+")
    decay = np.linspace(0.2, 3.0, steps, dtype=np.float32)[:, None]  # spectra sharpen over time
    for name in names:
        group = root[f"{RUN}/{name}"]
        group["sigma"][:] = np.exp(-decay * np.linspace(0, 1, r, dtype=np.float32)[None, :])
        if vectors:
            rows, cols = shapes[name]
            q_u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
            q_v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
            noise = rng.standard_normal((steps, rows, k)).astype(np.float32) * 0.01
            group["u"][:] = q_u.astype(np.float32)[None] + noise  # drifting left vectors
            group["v"][:] = np.broadcast_to(q_v.astype(np.float32), (steps, cols, k))
        group["status"][:] = 1
    root[RUN].attrs["checkpoints"] = {
        str(step): {"path": f"{RUN}/step_{step}.pt"} for step in all_steps
    }


def timed(*args: str) -> float:
    """Seconds one ``spectrum`` command takes, start-up included; stdout discarded."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "spectrum_cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"spectrum {' '.join(args)} failed: {done.stderr.strip()}")
    return seconds


def main(
    store: Path = typer.Option(None, help="Store to build (if missing) and time; default: temp."),
    layers: int = typer.Option(100, help="Layers in the run."),
    steps: int = typer.Option(200, help="Steps per layer."),
    rows: int = typer.Option(256, "--rows", help="m of each matrix."),
    cols: int = typer.Option(128, "--cols", help="n of each matrix."),
    top_k: int = typer.Option(16, help="Singular vectors kept."),
    vectors: bool = typer.Option(False, "--vectors", help="Store u, v; time stability, align."),
    repeat: int = typer.Option(3, help="Runs of each command; the best is reported."),
) -> None:
    """Build a synthetic store and time the spectral-dynamics commands on it."""
    with tempfile.TemporaryDirectory() as scratch:
        path = store or Path(scratch) / "bench.zarr"
        if not path.exists():
            started = time.perf_counter()
            build(path, layers, steps, rows, cols, top_k, vectors)
            print(
                f"built {path}: {layers} layers × {steps} steps of {rows}×{cols} "
                f"in {time.perf_counter() - started:.1f} s"
            )
        commands = [("rank", "--format", "json"), ("rank",)]
        if vectors:
            commands += [("stability", "--format", "json"), ("align", "--format", "json")]
        baseline = min(timed("--version") for _ in range(repeat))
        print(f"python -m spectrum_cli --version: {baseline:.2f} s (start-up alone)")
        for command in commands:
            best = min(timed(command[0], str(path), *command[1:]) for _ in range(repeat))
            print(f"spectrum {' '.join(command)}: {best:.2f} s")


if __name__ == "__main__":
    typer.run(main)
