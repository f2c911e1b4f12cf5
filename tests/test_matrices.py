"""Weight tensors as matrices, and which matrix is the output layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spectrum_cli.errors import UsageError
from spectrum_cli.matrices import as_matrix, matrix_info, output_layer

# Keys as a safetensors file stores them: sorted, so the head need not come last.
RESNET = ["conv1.weight", "fc.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"]
VGG = ["classifier.0.weight", "classifier.3.weight", "classifier.6.weight", "features.0.weight"]
MLP = ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (RESNET, "fc.weight"),
        (VGG, "classifier.6.weight"),
        (MLP, "4.weight"),
        (["lm_head.weight", "model.layers.0.mlp.down_proj.weight"], "lm_head.weight"),
    ],
)
def test_sorted_keys_take_the_output_layer_by_name_else_the_last(layers, expected):
    assert output_layer(layers, model_order=False) == expected


def test_the_models_own_order_takes_the_last_matrix():
    layers = ["fc.weight", "hidden.weight", "readout.weight"]

    assert output_layer(layers, model_order=True) == "readout.weight"
    assert output_layer(layers, model_order=False) == "fc.weight"


def test_a_named_output_layer_wins_and_must_exist():
    assert output_layer(MLP, model_order=False, name="2.weight") == "2.weight"
    assert output_layer([], model_order=True) is None
    with pytest.raises(UsageError, match=r"no matrix 'head\.weight'.*0\.weight, 2\.weight"):
        output_layer(MLP, model_order=True, name="head.weight")


def test_masks_are_never_matrices():
    assert matrix_info("0.weight_mask", torch.ones(4, 3)) is None
    assert matrix_info("causal_mask", torch.ones(4, 4)) is None
    info = matrix_info("0.weight", torch.ones(4, 3, 2))
    assert info is not None and info.shape == (4, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64])
def test_arrays_are_described_and_flattened_as_tensors_are(dtype):
    tensor = torch.arange(24).reshape(4, 3, 2).to(dtype)
    array = tensor.numpy()

    assert matrix_info("conv.weight", array) == matrix_info("conv.weight", tensor)
    if dtype != torch.int64:
        matrix, from_tensor = as_matrix(array), as_matrix(tensor)
        assert isinstance(matrix, np.ndarray) and matrix.shape == (4, 6)
        assert str(matrix.dtype) == str(from_tensor.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(matrix, from_tensor.numpy())
