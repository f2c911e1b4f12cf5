"""Time one point of ``spectrum lmc`` against one plain forward pass over the same examples.

One point on the interpolation line writes θ(α) into the working model (one ``torch.lerp`` per
entry), runs the model over every kept batch and scores the outputs. BatchNorm re-estimation,
a separate pass over the training data, is left out: the model has no BatchNorm. The ratio of
the two wall times (best of several repeats, measured in one run) should stay below 1.5::

    python benchmarks/bench_lmc.py                          # MLP 784-1024-1024-10, 8192 examples
    python benchmarks/bench_lmc.py --examples 32768 --width 2048 --device cuda
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import typer
from safetensors.torch import save_file
from torch import nn

from spectrum_cli.evaluation import EvaluationData, Evaluator
from spectrum_cli.lmc import LinearPath, pair_checkpoints


def build(features: int, width: int, classes: int) -> nn.Module:
    """The benchmark model: a three-layer ReLU MLP."""
    return nn.Sequential(
        nn.Linear(features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


def best_times(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """The shortest wall time of each run over ``repeats`` rounds, after one warm-up round.

    Rounds interleave the runs, so that a busy moment on the machine slows them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ > 0:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def main(
    examples: int = typer.Option(8192, help="Examples in the split."),
    features: int = typer.Option(784, help="Input features."),
    width: int = typer.Option(1024, help="Hidden width."),
    classes: int = typer.Option(10, help="Classes."),
    batch_size: int = typer.Option(1024, help="Examples per batch."),
    repeats: int = typer.Option(10, help="Timed rounds; the best of each counts."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Print the time of one plain forward pass, of one α point, and their ratio."""
    where = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(examples, features)
    y = torch.randint(0, classes, (examples,))

    with tempfile.TemporaryDirectory(prefix="bench-lmc-") as scratch:
        # Two checkpoints of the same architecture.
        paths = []
        for name in ("a", "b"):
            state = {
                k: v.contiguous() for k, v in build(features, width, classes).state_dict().items()
            }
            paths.append(Path(scratch) / f"{name}.safetensors")
            save_file(state, paths[-1])
        a, b = pair_checkpoints(*paths)

        model = build(features, width, classes).to(where)
        evaluator = Evaluator(
            model, EvaluationData({"train": (x, y)}), "bench", "bench", batch_size, device=where
        )
        evaluator.check_fit(a, "a")
        path = LinearPath(evaluator, a, b, bn_reset=False)
        batches = evaluator.batches("train")

        def forward() -> None:
            with torch.inference_mode():
                for inputs, _ in batches:
                    model(inputs)

        best = best_times(
            {"forward": forward, "point": lambda: path.evaluate_at(0.5, "train")}, repeats, where
        )
        forward_s, point_s = best["forward"], best["point"]

    parameters = sum(t.numel() for t in a.values())
    print(
        f"{examples} examples, {parameters / 1e6:.2f} M parameters, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, {where}"
    )
    print(f"plain forward pass : {forward_s * 1e3:8.1f} ms")
    print(f"one α point        : {point_s * 1e3:8.1f} ms")
    print(f"ratio              : {point_s / forward_s:8.2f}  (target < 1.5)")


if __name__ == "__main__":
    typer.run(main)
