"""Weight tensors as matrices, and which matrix is the output layer."""

from __future__ import annotations

import pytest
import torch

from spectrum_cli.errors import UsageError
from spectrum_cli.matrices import matrix_info, output_layer

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
