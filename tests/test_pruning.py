"""Singular-value pruning: components kept, matrices cut, evaluation before and after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from spectrum_cli.checkpoints import load_tensors
from spectrum_cli.errors import UsageError
from spectrum_cli.evaluation import EvaluationData, Evaluator, evaluator_for
from spectrum_cli.pruning import (
    kept_components,
    prune_matrix,
    prune_singular_values,
    pruned_evaluation,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
DIGITS_FINAL = SAMPLES / "digits-true" / "step_009600.safetensors"


@pytest.mark.parametrize(
    ("rank_bound", "fraction", "kept"),
    [(10, 0.5, 5), (59, 0.5, 30), (1, 0.5, 1), (64, 0.0, 0), (64, 1.0, 64), (10, 0.25, 3)],
)
def test_kept_components_round_the_fraction_of_r(rank_bound, fraction, kept):
    assert kept_components(rank_bound, fraction) == kept


@given(st.integers(2, 12), st.integers(2, 12), st.floats(0, 1), st.sampled_from(["top", "bottom"]))
@settings(max_examples=40, deadline=None)
def test_a_pruned_matrix_keeps_exactly_the_chosen_singular_values(m, n, fraction, keep):
    matrix = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 31 + n))
    pruned = prune_matrix(matrix, keep, fraction)
    sigma = torch.linalg.svdvals(matrix.double())
    r, q = len(sigma), kept_components(min(m, n), fraction)
    chosen = sigma[:q] if keep == "top" else sigma[r - q :]
    got = torch.linalg.svdvals(pruned.double())  # (r,)
    assert pruned.shape == matrix.shape and pruned.dtype == matrix.dtype
    assert torch.allclose(got[:q], chosen, atol=1e-5)
    assert all(float(value) < 1e-5 for value in got[q:])


def test_kernels_keep_their_shape_and_dtype():
    kernel = torch.randn(8, 3, 3, 3).to(torch.float16)
    pruned = prune_matrix(kernel, "top", 1.0)
    assert pruned.shape == kernel.shape and pruned.dtype == torch.float16
    assert torch.allclose(pruned.float(), kernel.float(), atol=1e-2)


def test_the_output_layer_and_vectors_are_left_whole():
    tensors = {
        "0.weight": torch.randn(16, 8),
        "0.bias": torch.randn(16),
        "2.weight": torch.randn(4, 16),
        "2.bias": torch.randn(4),
    }
    pruned, layers = prune_singular_values(tensors, "bottom", 0.25)
    assert pruned["2.weight"] is tensors["2.weight"]
    assert pruned["0.bias"] is tensors["0.bias"]
    assert not torch.equal(pruned["0.weight"], tensors["0.weight"])
    assert [(row.layer, row.rank_bound, row.kept, row.pruned) for row in layers] == [
        ("0.weight", 8, 2, True),
        ("2.weight", 4, 4, False),
    ]


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="--keep must be"):
        prune_singular_values({"w": torch.zeros(2, 2)}, "middle", 0.5)
    with pytest.raises(UsageError, match="--fraction must lie in"):
        prune_singular_values({"w": torch.zeros(2, 2)}, "top", 1.5)


def test_top_components_carry_what_the_network_learned():
    evaluator = evaluator_for(DIGITS_FINAL)
    whole = pruned_evaluation(DIGITS_FINAL, evaluator, keep="top", fraction=1.0)
    top = pruned_evaluation(DIGITS_FINAL, evaluator, keep="top", fraction=0.25)
    bottom = pruned_evaluation(DIGITS_FINAL, evaluator, keep="bottom", fraction=0.25)

    assert [s.split for s in whole.splits] == ["train", "val"]
    for s in whole.splits:
        assert s.loss_after == pytest.approx(s.loss_before, abs=1e-5)
        assert s.error_after == pytest.approx(s.error_before, abs=1e-9)
    top_val, bottom_val = top.splits[1], bottom.splits[1]
    assert top_val.error_after is not None and bottom_val.error_after is not None
    assert top_val.error_after < 0.1
    assert bottom_val.error_after > 0.5
    assert top_val.error_before == bottom_val.error_before


def test_prune_eval_command(tmp_path: Path):
    result = run_cli(
        "prune-eval", DIGITS_FINAL, "--keep", "bottom", "--fraction", "0.5", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["keep"] == "bottom" and report["fraction"] == 0.5
    assert [s["split"] for s in report["splits"]] == ["train", "val"]
    assert [layer["kept"] for layer in report["layers"]] == [32, 64, 10]
    assert report["splits"][1]["error_after"] > report["splits"][1]["error_before"]

    table = run_cli("prune-eval", DIGITS_FINAL, "--max-examples", "100")
    assert table.returncode == 0, table.stderr
    assert "output layer, whole" in table.stdout and "100" in table.stdout


class _FeaturesAndClassifier(nn.Module):
    """Hidden layers under ``features``, the output layer under ``classifier``: sorted keys put
    the output layer first."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        self.classifier = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_the_output_layer_is_the_last_matrix_in_the_model_order_not_the_file_order(tmp_path):
    torch.manual_seed(0)
    model = _FeaturesAndClassifier()
    path = tmp_path / "model.safetensors"
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, path)
    assert next(iter(load_tensors(path)))[0] == "classifier.bias"  # safetensors sorts its keys

    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    evaluator = Evaluator(_FeaturesAndClassifier(), EvaluationData({"train": (x, y)}), "m", "d")
    report = pruned_evaluation(path, evaluator, keep="top", fraction=0.25)
    assert [(row.layer, row.kept, row.pruned) for row in report.layers] == [
        ("features.0.weight", 2, True),
        ("features.2.weight", 3, True),
        ("classifier.weight", 4, False),
    ]
    state = evaluator.model.state_dict()
    assert torch.equal(state["classifier.weight"], model.classifier.weight.detach())
    assert torch.linalg.matrix_rank(state["features.2.weight"]) == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_its_layers(tmp_path, bad):
    torch.manual_seed(0)
    state = {name: t.detach().clone() for name, t in _FeaturesAndClassifier().state_dict().items()}
    state["features.2.weight"][3, 1] = bad
    state["classifier.bias"][0] = -bad
    path = tmp_path / "diverged.safetensors"
    save_file(state, path)
    x, y = torch.randn(40, 6), torch.randint(0, 4, (40,))
    evaluator = Evaluator(_FeaturesAndClassifier(), EvaluationData({"train": (x, y)}), "m", "d")
    with pytest.raises(UsageError) as raised:
        pruned_evaluation(path, evaluator)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    assert "classifier.bias (1 of 4)" in message and "features.2.weight (1 of 192)" in message


def test_prune_eval_command_stops_on_non_finite_weights(tmp_path: Path):
    state = dict(load_tensors(DIGITS_FINAL))
    state["2.weight"] = state["2.weight"].clone()
    state["2.weight"][0, 0] = float("inf")
    path = tmp_path / "diverged.safetensors"
    with safe_open(DIGITS_FINAL, "pt") as source:
        save_file(state, path, metadata=source.metadata())  # still a sample: no flags needed
    result = run_cli("prune-eval", path, "--format", "json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "2.weight (1 of 16384)" in result.stderr and "diverged.safetensors" in result.stderr


def test_without_a_model_the_output_layer_is_found_by_its_name():
    torch.manual_seed(0)
    state = _FeaturesAndClassifier().state_dict()
    tensors = {name: state[name] for name in sorted(state)}  # as a safetensors file holds them
    _, layers = prune_singular_values(tensors, "top", 0.5)
    assert [(row.layer, row.pruned) for row in layers] == [
        ("classifier.weight", False),
        ("features.0.weight", True),
        ("features.2.weight", True),
    ]
