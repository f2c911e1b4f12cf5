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

from spectrum_cli.errors import UsageError
from spectrum_cli.masks import (
    MaskedWeights,
    collect_masks,
    compare_masks,
    compare_runs,
    load_weights,
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


def with_mask_file(tmp_path, checkpoint: str = "ckpt.safetensors") -> list[str]:
    """``masks CHECKPOINT --mask mask.safetensors``, both files in ``tmp_path``."""
    return ["masks", str(tmp_path / checkpoint), "--mask", str(tmp_path / "mask.safetensors")]


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


def test_an_empty_mask_has_no_overlap_and_keeps_no_direction(caplog):
    weights = {"fc.weight": low_rank_weights(12, 10, seed=3)}
    masks = {"fc.weight": torch.zeros(12, 10, dtype=torch.bool)}

    with caplog.at_level("WARNING", logger="spectrum_cli.masks"):
        [report] = compare_masks(MaskedWeights(weights, masks, "empty"))

    assert report.density == 0.0 and report.agreement == 0.0
    assert report.iou is None and report.random_iou is None
    assert report.ranks == [1, 2, 4, 8, 10]
    assert "fc.weight: the mask keeps nothing (density 0); its IoU is undefined" in caplog.text
    assert mask_iou(masks["fc.weight"], masks["fc.weight"]) is None


def test_scores_stay_within_one_when_rounding_passes_it(monkeypatch):
    weights = {"fc.weight": low_rank_weights(12, 10, seed=3)}
    masks = {"fc.weight": torch.ones(12, 10, dtype=torch.bool)}
    monkeypatch.setattr("spectrum_cli.masks.agreement_score", lambda *_: np.float64(1 + 2e-8))

    [report] = compare_masks(MaskedWeights(weights, masks, "ones"))

    assert report.agreement == 1.0 and report.random_agreement == 1.0


def test_weights_stored_masked_are_named_in_a_warning(caplog):
    w = low_rank_weights(30, 20, seed=4)
    mask = magnitude_mask(w, 60)

    with caplog.at_level("WARNING", logger="spectrum_cli.masks"):
        [report] = compare_masks(MaskedWeights({"fc.weight": w * mask}, {"fc.weight": mask}, "m"))
        [unmasked] = compare_masks(MaskedWeights({"fc.weight": w}, {"fc.weight": mask}, "m"))

    assert report.agreement == pytest.approx(1.0, abs=1e-6) and report.agreement <= 1.0
    assert caplog.text.count("W is already zero wherever the mask is 0") == 1
    assert unmasked.agreement < 1.0


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
    mask = {layer: (weights[layer].abs() > 0.2).to(dtype) for layer in ("fc1.weight", "fc2.weight")}
    if suffix == ".pt":
        torch.save({f"module.{layer}": m for layer, m in mask.items()}, tmp_path / f"mask{suffix}")
    else:
        save_file(mask, tmp_path / f"mask{suffix}")

    masked = collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / f"mask{suffix}")

    assert list(masked.masks) == ["fc1.weight", "fc2.weight"]
    assert torch.equal(masked.masks["fc1.weight"], weights["fc1.weight"].abs() > 0.2)
    assert masked.output_layer == "out.weight" and masked.unmasked == ["out.weight"]


def test_a_mismatched_mask_lists_every_difference_at_once(tmp_path):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")
    mask = {
        "fc1.weight": torch.ones(32, 48, dtype=torch.bool),  # transposed
        "fc3.weight": torch.ones(5, 5, dtype=torch.bool),  # no such layer
        "fc2.bias": torch.ones(41, dtype=torch.bool),  # a vector of the wrong length
        "fc9.bias": torch.ones(40, dtype=torch.bool),  # a vector with no tensor
        "out.bias": torch.ones(10, dtype=torch.bool),  # a vector that fits
    }
    save_file(mask, tmp_path / "mask.safetensors")
    checkpoint = load_weights(tmp_path / "ckpt.safetensors")

    with pytest.raises(UsageError) as caught:
        read_masks(tmp_path / "mask.safetensors", checkpoint, output="out.weight")

    message = str(caught.value)
    assert "5 differences" in message
    assert "'fc1.weight': mask shape (32, 48), weight shape (48, 32)" in message
    assert "mask 'fc3.weight' has no tensor in the checkpoint" in message
    assert "'fc2.bias': mask shape (41,), weight shape (40,)" in message
    assert "mask 'fc9.bias' has no tensor" in message
    assert message.endswith("matrices without a mask: fc2.weight")
    assert "out.bias" not in message


def test_a_mask_must_cover_every_matrix_but_the_output_layer(tmp_path):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    save_file({"fc1.weight": torch.ones(48, 32)}, tmp_path / "some.safetensors")
    everything = {k: torch.ones_like(w) for k, w in weights.items() if w.dim() == 2}
    save_file(everything, tmp_path / "all.safetensors")
    checkpoint = load_weights(tmp_path / "ckpt.safetensors")

    with pytest.raises(UsageError, match=r"1 differences.*without a mask: fc2\.weight$"):
        read_masks(tmp_path / "some.safetensors", checkpoint, output="out.weight")
    with pytest.raises(UsageError, match=r"without a mask: fc2\.weight, out\.weight$"):
        read_masks(tmp_path / "some.safetensors", checkpoint, output=None)
    masks = read_masks(tmp_path / "all.safetensors", checkpoint, output="out.weight")
    assert list(masks) == ["fc1.weight", "fc2.weight", "out.weight"]


def test_vector_masks_must_hold_zeros_and_ones_too(tmp_path):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    mask = {k: torch.ones_like(w) for k, w in weights.items() if k != "out.weight"}
    mask["fc1.bias"] = torch.full((48,), 0.5)
    save_file(mask, tmp_path / "mask.safetensors")

    with pytest.raises(UsageError, match=r"mask 'fc1\.bias' holds values other than 0 and 1"):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "mask.safetensors")


def test_masks_holding_other_values_are_refused(tmp_path):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    mask = {"fc1.weight": weights["fc1.weight"], "fc2.weight": torch.ones(40, 48)}
    save_file(mask, tmp_path / "mask.safetensors")

    with pytest.raises(UsageError, match="values other than 0 and 1"):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "mask.safetensors")


def test_a_checkpoint_without_masks_asks_for_one(tmp_path):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")

    with pytest.raises(UsageError, match="--mask FILE or --keep"):
        collect_masks(tmp_path / "ckpt.safetensors")
    with pytest.raises(UsageError, match="not both"):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "m", keep=0.1)


def resnet_like(path: Path) -> dict[str, torch.Tensor]:
    """Weights named as torchvision's ResNet names them; sorted, ``fc`` precedes ``layer1``."""
    weights = {
        "conv1.weight": low_rank_weights(8, 27, 0).reshape(8, 3, 3, 3),
        "layer1.0.conv1.weight": low_rank_weights(8, 72, 1).reshape(8, 8, 3, 3),
        "fc.weight": low_rank_weights(10, 8, 2),
        "fc.bias": torch.zeros(10),
    }
    if path.suffix == ".safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path)
    return weights


def test_the_output_layer_is_found_by_name_in_sorted_files_and_by_order_in_pickles(tmp_path):
    resnet_like(tmp_path / "resnet.safetensors")
    torch.save(
        {"features.0.weight": torch.randn(6, 4), "head.weight": torch.randn(3, 6)}
        | {"readout.weight": torch.randn(2, 3)},
        tmp_path / "ordered.pt",
    )

    sorted_keys = collect_masks(tmp_path / "resnet.safetensors", keep=0.5)
    ordered = collect_masks(tmp_path / "ordered.pt", keep=0.5)
    named = collect_masks(tmp_path / "resnet.safetensors", keep=0.5, output="conv1.weight")

    assert sorted_keys.output_layer == "fc.weight"
    assert list(sorted_keys.masks) == ["conv1.weight", "layer1.0.conv1.weight"]
    assert ordered.output_layer == "readout.weight"
    assert list(ordered.masks) == ["features.0.weight", "head.weight"]
    assert list(named.masks) == ["fc.weight", "layer1.0.conv1.weight"]
    with pytest.raises(UsageError, match=r"no matrix 'head\.weight' to take as the output layer"):
        collect_masks(tmp_path / "resnet.safetensors", keep=0.5, output="head.weight")


def test_a_single_matrix_is_pruned_only_when_asked(tmp_path):
    save_file({"out.weight": low_rank_weights(6, 5, 0)}, tmp_path / "one.safetensors")

    with pytest.raises(UsageError, match=r"only matrix, out\.weight, is the output layer"):
        collect_masks(tmp_path / "one.safetensors", keep=0.5)
    masked = collect_masks(tmp_path / "one.safetensors", keep=0.5, include_output=True)
    assert list(masked.masks) == ["out.weight"] and masked.unmasked == []


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ({"scope": "layer"}, "--scope applies to --keep only"),
        ({"include_output": True}, "--include-output applies to --keep only"),
    ],
)
def test_options_that_would_change_nothing_are_refused(tmp_path, how, message):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")

    with pytest.raises(UsageError, match=message):
        collect_masks(tmp_path / "ckpt.safetensors", mask=tmp_path / "mask.safetensors", **how)


def pruned_net(amount: float = 0.5) -> torch.nn.Sequential:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    prune.l1_unstructured(net[0], "weight", amount=amount)
    return net


def test_masks_given_take_the_place_of_prune_masks_with_a_warning(tmp_path, caplog):
    torch.save(pruned_net().state_dict(), tmp_path / "pruned.pt")

    with caplog.at_level("WARNING", logger="spectrum_cli.masks"):
        masked = collect_masks(tmp_path / "pruned.pt", keep=0.25)

    assert "carries torch.nn.utils.prune masks; they are ignored and --keep 0.25" in caplog.text
    assert masked.source.startswith("magnitude") and list(masked.masks) == ["0.weight"]
    assert int(masked.masks["0.weight"].sum()) == 12
    with pytest.raises(UsageError, match="--output-layer applies to --mask and --keep"):
        collect_masks(tmp_path / "pruned.pt", output="0.weight")


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
    with pytest.raises(UsageError, match="no run 'sparse'"):
        compare_runs("dense", "sparse", store=tmp_path / "s.zarr")
    with pytest.raises(UsageError, match=r"store .*missing\.zarr does not exist"):
        compare_runs("dense", "masked", store=tmp_path / "missing.zarr")


def test_pruned_checkpoints_are_analysed_as_their_masked_weights(tmp_path):
    from spectrum_cli.analysis import analyze
    from spectrum_cli.store import Store

    net = pruned_net()
    for name in ("dense", "pruned"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    for step in (0, 1):
        dense = {k: v for k, v in net.state_dict().items() if not k.startswith("0.weight")}
        torch.save(
            dense | {"0.weight": net[0].weight_orig.detach()},
            tmp_path / "runs" / "dense" / f"step_{step}.pt",
        )
        torch.save(net.state_dict(), tmp_path / "runs" / "pruned" / f"step_{step}.pt")

    analyze(tmp_path / "runs", tmp_path / "s.zarr", top_k=3, workers=1)
    store = Store.open(tmp_path / "s.zarr")
    rows = compare_runs("dense", "pruned", store=tmp_path / "s.zarr")

    assert store.layers("pruned") == ["0.weight", "2.weight"]
    sigma = store.read("pruned", "0.weight", ("sigma",)).sigma
    assert sigma is not None
    expected = torch.linalg.svdvals(net[0].weight.detach().double()).numpy()
    np.testing.assert_allclose(sigma[0], expected, rtol=1e-5)
    assert {(row.layer, row.step) for row in rows} == {
        (layer, step) for layer in ("0.weight", "2.weight") for step in (0, 1)
    }
    [score] = {row.agreement for row in rows if row.layer == "2.weight"}
    assert score == pytest.approx(1.0, abs=1e-5) and score <= 1.0


def test_layers_only_one_run_has_are_named_on_stderr(runs, tmp_path, capsys, monkeypatch):
    from spectrum_cli.analysis import analyze

    for path in (runs / "masked").iterdir():
        weights = mlp_weights(seed=0)
        weights["extra.weight"] = weights.pop("out.weight")
        save_file(weights, path)
    analyze(runs, tmp_path / "s.zarr", top_k=10, workers=1)

    code, out, err = invoke(
        ["masks", "--dense-run", "dense", "--masked-run", "masked", "-s", str(tmp_path / "s.zarr")],
        capsys,
        monkeypatch,
    )

    assert code == 0, err
    err = " ".join(err.split())  # log lines wrap at the console's width
    assert "only in 'dense': out.weight; only in 'masked': extra.weight" in err
    assert "extra.weight" not in out


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


def test_overlap_figure_draws_each_defined_layer_and_its_control():
    from spectrum_cli.plots import mask_overlap_figure

    weights = {k: w for k, w in mlp_weights().items() if k != "out.weight" and w.dim() == 2}
    masks = magnitude_masks(weights, keep=0.2, include_output=True)
    masks["fc2.weight"] = torch.zeros(40, 48, dtype=torch.bool)
    first, empty = compare_masks(MaskedWeights(weights, masks, "m"))

    figure = mask_overlap_figure("title", [first, empty])

    [ax] = figure.axes
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    controls = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in curves] == [f"fc1.weight (d = {first.density:.3f})"]
    assert list(curves[0].get_xdata()) == first.ranks == [1, 2, 4, 8, 16, 32]
    assert list(curves[0].get_ydata()) == first.iou
    [control] = controls
    assert list(control.get_ydata()) == [first.random_iou] * 2
    assert ax.get_xscale() == "log" and ax.get_ylim() == (0, 1.02)
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [curves[0].get_label()]
    assert figure.texts[0].get_text() == "title"


def test_agreement_figure_draws_one_line_per_layer_over_steps():
    from spectrum_cli.masks import StepAgreement
    from spectrum_cli.plots import masked_agreement_figure

    rows = [StepAgreement("a", t, 1 - t / 10) for t in (0, 2, 4)] + [StepAgreement("b", 4, 0.5)]

    figure = masked_agreement_figure("dense against masked", rows)

    [ax] = figure.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["a", "b"]
    assert list(lines["a"].get_xdata()) == [0, 2, 4]
    assert list(lines["a"].get_ydata()) == [1.0, 0.8, 0.6]
    assert list(lines["b"].get_xdata()) == [4] and ax.get_xlabel() == "step"


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
    assert code == 0 and "│ fc2.weight" in out and "│ out.weight" not in out
    assert "output layer out.weight left whole" in out

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
        (["--dense-run", "a", "--masked-run", "b"], "CHECKPOINT applies to one checkpoint"),
        (["--store", "s.zarr", "--keep", "0.1"], "--store applies to"),
        (["--keep", "1.5"], "--keep must be a fraction in (0, 1], got 1.5"),
        (["--mask", "m.safetensors", "--scope", "layer"], "--scope applies to --keep only"),
        (["--mask", "m.safetensors", "--include-output"], "--include-output applies to --keep"),
        (["--dense-run", "a", "--masked-run", "b", "--seed", "1"], "CHECKPOINT, --seed apply to"),
        (
            ["--dense-run", "a", "--masked-run", "b", "--scope", "layer"],
            "CHECKPOINT, --scope apply to one",
        ),
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


def test_cli_reads_a_mask_file_and_names_the_output_layer(tmp_path, capsys, monkeypatch):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    mask = {k: magnitude_mask(weights[k], 100) for k in ("fc1.weight", "fc2.weight")}
    save_file(mask, tmp_path / "mask.safetensors")

    code, out, err = invoke([*with_mask_file(tmp_path), "--format", "json"], capsys, monkeypatch)

    assert code == 0, err
    result = json.loads(out)
    assert result["masks"] == f"mask file {tmp_path / 'mask.safetensors'}"
    assert result["output_layer"] == "out.weight" and result["unmasked"] == ["out.weight"]
    assert [row["layer"] for row in result["layers"]] == ["fc1.weight", "fc2.weight"]
    assert result["layers"][0]["density"] == pytest.approx(100 / (48 * 32))
    assert err == ""


def test_cli_mismatched_mask_exits_2_listing_the_differences(tmp_path, capsys, monkeypatch):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")
    save_file({"fc1.weight": torch.ones(32, 48)}, tmp_path / "mask.safetensors")

    code, out, err = invoke(with_mask_file(tmp_path), capsys, monkeypatch)

    assert code == 2 and out == ""
    assert "2 differences" in err and "weight shape (48, 32)" in err
    assert "matrices without a mask: fc2.weight" in err and "Traceback" not in err


def test_cli_reads_prune_pairs_and_warns_when_told_to_ignore_them(tmp_path, capsys, monkeypatch):
    torch.save({"state_dict": pruned_net(amount=0.25).state_dict()}, tmp_path / "pruned.pt")

    code, out, err = invoke(
        ["masks", str(tmp_path / "pruned.pt"), "--format", "json"], capsys, monkeypatch
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["masks"] == "torch.nn.utils.prune masks in the checkpoint"
    assert [(r["layer"], r["density"]) for r in result["layers"]] == [("0.weight", 0.75)]
    assert result["output_layer"] == "2.weight" and err == ""

    code, out, err = invoke(
        ["masks", str(tmp_path / "pruned.pt"), "--keep", "0.5"], capsys, monkeypatch
    )
    assert code == 0 and "prune masks; they are ignored" in " ".join(err.split())


def test_cli_seed_reproduces_and_changes_the_random_control(tmp_path, capsys, monkeypatch):
    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")
    args = ["masks", str(tmp_path / "ckpt.safetensors"), "--keep", "0.1", "--format", "json"]

    def control(*seed: str) -> list[tuple[float, float]]:
        code, out, err = invoke([*args, *seed], capsys, monkeypatch)
        assert code == 0, err
        return [(r["random_agreement"], r["random_iou"]) for r in json.loads(out)["layers"]]

    default, zero, again, other = (
        control(),
        control("--seed", "0"),
        control("--seed", "7"),
        control("--seed", "8"),
    )

    assert default == zero
    assert again == control("--seed", "7")
    assert again != other and again != zero


def test_cli_empty_mask_shows_undefined_overlap(tmp_path, capsys, monkeypatch):
    weights = mlp_weights()
    save_file(weights, tmp_path / "ckpt.safetensors")
    mask = {"fc1.weight": torch.zeros(48, 32), "fc2.weight": torch.ones(40, 48)}
    save_file(mask, tmp_path / "mask.safetensors")

    code, out, err = invoke([*with_mask_file(tmp_path), "--format", "json"], capsys, monkeypatch)
    assert code == 0, err
    first, second = json.loads(out)["layers"]
    assert first["iou"] is None and first["random_iou"] is None and first["agreement"] == 0.0
    assert second["iou"][-1] == 1.0
    assert "fc1.weight: the mask keeps nothing" in " ".join(err.split())

    code, out, err = invoke(with_mask_file(tmp_path), capsys, monkeypatch)
    [row] = [line for line in out.splitlines() if "fc1.weight" in line]
    assert row.count("—") == 2 and "1:" not in row


def test_cli_warns_on_weights_stored_masked(tmp_path, capsys, monkeypatch):
    weights = mlp_weights()
    mask = {k: magnitude_mask(weights[k], 100) for k in ("fc1.weight", "fc2.weight")}
    save_file(mask, tmp_path / "mask.safetensors")
    save_file(
        weights | {k: weights[k] * m for k, m in mask.items()}, tmp_path / "sparse.safetensors"
    )

    args = [*with_mask_file(tmp_path, "sparse.safetensors"), "--format", "json"]
    code, out, err = invoke(args, capsys, monkeypatch)

    assert code == 0, err
    assert all(row["agreement"] <= 1.0 for row in json.loads(out)["layers"])
    err = " ".join(err.split())
    assert "fc1.weight: W is already zero" in err and "fc2.weight: W is already zero" in err


def test_cli_output_layer_by_name(tmp_path, capsys, monkeypatch):
    resnet_like(tmp_path / "resnet.safetensors")
    ckpt = str(tmp_path / "resnet.safetensors")

    code, out, err = invoke(
        ["masks", ckpt, "--keep", "0.2", "--format", "json"], capsys, monkeypatch
    )
    assert code == 0, err
    assert json.loads(out)["output_layer"] == "fc.weight"

    code, out, err = invoke(
        ["masks", ckpt, "--keep", "0.2", "--output-layer", "conv1.weight"], capsys, monkeypatch
    )
    assert code == 0, err
    assert "output layer conv1.weight left whole" in out and "│ fc.weight" in out

    code, out, err = invoke(
        ["masks", ckpt, "--keep", "0.2", "--output-layer", "nope"], capsys, monkeypatch
    )
    assert code == 2 and "no matrix 'nope'" in err


def test_cli_bad_paths_and_run_names_exit_2(runs, tmp_path, capsys, monkeypatch):
    from spectrum_cli.analysis import analyze

    save_file(mlp_weights(), tmp_path / "ckpt.safetensors")
    analyze(runs, tmp_path / "s.zarr", top_k=10, workers=1)
    store = str(tmp_path / "s.zarr")
    cases = [
        (
            ["masks", str(tmp_path / "ckpt.safetensors"), "--mask", str(tmp_path / "no.pt")],
            "mask file",
        ),
        (
            [
                "masks",
                "--dense-run",
                "dense",
                "--masked-run",
                "masked",
                "-s",
                str(tmp_path / "no.zarr"),
            ],
            "no.zarr does not exist",
        ),
        (
            ["masks", "--dense-run", "dense", "--masked-run", "sparse", "-s", store],
            "no run 'sparse'",
        ),
    ]
    for args, message in cases:
        code, out, err = invoke(args, capsys, monkeypatch)
        assert (code, out) == (2, ""), err
        assert message in err and "Traceback" not in err


def test_keep_help_and_check_agree(capsys, monkeypatch):
    code, out, _ = invoke(["masks", "--help"], capsys, monkeypatch)

    assert code == 0
    assert "0 < FRACTION ≤ 1" in out and "0.0<=x<=1.0" not in out
    assert "depends on W and the density" in " ".join(out.split())


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


@pytest.mark.skipif(not (SAMPLES / "masked").is_dir(), reason="sample checkpoints not generated")
def test_the_sample_runs_over_training():
    from spectrum_cli.checkpoints import discover

    found = discover(SAMPLES / "masked")
    assert {c.run for c in found.checkpoints} == {"dense", "sparse"}
    assert any(note.startswith("skipped mask.safetensors: a mask") for note in found.notes)

    rows = compare_runs(str(SAMPLES / "masked" / "dense"), str(SAMPLES / "masked" / "sparse"))

    score = {(row.layer, row.step): row.agreement for row in rows}
    steps = sorted({row.step for row in rows})
    assert steps == [100, 500, 1000, 2000, 4000, 6000]
    assert all(0.0 <= value <= 1.0 for value in score.values())

    # The runs share step 100; the output layer is not masked, so it agrees fully there only.
    assert score["4.weight", 100] == pytest.approx(1.0, abs=1e-5)
    assert all(score["4.weight", t] < 0.5 for t in steps[1:])

    # A mask taken from the final weights keeps almost none of the step-100 top directions;
    # the masked run's hidden matrices turn towards the dense run's as both train.
    for layer in ("0.weight", "2.weight"):
        assert score[layer, 100] < 0.05
        assert score[layer, 6000] > 3 * score[layer, 100]
        assert max(score[layer, t] for t in steps) < 0.3
