"""Time WeightWatcher's default ``analyze()`` on a BERT-layout safetensors checkpoint.

Usage (inside the WeightWatcher venv made by ``benchmarks/ww_setup.sh``)::

    benchmarks/.ww-venv/bin/python benchmarks/ww_minilm.py MODEL.safetensors OUT.npz

The checkpoint is loaded into a plain ``torch.nn.Module`` tree (no ``transformers``) whose
module paths mirror the tensor names: 2-D ``*_embeddings.weight`` tensors become
``nn.Embedding``, other 2-D weights ``nn.Linear`` (with their bias), 1-D weight/bias pairs
``nn.LayerNorm``; non-floating tensors such as ``embeddings.position_ids`` are dropped.

Only ``WeightWatcher.analyze()`` with its default arguments is timed (``time.perf_counter``);
imports and model construction are not. WeightWatcher computes each layer's eigenvalues
``lambda = (w_norm * sigma)**2`` of ``W^T W`` in ``apply_esd`` (``w_norm`` is 1 for dense and
embedding layers, and there is no 1/N scaling by default); the eigenvalues are captured there,
during the timed call, and turned back into the singular values of the weight as stored.

OUT.npz holds one float64 array per analysed layer, keyed by the safetensors tensor name
(e.g. ``encoder.layer.0.attention.self.query.weight``) and sorted in descending order, plus
the scalars ``analyze_seconds`` and ``ww_version``. One JSON line goes to stdout; anything
WeightWatcher prints itself is sent to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import weightwatcher as ww
from safetensors.torch import load_file
from torch import nn


def _module_for(name: str, params: dict[str, torch.Tensor]) -> nn.Module:
    """Build the leaf module holding ``params`` (keys ``weight`` and optionally ``bias``)."""
    weight, bias = params["weight"], params.get("bias")
    with torch.device("meta"):
        if weight.ndim == 2 and name.endswith("_embeddings"):
            module: nn.Module = nn.Embedding(*weight.shape)
        elif weight.ndim == 2:
            out_features, in_features = weight.shape
            module = nn.Linear(in_features, out_features, bias=bias is not None)
        elif weight.ndim == 1:
            module = nn.LayerNorm(weight.shape[0], elementwise_affine=True, bias=bias is not None)
        else:
            raise ValueError(f"unsupported weight shape {tuple(weight.shape)} for {name}")
    for key, tensor in params.items():
        setattr(module, key, nn.Parameter(tensor, requires_grad=False))
    return module


def build_model(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Assemble an ``nn.Module`` tree whose ``named_modules()`` paths match the tensor names."""
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        path, _, leaf = name.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise ValueError(f"unexpected parameter name {name}")
        grouped[path][leaf] = tensor

    root = nn.Module()
    for path, params in grouped.items():
        parent = root
        *parents, leaf = path.split(".")
        for part in parents:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, _module_for(leaf, params))
    return root.eval()


def run_analyze(model: nn.Module) -> tuple[float, dict[str, np.ndarray]]:
    """Run the default ``analyze()`` once; return its wall time and per-layer singular values."""
    watcher = ww.WeightWatcher(model=model)
    captured: list[tuple[str, np.ndarray, float]] = []
    apply_esd = watcher.apply_esd

    def recording_apply_esd(ww_layer, params=None):
        ww_layer = apply_esd(ww_layer, params)
        captured.append((ww_layer.longname, ww_layer.evals.copy(), float(ww_layer.w_norm)))
        return ww_layer

    watcher.apply_esd = recording_apply_esd
    with contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        details = watcher.analyze()
        seconds = time.perf_counter() - start

    if len(details) != len(captured):
        raise RuntimeError(f"{len(details)} layers in details but {len(captured)} ESDs captured")
    singular_values = {}
    for longname, evals, w_norm in captured:
        sigma = np.sqrt(np.clip(evals.astype(np.float64), 0.0, None)) / w_norm
        singular_values[f"{longname}.weight"] = np.sort(sigma)[::-1]
    return seconds, singular_values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="BERT-layout .safetensors checkpoint")
    parser.add_argument("out", type=Path, help="output .npz file")
    args = parser.parse_args(argv)

    model = build_model(load_file(str(args.model)))
    seconds, singular_values = run_analyze(model)

    ww_version = version("weightwatcher")
    np.savez(
        args.out,
        analyze_seconds=np.float64(seconds),
        ww_version=np.str_(ww_version),
        **singular_values,
    )
    summary = {
        "analyze_seconds": round(seconds, 4),
        "ww_version": ww_version,
        "layers": len(singular_values),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
