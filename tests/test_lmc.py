"""Linear mode connectivity: barrier, pairing, BatchNorm, weight matching, samples, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from spectrum_cli.errors import EvaluationError, UsageError
from spectrum_cli.evaluation import EvaluationData, Evaluator, evaluator_for
from spectrum_cli.lmc import (
    LinearPath,
    UnitMatching,
    first_tensor,
    interpolation_barrier,
    linear_mode_connectivity,
    pair_checkpoints,
    permute_units,
    top_vectors,
    unit_chain,
    weight_matching,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SPAWN = SAMPLES / "spawn"
FINAL = "step_003000.safetensors"
PARENT_FINAL = SPAWN / "parent" / FINAL


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def conv_bn() -> nn.Module:
    """A chain of convolutions with BatchNorm, flattened into a linear output layer."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    )


def data_for(model: nn.Module, n: int = 64, seed: int = 0) -> EvaluationData:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 3, 4, 4) if isinstance(model[0], nn.Conv2d) else (n, 6)
    x = torch.randn(*shape, generator=generator)
    classes = model[-1].out_features
    y = torch.randint(0, classes, (n,), generator=generator)
    return EvaluationData({"train": (x, y), "test": (x[: n // 2], y[: n // 2])})


def saved(model: nn.Module, path: Path, dtype: torch.dtype | None = None) -> Path:
    state = {
        name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()
        for name, t in model.state_dict().items()
    }
    save_file(state, path)
    return path


def shuffled(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same network with its hidden units in a random order."""
    chain = unit_chain(state)
    generator = np.random.default_rng(seed)
    perms = tuple(generator.permutation(layer.units) for layer in chain[:-1])
    return permute_units(state, UnitMatching(tuple(chain), perms, 0))


def outputs(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------------------- the barrier


@given(
    st.floats(0, 10, allow_nan=False),
    st.integers(2, 25),
)
@settings(max_examples=50, deadline=None)
def test_the_barrier_between_equal_values_is_exactly_zero(value, points):
    alphas = np.linspace(0, 1, points)
    barrier = interpolation_barrier(alphas, [value] * points)
    assert barrier.height == 0.0
    assert barrier.height_over_mean == 0.0
    assert barrier.alpha is None and barrier.alpha_over_mean is None


@given(st.floats(0, 10), st.floats(0, 10), st.integers(2, 25))
@settings(max_examples=50, deadline=None)
def test_values_on_the_straight_line_have_no_barrier(start, end, points):
    alphas = np.linspace(0, 1, points)
    barrier = interpolation_barrier(alphas, start + alphas * (end - start))
    assert abs(barrier.height) <= 1e-12 * max(1.0, start, end)
    assert barrier.height_over_mean == pytest.approx(abs(end - start) / 2, abs=1e-12)


def test_the_two_forms_of_the_barrier_differ_when_the_ends_differ():
    alphas = np.linspace(0, 1, 5)
    barrier = interpolation_barrier(alphas, [1.0, 2.5, 3.0, 2.5, 2.0])
    # Above the line 1 + α: 1.25, 1.5, 0.75 at α = 0.25, 0.5, 0.75.
    assert barrier.height == pytest.approx(1.5)
    assert barrier.alpha == 0.5
    # Above the ends' mean 1.5, at the peak 3.0.
    assert barrier.height_over_mean == pytest.approx(1.5)
    assert barrier.alpha_over_mean == 0.5
    skewed = interpolation_barrier(alphas, [1.0, 3.0, 2.5, 2.2, 2.0])
    assert skewed.height == pytest.approx(1.75) and skewed.alpha == 0.25
    assert skewed.height_over_mean == pytest.approx(1.5) and skewed.alpha_over_mean == 0.25


# ---------------------------------------------------------------------------- pairing


def test_checkpoints_that_do_not_pair_are_reported_in_one_message(tmp_path: Path):
    a = {"embed.weight": torch.zeros(100, 8), "fc.weight": torch.zeros(4, 8), "old": torch.ones(2)}
    b = {"embed.weight": torch.zeros(120, 8), "fc.weight": torch.zeros(4, 8), "new": torch.ones(2)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    with pytest.raises(UsageError) as raised:
        pair_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    message = str(raised.value)
    assert "only in A (a.safetensors): old" in message
    assert "only in B (b.safetensors): new" in message
    assert "embed.weight (100, 8) vs (120, 8)" in message
    assert "\n" not in message


def test_every_entry_that_does_not_pair_is_named(tmp_path: Path):
    a = {f"blocks.{i}.weight": torch.zeros(2, 2) for i in range(12)}
    save_file(a, tmp_path / "a.safetensors")
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, tmp_path / "b.safetensors")
    with pytest.raises(UsageError) as raised:
        pair_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    message = str(raised.value)
    assert all(f"blocks.{i}.weight" in message for i in range(1, 12))
    assert "more" not in message and "\n" not in message


def test_non_finite_entries_of_both_checkpoints_are_named_before_anything_runs(tmp_path: Path):
    torch.manual_seed(3)
    a_state = {name: t.detach().clone() for name, t in mlp().state_dict().items()}
    b_state = {name: t.detach().clone() for name, t in mlp().state_dict().items()}
    a_state["4.bias"][1] = float("inf")
    b_state["0.weight"][2, 3] = float("nan")
    b_state["2.weight"][:2, 0] = float("-inf")
    save_file(a_state, tmp_path / "a.safetensors")
    save_file(b_state, tmp_path / "b.safetensors")
    with pytest.raises(UsageError) as raised:
        pair_checkpoints(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    message = str(raised.value)
    assert f"A ({tmp_path / 'a.safetensors'}) in 4.bias (1 of 4)" in message
    assert f"B ({tmp_path / 'b.safetensors'}) in 0.weight (1 of 96), 2.weight (2 of 256)" in message
    assert "\n" not in message


def test_entries_pair_by_normalised_name(tmp_path: Path):
    torch.manual_seed(8)
    model_a, model_b = mlp(), mlp()
    wrapped = {f"module._orig_mod.{name}": t for name, t in model_a.state_dict().items()}
    save_file(wrapped, tmp_path / "a.safetensors")
    b_path = saved(model_b, tmp_path / "b.safetensors")
    a, b = pair_checkpoints(tmp_path / "a.safetensors", b_path)
    assert list(a) == list(b) == sorted(model_b.state_dict())
    assert torch.equal(a["0.weight"], model_a[0].weight.detach())


def test_interpolation_is_float32_and_integer_buffers_come_from_a(tmp_path: Path):
    torch.manual_seed(0)
    model_a, model_b = conv_bn(), conv_bn()
    model_b[1].num_batches_tracked.fill_(7)
    a_path = saved(model_a, tmp_path / "a.safetensors", torch.float16)
    b_path = saved(model_b, tmp_path / "b.safetensors", torch.float16)
    a, b = pair_checkpoints(a_path, b_path)
    evaluator = Evaluator(conv_bn(), data_for(model_a), "m", "d")
    path = LinearPath(evaluator, a, b, bn_reset=False)
    path.load(0.3)
    state = evaluator.model.state_dict()
    expected = torch.lerp(a["3.weight"].float(), b["3.weight"].float(), 0.3)
    assert state["3.weight"].dtype == torch.float32
    assert torch.equal(state["3.weight"], expected)
    assert int(state["1.num_batches_tracked"]) == 0  # A's, not B's 7


@pytest.mark.parametrize("build", [mlp, conv_bn], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("bn_reset", [True, False], ids=["bn-reset", "no-bn-reset"])
def test_the_same_checkpoint_on_both_ends_has_barrier_exactly_zero(tmp_path, build, bn_reset):
    torch.manual_seed(1)
    model = build()
    if build is conv_bn:
        with torch.no_grad():
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
    a_path = saved(model, tmp_path / "a.safetensors")
    b_path = saved(model, tmp_path / "b.safetensors")
    evaluator = Evaluator(build(), data_for(model), "m", "d", batch_size=16)
    report = linear_mode_connectivity(a_path, b_path, evaluator, bn_reset=bn_reset)
    assert report.batchnorm == (build is conv_bn)
    assert report.bn_reset == (bn_reset and build is conv_bn)
    assert len(set(report.loss)) == 1
    for barrier in (report.loss_barrier, report.error_barrier):
        assert barrier is not None
        assert barrier.height == 0.0
        assert barrier.height_over_mean == 0.0


class _Recording(nn.Sequential):
    """The MLP, recording at every call whether inference mode is on and where its data are."""

    def __init__(self) -> None:
        super().__init__(*mlp())
        self.calls: list[tuple[bool, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            (torch.is_inference_mode_enabled(), self[0].weight.data_ptr(), x.data_ptr())
        )
        return super().forward(x)


def test_every_point_is_written_into_one_model_and_scored_in_inference_mode(tmp_path: Path):
    torch.manual_seed(9)
    a, b = pair_checkpoints(
        saved(mlp(), tmp_path / "a.safetensors"), saved(mlp(), tmp_path / "b.safetensors")
    )
    model = _Recording()
    evaluator = Evaluator(model, data_for(mlp()), "m", "d", batch_size=16)
    pointers = [t.data_ptr() for t in evaluator.entries.values()]
    path = LinearPath(evaluator, a, b, bn_reset=True)
    for alpha in (0.0, 0.25, 0.5, 1.0):
        path.evaluate_at(alpha, "train")
        assert torch.equal(
            model[2].weight.detach(), torch.lerp(a["2.weight"], b["2.weight"], alpha)
        )

    # 64 examples in batches of 16: four calls per point, on the same weights and kept inputs.
    assert len(model.calls) == 4 * 4
    assert all(inference for inference, _, _ in model.calls)
    assert {pointer for _, pointer, _ in model.calls} == {pointers[0]}
    assert len({x for _, _, x in model.calls}) == 4
    assert [t.data_ptr() for t in evaluator.entries.values()] == pointers


def test_batchnorm_statistics_are_recomputed_on_the_train_split(tmp_path: Path):
    torch.manual_seed(2)
    model = conv_bn()
    a_path = saved(model, tmp_path / "a.safetensors")
    data = data_for(model)
    evaluator = Evaluator(conv_bn(), data, "m", "d", batch_size=64)
    a, b = pair_checkpoints(a_path, a_path)
    LinearPath(evaluator, a, b, bn_reset=True).load(0.5)
    # One batch of all 64 examples: the running mean is the batch mean of the first conv.
    x, _ = data.splits["train"]
    with torch.no_grad():
        expected = evaluator.model[0](x).mean(dim=(0, 2, 3))
    assert torch.allclose(evaluator.model[1].running_mean, expected, atol=1e-6)


def test_batchnorm_reset_needs_a_train_split(tmp_path: Path):
    model = conv_bn()
    a_path = saved(model, tmp_path / "a.safetensors")
    data = data_for(model)
    data.splits = {"test": data.splits["test"]}
    evaluator = Evaluator(conv_bn(), data, "m", "the data")
    with pytest.raises(EvaluationError, match=r"needs a 'train' split.*--no-bn-reset"):
        linear_mode_connectivity(a_path, a_path, evaluator, split="test")
    report = linear_mode_connectivity(a_path, a_path, evaluator, split="test", bn_reset=False)
    assert report.loss_barrier.height == 0.0


# ---------------------------------------------------------------------------- weight matching


def test_weight_matching_undoes_a_shuffle_of_a_trained_network(tmp_path: Path):
    a_path = PARENT_FINAL
    a, _ = pair_checkpoints(a_path, a_path)
    b = shuffled(a, seed=3)
    b_path = tmp_path / "shuffled.safetensors"
    save_file({name: t.contiguous() for name, t in b.items()}, b_path)

    # The shuffled network computes the same function.
    evaluator = evaluator_for(a_path)
    x, _ = evaluator.data.splits["train"]
    assert torch.allclose(outputs(evaluator.model, a, x), outputs(evaluator.model, b, x), atol=1e-5)

    naive = linear_mode_connectivity(a_path, b_path, evaluator)
    aligned = linear_mode_connectivity(a_path, b_path, evaluator, align="weights")
    assert naive.loss_barrier.height > 0.1
    assert aligned.loss_barrier.height < 1e-5
    assert aligned.moved_units is not None
    assert list(aligned.moved_units) == ["0.weight", "2.weight"]
    assert all(moved > 100 for moved in aligned.moved_units.values())
    # The top directions of A and the shuffled B agree once B's units are put back.
    for layer in aligned.layers:
        assert layer.aligned_agreement == pytest.approx(1.0, abs=1e-4)
    hidden = [layer for layer in naive.layers if layer.layer != "4.weight"]
    assert all((layer.agreement or 0) < 0.5 for layer in hidden)


def test_weight_matching_recovers_a_shuffled_convolution_chain_with_batchnorm():
    torch.manual_seed(4)
    model = conv_bn()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
    a = {name: t.detach().clone() for name, t in model.state_dict().items()}
    b = shuffled(a, seed=5)
    x = torch.randn(10, 3, 4, 4)
    assert torch.allclose(outputs(conv_bn(), a, x), outputs(conv_bn(), b, x), atol=1e-5)

    matching = weight_matching(a, b)
    aligned = permute_units(b, matching)
    for name in a:
        assert torch.equal(aligned[name], a[name]), name
    assert [layer.companions for layer in matching.chain[:2]] == [
        ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"),
        ("3.bias", "4.weight", "4.bias", "4.running_mean", "4.running_var"),
    ]


def test_a_model_that_is_not_a_chain_is_refused():
    state = {"a.weight": torch.zeros(8, 4), "b.weight": torch.zeros(3, 5)}
    with pytest.raises(UsageError, match=r"b.weight takes 5 inputs, not the 8 units of a.weight"):
        unit_chain(state)


class _Residual(nn.Module):
    """Shapes that look like a chain, but a skip connection ties two layers' units together."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        return self.head(h + torch.relu(self.second(h)))


def test_alignment_that_would_change_the_function_is_refused(tmp_path: Path):
    torch.manual_seed(6)
    a_model, b_model = _Residual(), _Residual()
    a_path = saved(a_model, tmp_path / "a.safetensors")
    b_path = saved(b_model, tmp_path / "b.safetensors")
    data = EvaluationData({"train": (torch.randn(32, 6), torch.randint(0, 4, (32,)))})
    evaluator = Evaluator(_Residual(), data, "m", "d")
    with pytest.raises(EvaluationError, match="changed what B computes"):
        linear_mode_connectivity(a_path, b_path, evaluator, align="weights")


@dataclass
class _Output:
    """Like a Hugging Face ModelOutput without the mapping: a dataclass of optional tensors."""

    loss: torch.Tensor | None
    logits: torch.Tensor


_WRAPPERS = {
    "dict": lambda logits: {"logits": logits},
    "tuple": lambda logits: (None, [logits]),
    "dataclass": lambda logits: _Output(None, logits),
}


def _logits(outputs) -> torch.Tensor:
    found = first_tensor(outputs)
    assert found is not None
    return found


class _Wrapped(nn.Module):
    """A model whose output is a dict, a nested tuple or a dataclass holding the logits."""

    def __init__(self, inner: nn.Module, wrap: str) -> None:
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x: torch.Tensor):
        return _WRAPPERS[self.wrap](self.inner(x))


def _structured_data(n: int = 32, seed: int = 0) -> EvaluationData:
    generator = torch.Generator().manual_seed(seed)
    splits = {"train": (torch.randn(n, 6, generator=generator), torch.randint(0, 4, (n,)))}
    return EvaluationData(
        splits,
        loss_fn=lambda out, y: nn.functional.cross_entropy(_logits(out), y),
        error_fn=lambda out, y: (_logits(out).argmax(-1) != y).double().mean(),
    )


@pytest.mark.parametrize("wrap", sorted(_WRAPPERS))
def test_the_alignment_check_finds_the_output_tensor_in_any_structure(tmp_path, wrap):
    torch.manual_seed(11)
    chain_a = saved(_Wrapped(mlp(), wrap), tmp_path / "chain_a.safetensors")
    chain_b = saved(_Wrapped(mlp(), wrap), tmp_path / "chain_b.safetensors")
    evaluator = Evaluator(_Wrapped(mlp(), wrap), _structured_data(), "m", "d")
    report = linear_mode_connectivity(chain_a, chain_b, evaluator, align="weights", points=3)
    assert report.moved_units is not None

    residual_a = saved(_Wrapped(_Residual(), wrap), tmp_path / "residual_a.safetensors")
    residual_b = saved(_Wrapped(_Residual(), wrap), tmp_path / "residual_b.safetensors")
    evaluator = Evaluator(_Wrapped(_Residual(), wrap), _structured_data(), "m", "d")
    with pytest.raises(EvaluationError, match="changed what B computes"):
        linear_mode_connectivity(residual_a, residual_b, evaluator, align="weights")


def test_the_alignment_check_reads_every_batch(tmp_path: Path):
    torch.manual_seed(12)
    models = [_Residual(), _Residual()]
    for model in models:
        with torch.no_grad():
            model.first.bias.zero_()
            model.second.bias.zero_()
    a_path, b_path = (
        saved(m, tmp_path / f"{n}.safetensors") for m, n in zip(models, "ab", strict=True)
    )
    # A first batch of zeros reaches only the output bias, which no permutation touches.
    x = torch.cat([torch.zeros(16, 6), torch.randn(16, 6)])
    data = EvaluationData({"train": (x, torch.randint(0, 4, (32,)))})
    evaluator = Evaluator(_Residual(), data, "m", "d", batch_size=16)
    with pytest.raises(EvaluationError, match=r"changed what B computes \(batch 1 of split"):
        linear_mode_connectivity(a_path, b_path, evaluator, align="weights")


class _Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = mlp()

    def forward(self, x: torch.Tensor) -> float:
        return float(self.inner(x).sum())


def test_alignment_is_refused_when_the_output_holds_no_tensor(tmp_path: Path):
    a_path = saved(_Scalar(), tmp_path / "a.safetensors")
    b_path = saved(_Scalar(), tmp_path / "b.safetensors")
    data = EvaluationData(
        {"train": (torch.randn(8, 6), torch.zeros(8))}, loss_fn=lambda out, y: out, error_fn=None
    )
    evaluator = Evaluator(_Scalar(), data, "m", "d")
    with pytest.raises(EvaluationError, match="holds no tensor to compare; use --align none"):
        linear_mode_connectivity(a_path, b_path, evaluator, align="weights")
    assert linear_mode_connectivity(a_path, b_path, evaluator, points=2).error is None


# ---------------------------------------------------------------------------- the samples


def test_siblings_spawned_later_agree_more_and_strangers_have_a_barrier():
    """The paper's effect on the shipped spawn runs (numbers in sample_checkpoints/README.md)."""
    evaluator = evaluator_for(PARENT_FINAL)
    agreement, barrier = {}, {}
    for step in ("0000", "0250", "1000", "2000"):
        pair = SPAWN / f"spawn-{step}"
        report = linear_mode_connectivity(
            pair / "child-a" / FINAL, pair / "child-b" / FINAL, evaluator
        )
        agreement[step] = {row.layer: row.agreement for row in report.layers}
        barrier[step] = report.loss_barrier.height
    stranger = linear_mode_connectivity(
        SPAWN / "spawn-2000" / "child-a" / FINAL,
        SPAWN / "stranger" / "spawn-2000" / "child-a" / FINAL,
        evaluator,
    )

    for layer in ("0.weight", "2.weight", "4.weight"):
        scores = [agreement[step][layer] for step in ("0000", "0250", "1000", "2000")]
        assert scores == sorted(scores), layer
    assert agreement["0000"]["0.weight"] < 0.85 and agreement["2000"]["0.weight"] > 0.99
    assert all(score > 0.95 for score in agreement["2000"].values())
    assert all(abs(height) < 0.01 for height in barrier.values())

    assert stranger.loss_barrier.height > 0.3
    assert stranger.loss_barrier.alpha == 0.5
    assert all((row.agreement or 1) < 0.2 for row in stranger.layers)


def test_agreement_comes_from_a_store_that_holds_both_checkpoints(tmp_path: Path):
    from spectrum_cli.analysis import analyze

    store = tmp_path / "spectra.zarr"
    analyze(SPAWN / "spawn-2000", store, top_k=10, workers=1)
    a, b = SPAWN / "spawn-2000" / "child-a" / FINAL, SPAWN / "spawn-2000" / "child-b" / FINAL
    evaluator = evaluator_for(a, max_examples=100)
    stored = linear_mode_connectivity(a, b, evaluator, points=2, store=store)
    computed = linear_mode_connectivity(a, b, evaluator, points=2, store=tmp_path / "none.zarr")
    assert stored.spectra == f"store {store}"
    assert computed.spectra == "decomposed"
    for left, right in zip(stored.layers, computed.layers, strict=True):
        assert left.agreement == pytest.approx(right.agreement, abs=1e-5)
    # A checkpoint the store does not hold is decomposed.
    other = SPAWN / "spawn-1000" / "child-a" / FINAL
    assert linear_mode_connectivity(a, other, evaluator, points=2, store=store).spectra == (
        "decomposed"
    )


def test_stored_vectors_are_read_one_row_per_layer(tmp_path: Path, monkeypatch):
    from spectrum_cli.analysis import analyze
    from spectrum_cli.lmc import stored_vectors
    from spectrum_cli.store import Store

    store_path = tmp_path / "spectra.zarr"
    analyze(SPAWN / "spawn-2000" / "child-a", store_path, top_k=10, workers=1)
    store = Store.open(store_path)
    (run,) = store.runs()
    steps = store.done_steps(run)
    assert len(steps) == 3
    every = {layer: store.read(run, layer, ("u", "v")) for layer in store.layers(run)}

    read = Store.read
    rows_read = []

    def counting(self, *args, **kwargs):
        rows = read(self, *args, **kwargs)
        rows_read.append(len(rows.u))
        return rows

    monkeypatch.setattr(Store, "read", counting)
    vectors = stored_vectors(store, run, steps[1])
    assert rows_read == [1, 1, 1]
    for layer, (u, v) in vectors.items():
        assert np.array_equal(u, every[layer].u[1]) and np.array_equal(v, every[layer].v[1])
    assert stored_vectors(store, run, 12345) == {}


def test_stored_vectors_are_used_only_where_they_are_the_matrix_singular_pairs():
    torch.manual_seed(10)
    tensors = {name: t.detach() for name, t in mlp().state_dict().items()}
    computed = top_vectors(tensors)
    other = top_vectors({name: t.detach() for name, t in mlp().state_dict().items()})
    known = {
        "0.weight": computed["0.weight"],  # the same matrix: used
        "2.weight": other["2.weight"],  # another matrix of that shape (a checkpoint since changed)
        "4.weight": tuple(x[:, :2] for x in computed["4.weight"]),  # fewer than 10 directions
    }
    vectors = top_vectors(tensors, known)
    assert vectors["0.weight"] is known["0.weight"]
    for layer in ("2.weight", "4.weight"):
        assert vectors[layer] is not known[layer]
        assert np.allclose(vectors[layer][0], computed[layer][0])
        assert vectors[layer][0].shape[1] == min(10, *tensors[layer].shape)


def test_the_figure_draws_each_curve_its_line_its_barrier_and_the_layer_scores():
    from spectrum_cli.plots import interpolation_figure

    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    loss = [1.0, 2.5, 3.0, 2.5, 2.0]
    barrier = interpolation_barrier(alphas, loss)
    figure = interpolation_figure(
        "A → B",
        alphas,
        {"loss": loss},
        {"loss": (barrier.height, barrier.alpha)},
        [("0.weight", 0.3, 0.9), ("2.weight", None, 0.8)],
    )
    curve, layers = figure.axes
    drawn, line = curve.lines[:2]
    assert list(drawn.get_ydata()) == loss
    assert list(line.get_ydata()) == [1.0, 1.25, 1.5, 1.75, 2.0]
    (segment,) = curve.collections[0].get_segments()
    assert segment.tolist() == [[0.5, 1.5], [0.5, 3.0]]  # from the line up to the peak
    widths = [bar.get_width() for bar in layers.patches]
    assert widths[0] == 0.3 and np.isnan(widths[1]) and widths[2:] == [0.9, 0.8]


# ---------------------------------------------------------------------------- the command line


def test_lmc_command_on_samples_needs_no_flags(tmp_path: Path):
    a = SPAWN / "spawn-2000" / "child-a" / FINAL
    b = SPAWN / "stranger" / "spawn-2000" / "child-a" / FINAL
    plot = tmp_path / "curve.png"
    result = run_cli("lmc", a, b, "--alphas", "5", "--format", "json", "--plot", plot)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert report["loss_barrier"]["height"] > 0.3
    assert report["loss_barrier"]["alpha"] == 0.5
    assert [row["layer"] for row in report["layers"]] == ["0.weight", "2.weight", "4.weight"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in result.stderr and "wrote" not in result.stdout


def test_lmc_command_measures_the_split_and_examples_asked_for():
    a, b = SPAWN / "spawn-1000" / "child-a" / FINAL, SPAWN / "spawn-1000" / "child-b" / FINAL
    result = run_cli(
        "lmc", a, b, "--split", "val", "--max-examples", "50", "--alphas", "3", "--format", "json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["split"] == "val" and report["examples"] == 50
    assert len(report["loss"]) == len(report["error"]) == 3

    csv = run_cli("lmc", a, b, "--alphas", "3", "--max-examples", "50", "--format", "csv")
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.splitlines()
    assert lines[0] == "alpha,loss,error" and len(lines) == 4
    assert lines[2].startswith("0.5,")


def test_lmc_command_with_user_model_and_data(tmp_path: Path):
    code = tmp_path / "task.py"
    code.write_text(
        "import torch\nfrom torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),"
        " nn.Linear(16, 4))\n\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return {'train': (torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,),"
        " generator=g))}\n"
    )
    torch.manual_seed(7)
    a_path = saved(mlp(), tmp_path / "a.safetensors")
    b_path = saved(mlp(), tmp_path / "b.safetensors")
    result = run_cli(
        "lmc", a_path, b_path, "--model", f"{code}:build", "--data", f"{code}:data",
        "--align", "weights", "--alphas", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for words in ("barrier", "aligned", "no BatchNorm", "align weights"):
        assert words in result.stdout


def test_lmc_command_errors_are_one_line(tmp_path: Path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2, 2)}, plain)
    result = run_cli("lmc", plain, plain)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "--model module:callable" in result.stderr

    result = run_cli("lmc", plain, plain, "--model", "nowhere_module_xyz:build", "--data", "x:y")
    assert result.returncode == 2
    assert "--model nowhere_module_xyz:build: no module named" in result.stderr
    assert result.stderr.count("\n") == 1

    other = SAMPLES / "modadd-wd" / "step_003000.safetensors"
    result = run_cli("lmc", PARENT_FINAL, other)
    assert result.returncode == 2 and result.stdout == ""
    assert "do not pair by layer: shapes differ: 0.weight (128, 64) vs (128, 118)" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_pickled_checkpoint_runs_no_code(tmp_path: Path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    code = tmp_path / "task.py"
    code.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n    return nn.Linear(2, 2)\n"
        "def data():\n    return {'train': (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))}\n"
    )
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "extra": Payload()}, evil)
    result = run_cli("lmc", evil, evil, "--model", f"{code}:build", "--data", f"{code}:data")
    assert not marker.exists()
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "evil.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_the_evaluation_commands_quickly():
    result = run_cli("--help")
    assert "lmc" in result.stdout and "prune-eval" in result.stdout
    result = run_cli("lmc", "--help")
    for flag in ("--model", "--data", "--alphas", "--split", "--max-examples", "--no-bn-reset"):
        assert flag in result.stdout


TASK = """
import torch
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def conv_bn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )


def vectors():
    g = torch.Generator().manual_seed(0)
    return {"train": (torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g))}


def images():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 4, 4, generator=g), torch.randint(0, 5, (48,), generator=g)
    return {"train": (x, y), "test": (x[:24] + 0.5, y[:24])}


class Undefined:
    splits = vectors()
    error_fn = None

    @staticmethod
    def loss_fn(outputs, targets):
        return torch.tensor(float("nan"))
"""


def _task(tmp_path: Path) -> Path:
    code = tmp_path / "task.py"
    code.write_text(TASK)
    return code


def _json(text: str):
    """Parse JSON as strictly as other tools do: NaN and Infinity are not JSON."""

    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def test_lmc_command_recomputes_batchnorm_statistics_unless_told_not_to(tmp_path: Path):
    code = _task(tmp_path)
    torch.manual_seed(13)
    models = [conv_bn(), conv_bn()]
    for model in models:
        with torch.no_grad():
            for bn in (model[1], model[4]):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    a, b = (saved(m, tmp_path / f"{n}.safetensors") for m, n in zip(models, "ab", strict=True))
    flags = ("--model", f"{code}:conv_bn", "--data", f"{code}:images", "--split", "test")

    # A against B: recomputing the statistics changes every point, the ends included.
    curves = {}
    for reset in ("--bn-reset", "--no-bn-reset"):
        result = run_cli("lmc", a, b, *flags, reset, "--alphas", "3", "--format", "json")
        assert result.returncode == 0, result.stderr
        report = _json(result.stdout)
        assert report["batchnorm"] and report["bn_reset"] == (reset == "--bn-reset")
        curves[reset] = report["loss"]
    assert all(
        abs(x - y) > 1e-4
        for x, y in zip(curves["--bn-reset"], curves["--no-bn-reset"], strict=True)
    )

    # A against itself: no barrier either way, and so no α where it peaks.
    same = run_cli("lmc", a, a, *flags, "--alphas", "5", "--format", "json")
    assert same.returncode == 0, same.stderr
    report = _json(same.stdout)
    assert len(set(report["loss"])) == 1
    for name in ("loss_barrier", "error_barrier"):
        assert report[name] == {
            "height": 0.0, "alpha": None, "height_over_mean": 0.0, "alpha_over_mean": None
        }  # fmt: skip
    table = run_cli("lmc", a, a, *flags, "--no-bn-reset", "--alphas", "5")
    assert table.returncode == 0, table.stderr
    assert "BatchNorm statistics interpolated" in table.stdout
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in table.stdout.splitlines()]
    assert ["loss", "0.0000", "", "0.0000", ""] in cells  # the barrier row, no α


def test_lmc_command_aligns_a_shuffled_copy_to_no_barrier(tmp_path: Path):
    a, _ = pair_checkpoints(PARENT_FINAL, PARENT_FINAL)
    b_path = tmp_path / "shuffled.safetensors"
    save_file({name: t.contiguous() for name, t in shuffled(a, seed=7).items()}, b_path)
    result = run_cli("lmc", PARENT_FINAL, b_path, "--align", "weights", "--format", "json")
    assert result.returncode == 0, result.stderr
    report = _json(result.stdout)
    assert report["align"] == "weights"
    assert report["loss_barrier"]["height"] < 1e-5
    assert report["error_barrier"]["height"] < 1e-9
    assert all(moved > 100 for moved in report["moved_units"].values())
    assert all(row["aligned_agreement"] > 0.9999 for row in report["layers"])


def test_lmc_command_refuses_non_finite_weights_and_writes_no_nan(tmp_path: Path):
    code = _task(tmp_path)
    torch.manual_seed(14)
    a = saved(mlp(), tmp_path / "a.safetensors")
    state = {name: t.detach().clone() for name, t in mlp().state_dict().items()}
    state["2.weight"][5, 5] = float("nan")
    b = tmp_path / "b.safetensors"
    save_file(state, b)
    flags = ("--model", f"{code}:mlp", "--format", "json")
    result = run_cli("lmc", a, b, *flags, "--data", f"{code}:vectors")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"B ({b}) in 2.weight (1 of 256)" in " ".join(result.stderr.split())

    # Finite weights whose loss is undefined: null in JSON, never NaN.
    result = run_cli("lmc", a, a, *flags, "--data", f"{code}:Undefined", "--alphas", "3")
    assert result.returncode == 0, result.stderr
    report = _json(result.stdout)
    assert report["loss"] == [None, None, None] and report["error"] is None
    assert report["loss_barrier"]["height"] is None and report["loss_barrier"]["alpha"] is None


def test_lmc_command_imports_a_module_from_the_current_directory(tmp_path: Path):
    _task(tmp_path)
    torch.manual_seed(15)
    a = saved(mlp(), tmp_path / "a.safetensors")
    b = saved(mlp(), tmp_path / "b.safetensors")
    spectrum = Path(sys.executable).with_name("spectrum")  # the installed command, not python -m
    result = subprocess.run(
        [spectrum, "lmc", a.name, b.name, "--model", "task:mlp", "--data", "task:vectors",
         "--alphas", "2", "--format", "json"],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _json(result.stdout)["model"] == "--model task:mlp"
