"""Check the decomposition engine on a CUDA device against the CPU, then time it there.

Run on a machine with a GPU (``benchmarks/gpu_check.sh`` sets the paths)::

    python benchmarks/gpu_check.py --cpu-seconds-per-checkpoint 2.9

1. Correctness: matrices with known spectra, decomposed on the CPU and on the GPU. The singular
   values at or above 1e-3 σ₁ agree within 1e-5 relative, and the top singular vectors of
   well-separated values within |cos| ≥ 0.999.
2. Speed: the 8-checkpoint series of ``bench_analyze.py`` (a 12-layer, 768-wide transformer),
   each checkpoint read and decomposed on the GPU as one worker does, top-32 vectors kept.
   The throughput is compared with ``--cpu-seconds-per-checkpoint``, the CPU figure that
   ``bench_analyze.py`` measured on the machine the README reports.

Needs only torch with CUDA, numpy, scipy and safetensors: no store is written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_analyze import write_series

from spectrum_cli.analysis import decompose_checkpoint
from spectrum_cli.spectra import decompose_batch


def known_spectrum(m: int, n: int, batch: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A stack (batch, m, n) of float32 matrices Q₁ diag(σ) Q₂ᵀ with σ from 1 down to 1e-4."""
    generator = torch.Generator().manual_seed(seed)
    r = min(m, n)
    sigma = np.geomspace(1.0, 1e-4, r)
    stack = []
    for _ in range(batch):
        left, _ = torch.linalg.qr(torch.randn(m, r, generator=generator, dtype=torch.float64))
        right, _ = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))
        stack.append((left * torch.from_numpy(sigma)) @ right.T)  # (m, n)
    return torch.stack(stack).to(torch.float32), sigma


def check_correctness(device: torch.device) -> bool:
    print("correctness: CPU against GPU, matrices with known spectra")
    ok = True
    for m, n in ((768, 768), (3072, 768), (768, 3072), (1024, 33), (5, 2000)):
        stack, _ = known_spectrum(m, n, 3, seed=m + n)
        cpu = decompose_batch(stack, 32)
        gpu = decompose_batch(stack, 32, device)
        worst_sigma, worst_cos = 0.0, 1.0
        for ours, theirs in zip(gpu, cpu, strict=True):
            resolved = theirs.sigma >= 1e-3 * theirs.sigma[0]
            gap = np.abs(ours.sigma - theirs.sigma)[resolved] / theirs.sigma[resolved]
            worst_sigma = max(worst_sigma, float(gap.max()))
            cos = np.abs(np.sum(ours.u * theirs.u, axis=0))  # (k,)
            worst_cos = min(worst_cos, float(cos.min()))
        good = worst_sigma <= 1e-5 and worst_cos >= 0.999
        ok &= good
        print(
            f"  {m:>5} × {n:<5} σ rel gap {worst_sigma:.1e}  min |cos| u {worst_cos:.6f}  "
            f"{'ok' if good else 'MISS'}"
        )
    return ok


def time_series(device: torch.device, work: Path) -> float:
    """Seconds per checkpoint of the series on ``device``, after one warm-up checkpoint."""
    paths = write_series(work / "series", 8)
    decompose_checkpoint(str(paths[0]), 32, str(device))
    _synchronize(device)
    started = time.perf_counter()
    for path in paths:
        outcome = decompose_checkpoint(str(path), 32, str(device))
        assert outcome.error is None, outcome.error
    _synchronize(device)
    return (time.perf_counter() - started) / len(paths)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-seconds-per-checkpoint", type=float, default=None)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}")
    ok = check_correctness(device)
    work = args.work or Path(tempfile.mkdtemp(prefix="spectrum-gpu-"))
    per_checkpoint = time_series(device, work)
    print("speed: 8 checkpoints of a 12-layer, 768-wide transformer, top-32 vectors")
    print(f"  {device.type}  {per_checkpoint:.3f} s per checkpoint")
    if args.cpu_seconds_per_checkpoint:
        ratio = args.cpu_seconds_per_checkpoint / per_checkpoint
        print(f"  CPU  {args.cpu_seconds_per_checkpoint:.3f} s per checkpoint (as given)")
        print(f"  GPU throughput / CPU throughput: {ratio:.1f} (target ≥ 20)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
