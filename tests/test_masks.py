"""Lottery-ticket masks: masks in (files, prune pairs, magnitude), the numbers out, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from spectrum_cli.errors import StoreError, UsageError
from spectrum_cli.masks import (
    MaskedWeights,
    collect_masks,
    compare_masks,
    compare_runs,
    low_rank_overlap,
    magnitude_mask,
    magnitude_masks,
    mask_iou,
    random_mask,
    rank_grid,
    read_masks,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"


def low_rank_weights(m: int, n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """A float32 (m, n) matrix like a trained layer: a few strong directions over small noise."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen))
    sigma = 10.0 * 0.8 ** torch.arange(r, dtype=torch.float32)
    return (u * sigma) @ v.T + noise * torch.randn(m, n, generator=gen) / np.sqrt(n)


def mlp_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a small MLP: two hidden matrices, a conv-free output layer, biases."""
    return {
        "fc1.weight": low_rank_weights(48, 32, seed),
        "fc1.bias": torch.zeros(48),
        "fc2.weight": low_rank_weights(40, 48, seed + 1),
        "fc2.bias": torch.zeros(40),
        "out.weight": low_rank_weights(10, 40, seed + 2),
        "out.bias": torch.zeros(10),
    }


def invoke(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run ``spectrum ARGS`` as the entry point does; (exit code, stdout, stderr)."""
    from spectrum_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["spectrum", *args])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- the mathematics


def test_all_ones_mask_gives_agreement_and_overlap_one():
    weights = mlp_weights()
    masks = {layer: torch.ones_like(w, dtype=torch.bool) for layer, w in weights.items()}
    masks = {layer: mask for layer, mask in masks.items() if mask.dim() == 2}

    reports = compare_masks(MaskedWeights({k: weights[k] for k in masks}, masks, "ones"))

    for report in reports:
        assert report.density == 1.0
        assert report.agreement == pytest.approx(1.0, abs=1e-6)
        assert report.random_agreement == pytest.approx(1.0, abs=1e-6)
        assert report.iou == [1.0] * len(report.ranks)
        assert report.random_iou == 1.0


def test_rank_one_matrix_keeps_its_magnitude_mask_at_rank_one():
    gen = torch.Generator().manual_seed(1)
    w = torch.outer(torch.randn(30, generator=gen), torch.randn(20, generator=gen))

    ranks, ious = low_rank_overlap(w, count=60)

    assert ranks == [1, 2, 4, 8, 16, 20]
    assert ious[0] == 1.0


@pytest.mark.parametrize(
    ("rank", "grid"),
    [
        (1, [1]),
        (2, [1, 2]),
        (8, [1, 2, 4, 8]),
        (10, [1, 2, 4, 8, 10]),
        (33, [1, 2, 4, 8, 16, 32, 33]),
    ],
)
def test_rank_grid_doubles_and_ends_at_the_rank(rank, grid):
    assert rank_grid(rank) == grid


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_overlap_is_a_fraction_and_full_rank_recovers_the_mask(m, n, fraction, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    count = max(1, round(fraction * m * n))

    ranks, ious = low_rank_overlap(w, count)

    assert ranks[-1] == min(m, n)
    assert all(0.0 <= iou <= 1.0 for iou in ious)
    assert ious[-1] == pytest.approx(1.0)


def test_random_control_is_reproducible_exact_and_seeded():
    first = random_mask((40, 50), 100, seed=3, layer="fc1.weight")
    again = random_mask((40, 50), 100, seed=3, layer="fc1.weight")
    other = random_mask((40, 50), 100, seed=4, layer="fc1.weight")

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert int(first.sum()) == 100 and first.dtype == torch.bool


def test_random_control_overlaps_a_magnitude_mask_by_chance():
    w = torch.randn(200, 150, generator=torch.Generator().manual_seed(0))
    density = 0.2
    count = round(density * w.numel())

    iou = mask_iou(random_mask(tuple(w.shape), count, 0, "w"), magnitude_mask(w, count))

    assert iou == pytest.approx(density / (2 - density), rel=0.1)


def test_magnitude_beats_random_on_a_matrix_with_strong_directions():
    weights = {"fc.weight": low_rank_weights(64, 48, seed=2), "out.weight": torch.ones(3, 64)}
    masked = collect_masks_from(weights, keep=0.1)

    [report] = compare_masks(masked)

    assert report.agreement > 0.25 and report.random_agreement < 0.1


def collect_masks_from(weights: dict[str, torch.Tensor], **how) -> MaskedWeights:
    return MaskedWeights(weights, magnitude_masks(weights, **how), "magnitude")


# ---------------------------------------------------------------------------- masks in


def test_global_scope_ranks_all_prunable_matrices_and_spares_the_output_layer():
    weights = {"a.weight": torch.full((4, 5), 1.0), "b.weight": torch.full((5, 4), 2.0)}
    weights["out.weight"] = torch.full((2, 5), 9.0)

    masks = magnitude_masks(weights, keep=0.5)

    assert list(masks) == ["a.weight", "b.weight"]
    assert int(masks["a.weight"].sum()) == 0 and bool(masks["b.weight"].all())
    included = magnitude_masks(weights, keep=0.5, include_output=True)
    assert bool(included["out.weight"].all())


def test_layer_scope_keeps_the_fraction_in_each_layer():
    weights = mlp_weights()
    matrices = {k: w for k, w in weights.items() if w.dim() == 2}

    masks = magnitude_masks(matrices, keep=0.25, scope="layer")

    for layer, mask in masks.items():
        assert int(mask.sum()) == round(0.25 * mask.numel())
        kept = matrices[layer].abs()[mask]
        assert float(kept.min()) >= float(matrices[layer].abs()[~mask].max())


def test_prune_pairs_are_read_as_weight_and_mask(tmp_path):
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "pruned.pt")

    masked = collect_masks(tmp_path / "pruned.pt")

    assert list(masked.weights) == ["0.weight", "2.weight"]
    assert list(masked.masks) == ["0.weight"]
    assert torch.equal(masked.weights["0.weight"], net[0].weight_orig.detach())
    assert torch.equal(masked.masks["0.weight"], net[0].weight_mask.bool())
    [report] = compare_masks(masked)
    assert report.density == 0.5


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16, torch.uint8])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_boolean_and_numeric_masks_read_alike(tmp_path, dtype, suffix):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    mask = (weights["fc1.weight"].abs() > 0.2).to(dtype)
    if suffix == ".pt":
        torch.save({"module.fc1.weight": mask}, tmp_path / f"mask{suffix}")
    else:
        save_file({"fc1.weight": mask}, tmp_path / f"mask{suffix}")

    masked = collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / f"mask{suffix}")

    assert list(masked.masks) == ["fc1.weight"]
    assert torch.equal(masked.masks["fc1.weight"], weights["fc1.weight"].abs() > 0.2)


def test_a_mismatched_mask_lists_every_difference_at_once(tmp_path):
    weights = mlp_weights()
    matrices = {k: w for k, w in weights.items() if w.dim() == 2}
    mask = {
        "fc1.weight": torch.ones(32, 48, dtype=torch.bool),  # transposed
        "fc3.weight": torch.ones(5, 5, dtype=torch.bool),  # no such layer
        "fc2.weight": torch.ones(40, 48, dtype=torch.bool),  # fine
        "fc2.bias": torch.ones(40, dtype=torch.bool),  # a vector: ignored
    }
    save_file(mask, tmp_path / "mask.safetensors")

    with pytest.raises(UsageError) as caught:
        read_masks(tmp_path / "mask.safetensors", matrices, tmp_path / "ckpt.safetensors")

    message = str(caught.value)
    assert "2 differences" in message
    assert "'fc1.weight': mask shape (32, 48), weight shape (48, 32)" in message
    assert "mask 'fc3.weight' has no weight matrix" in message
    assert "fc2.weight" not in message.split("matrices without a mask")[0]


def test_masks_holding_other_values_are_refused(tmp_path):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    save_file({"fc1.weight": weights["fc1.weight"]}, tmp_path / "mask.safetensors")

    with pytest.raises(UsageError, match="values other than 0 and 1"):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "mask.safetensors")


def test_a_checkpoint_without_masks_asks_for_one(tmp_path):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")

    with pytest.raises(UsageError, match="--mask FILE or --keep"):
        collect_masks(tmp_path / "ckpt.safetensors")
    with pytest.raises(UsageError, match="not both"):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "m", keep=0.1)


# ---------------------------------------------------------------------------- over training


def write_runs(root: Path) -> None:
    """A dense run of four steps, and a masked run that shares its first two then diverges."""
    for step in range(4):
        save_file(mlp_weights(seed=step), root / "dense" / f"step_{step}.safetensors")
    for step in (0, 1):
        save_file(mlp_weights(seed=step), root / "masked" / f"step_{step}.safetensors")
    for step in (2, 3, 5):
        save_file(mlp_weights(seed=100 + step), root / "masked" / f"step_{step}.safetensors")


@pytest.fixture
def runs(tmp_path) -> Path:
    for name in ("dense", "masked"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    write_runs(tmp_path / "runs")
    return tmp_path / "runs"


def test_agreement_over_training_from_a_store(runs, tmp_path):
    from spectrum_cli.analysis import analyze

    analyze(runs, tmp_path / "s.zarr", top_k=12, workers=1)

    rows = compare_runs("dense", str(runs / "masked"), store=tmp_path / "s.zarr")

    assert {(r.layer, r.step) for r in rows} == {
        (layer, step) for layer in ("fc1.weight", "fc2.weight", "out.weight") for step in range(4)
    }
    for row in rows:
        if row.step < 2:
            assert row.agreement == pytest.approx(1.0, abs=1e-5)
        else:
            assert row.agreement < 0.9
    with pytest.raises(StoreError, match="no run 'sparse'"):
        compare_runs("dense", "sparse", store=tmp_path / "s.zarr")


def test_cli_analyses_runs_into_a_temporary_store(runs, capsys, monkeypatch):
    code, out, err = invoke(
        [
            "masks",
            "--dense-run",
            str(runs / "dense"),
            "--masked-run",
            str(runs / "masked"),
            "--format",
            "json",
        ],
        capsys,
        monkeypatch,
    )

    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert sorted({row["step"] for row in rows}) == [0, 1, 2, 3]
    assert "temporary store" in err and "temporary store" not in out


# ---------------------------------------------------------------------------- the command line


def test_cli_plots_overlap_and_agreement_over_training(runs, tmp_path, capsys, monkeypatch):
    from spectrum_cli.analysis import analyze

    analyze(runs, tmp_path / "s.zarr", top_k=10, workers=1)
    ckpt = str(runs / "dense" / "step_3.safetensors")

    code, out, err = invoke(
        ["masks", ckpt, "--keep", "0.1", "--plot", str(tmp_path / "iou.png")], capsys, monkeypatch
    )
    assert code == 0, err
    assert (tmp_path / "iou.png").read_bytes()[:4] == b"\x89PNG"
    assert "iou.png" in err and "iou.png" not in out

    code, out, err = invoke(
        [
            "masks",
            "--dense-run",
            "dense",
            "--masked-run",
            "masked",
            "--store",
            str(tmp_path / "s.zarr"),
            "--plot",
            str(tmp_path / "steps.png"),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "agreement score, dense against masked" in out and "fc2.weight" in out


def test_cli_json_rows_name_layers(tmp_path, capsys, monkeypatch):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")

    code, out, err = invoke(
        ["masks", str(tmp_path / "ckpt.safetensors"), "--keep", "0.1", "--format", "json"],
        capsys,
        monkeypatch,
    )

    assert code == 0, err
    result = json.loads(out)
    assert result["masks"] == "magnitude, global scope, keep 0.1"
    assert [row["layer"] for row in result["layers"]] == ["fc1.weight", "fc2.weight"]
    row = result["layers"][0]
    assert row["ranks"] == [1, 2, 4, 8, 16, 32] and len(row["iou"]) == 6
    assert row["agreement"] > row["random_agreement"]
    assert err == ""


def test_cli_table_and_csv(tmp_path, capsys, monkeypatch):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")
    ckpt = str(tmp_path / "ckpt.safetensors")

    code, out, _ = invoke(["masks", ckpt, "--keep", "0.1", "--scope", "layer"], capsys, monkeypatch)
    assert code == 0 and "fc2.weight" in out and "out.weight" not in out

    code, out, _ = invoke(
        ["masks", ckpt, "--keep", "0.1", "--include-output", "--format", "csv"], capsys, monkeypatch
    )
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "layer,matrix_shape,density,agreement,random_agreement,random_iou,k,iou"
    assert sum(line.startswith("out.weight,10x40,") for line in lines) == len(rank_grid(10))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "0.1", "--mask", "m.safetensors"], "not both"),
        (["--keep", "0"], "--keep must be a fraction"),
        (["--dense-run", "a"], "give both --dense-run and --masked-run"),
        (["--dense-run", "a", "--masked-run", "b"], "apply to one checkpoint"),
        (["--store", "s.zarr", "--keep", "0.1"], "--store applies to"),
    ],
)
def test_cli_usage_errors_are_one_red_line(tmp_path, capsys, monkeypatch, args, message):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")

    code, out, err = invoke(
        ["masks", str(tmp_path / "ckpt.safetensors"), *args], capsys, monkeypatch
    )

    assert code == 2
    assert out == ""
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------------------- the paper's effect


@pytest.mark.skipif(not (SAMPLES / "masked").is_dir(), reason="sample checkpoints not generated")
@pytest.mark.parametrize("how", ["shipped mask", "global magnitude, keep 0.05"])
def test_magnitude_masks_keep_the_top_directions_of_the_sample_network(how):
    from spectrum_cli.checkpoints import discover

    final = discover(SAMPLES / "masked" / "dense").checkpoints[-1]
    if how == "shipped mask":
        masked = collect_masks(final.path, mask=SAMPLES / "masked" / "mask.safetensors")
    else:
        masked = collect_masks(final.path, keep=0.05)

    reports = compare_masks(masked, seed=0)

    hidden = list(masked.weights)[:-1]
    assert [report.layer for report in reports] == hidden
    for report in reports:
        assert report.agreement > 0.15, report
        assert report.random_agreement < 0.08, report
        assert report.agreement > 5 * report.random_agreement, report
