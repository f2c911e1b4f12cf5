"""Discovery of runs and checkpoints, and safe, lazy loading of their weights."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from spectrum_cli.checkpoints import (
    Checkpoint,
    discover,
    in_model_order,
    load_tensors,
    load_with_masks,
    normalise_name,
    read_metadata,
    step_from_name,
)
from spectrum_cli.errors import CheckpointError, UsageError


def _weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> OrderedDict[str, torch.Tensor]:
    """A tiny state dict whose key order is not alphabetical."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"fc2.weight": (2, 4), "fc1.weight": (4, 3), "fc1.bias": (4,)}
    return OrderedDict(
        (key, torch.randn(shape, generator=generator).to(dtype)) for key, shape in shapes.items()
    )


def _touch_weights(path: Path, seed: int = 0, **metadata: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(dict(_weights(seed)), path, metadata=metadata or None)
    else:
        torch.save(_weights(seed), path)


def _assert_same(loaded: list[tuple[str, torch.Tensor]], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(name for name, _ in loaded) == sorted(expected)
    for name, tensor in loaded:
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor, expected[name])


# Layouts: each builds checkpoints under a root and returns the (run, step, path) expected.


def _flat(root: Path) -> list[tuple[str, int, str]]:
    for step in (100, 200):
        _touch_weights(root / "a" / f"step_{step}.pt", seed=step)
    return [("a", 100, "a/step_100.pt"), ("a", 200, "a/step_200.pt")]


def _hf_single(root: Path) -> list[tuple[str, int, str]]:
    checkpoint = root / "run" / "checkpoint-500"
    _touch_weights(checkpoint / "model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"state": {}}, checkpoint / name)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 500}')
    return [("run", 500, "run/checkpoint-500")]


def _hf_sharded(root: Path) -> list[tuple[str, int, str]]:
    checkpoint = root / "run" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    weights = _weights()
    shards = {"model-00001-of-00002.safetensors": ["fc2.weight"]}
    shards["model-00002-of-00002.safetensors"] = ["fc1.weight", "fc1.bias"]
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, checkpoint / shard)
    weight_map = {key: shard for shard, keys in shards.items() for key in keys}
    index = {"metadata": {}, "weight_map": weight_map}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    return [("run", 10, "run/checkpoint-10")]


def _hf_bin(root: Path) -> list[tuple[str, int, str]]:
    _touch_weights(root / "run" / "checkpoint-20" / "pytorch_model.bin")
    return [("run", 20, "run/checkpoint-20")]


def _hf_shards_without_index(root: Path) -> list[tuple[str, int, str]]:
    _hf_sharded(root)
    (root / "run" / "checkpoint-10" / "model.safetensors.index.json").unlink()
    return [("run", 10, "run/checkpoint-10")]


def _lightning(root: Path) -> list[tuple[str, int, str]]:
    run = root / "lit"
    run.mkdir()
    for epoch, step in ((0, 100), (1, 200)):
        state = OrderedDict((f"model.{key}", value) for key, value in _weights().items())
        lightning = {"state_dict": state, "global_step": step, "pytorch-lightning_version": "2.4"}
        lightning |= {"optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2, 4)}}}]}
        torch.save(lightning, run / f"epoch={epoch}-step={step}.ckpt")
    torch.save(lightning, run / "last.ckpt")
    torch.save(lightning, run / "last-v1.ckpt")
    return [("lit", 100, "lit/epoch=0-step=100.ckpt"), ("lit", 200, "lit/epoch=1-step=200.ckpt")]


def _nested(root: Path) -> list[tuple[str, int, str]]:
    _touch_weights(root / "sweep" / "lr1" / "step_1.pt")
    _touch_weights(root / "sweep" / "lr2" / "step_1.safetensors")
    _touch_weights(root / "step_5.pt")
    return [
        (root.name, 5, "step_5.pt"),
        ("sweep/lr1", 1, "sweep/lr1/step_1.pt"),
        ("sweep/lr2", 1, "sweep/lr2/step_1.safetensors"),
    ]


def _deepspeed(root: Path) -> list[tuple[str, int, str]]:
    step_dir = root / "ds" / "global_step300"
    step_dir.mkdir(parents=True)
    torch.save({"module": _weights(), "optimizer": None}, step_dir / "mp_rank_00_model_states.pt")
    torch.save({"state": {}}, step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return [("ds", 300, "ds/global_step300/mp_rank_00_model_states.pt")]


@pytest.mark.parametrize(
    "layout",
    [
        _flat,
        _hf_single,
        _hf_sharded,
        _hf_shards_without_index,
        _hf_bin,
        _lightning,
        _nested,
        _deepspeed,
    ],
)
def test_discover_and_load_each_layout(tmp_path: Path, layout: Callable) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    expected = layout(root)

    found = discover(root)

    assert found.checkpoints == sorted(Checkpoint(r, s, root / p) for r, s, p in expected)
    for checkpoint in found.checkpoints:
        assert checkpoint.path.is_absolute()
        loaded = list(load_tensors(checkpoint.path))
        assert [name for name, _ in loaded if name.startswith("fc")] == [n for n, _ in loaded]
        _assert_same(loaded, _weights(seed=checkpoint.step if layout is _flat else 0))


def test_discover_notes_skipped_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _touch_weights(run / "step_1.pt")
    for name in ("optimizer.pt", "optim_states_1.pt", "rng_state_0.pth", "scheduler.pt"):
        torch.save({}, run / name)
    torch.save({}, run / "scaler.pt")
    (run / "config.json").write_text("{}")
    _lightning(tmp_path)

    found = discover(tmp_path)

    assert {(c.run, c.step) for c in found.checkpoints} == {("run", 1), ("lit", 100), ("lit", 200)}
    skipped = "\n".join(found.notes)
    for name in ("optimizer.pt", "optim_states_1.pt", "rng_state_0.pth", "scheduler.pt"):
        assert f"skipped run/{name}" in skipped
    assert "skipped lit/last.ckpt" in skipped and "skipped lit/last-v1.ckpt" in skipped
    assert "config.json" not in skipped


def test_duplicate_steps_keep_one_deterministically(tmp_path: Path) -> None:
    for name in ("step_100.pt", "model_100.pt", "step_100.safetensors", "step_200.pt"):
        _touch_weights(tmp_path / "run" / name)

    found = discover(tmp_path)

    assert [c.path.name for c in found.checkpoints] == ["step_100.safetensors", "step_200.pt"]
    (note,) = [note for note in found.notes if "claim step 100" in note]
    assert "run run" in note and "kept step_100.safetensors" in note
    assert "model_100.pt" in note and "step_100.pt" in note


def test_file_without_step_is_skipped_with_the_fix(tmp_path: Path) -> None:
    _touch_weights(tmp_path / "run" / "final.pt")
    _touch_weights(tmp_path / "run" / "step_3.pt")

    found = discover(tmp_path)

    assert [c.step for c in found.checkpoints] == [3]
    assert any("final.pt" in note and "step_100.pt" in note for note in found.notes)


def test_unreadable_file_without_step_is_a_note_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.pt").write_bytes(b"garbage")
    _touch_weights(tmp_path / "run" / "step_3.pt")

    found = discover(tmp_path)

    assert [c.step for c in found.checkpoints] == [3]
    assert any(note.startswith("skipped final.pt in run run: cannot") for note in found.notes)


def _lightning_without_step_name(path: Path) -> None:
    torch.save({"state_dict": _weights(), "global_step": 42, "epoch": 1}, path / "best.ckpt")


def _safetensors_step(path: Path) -> None:
    _touch_weights(path / "final.safetensors", step="42")


def _spectrum_step(path: Path) -> None:
    _touch_weights(path / "final.safetensors", spectrum=json.dumps({"step": 42, "task": "x"}))


def _trainer_state(path: Path) -> None:
    _touch_weights(path / "final" / "model.safetensors")
    (path / "final" / "trainer_state.json").write_text(json.dumps({"global_step": 42}))


@pytest.mark.parametrize(
    "make", [_lightning_without_step_name, _safetensors_step, _spectrum_step, _trainer_state]
)
def test_step_from_metadata_when_name_has_none(tmp_path: Path, make: Callable) -> None:
    run = tmp_path / "run"
    run.mkdir()
    make(run)

    (checkpoint,) = discover(tmp_path).checkpoints

    assert (checkpoint.run, checkpoint.step) == ("run", 42)


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("step_1200.pt", 1200),
        ("step-1200", 1200),
        ("checkpoint-500", 500),
        ("epoch=3-step=900.ckpt", 900),
        ("epoch=3-step=900-v1.ckpt", 900),
        ("ckpt_epoch_7.pth", 7),
        ("checkpoint-50.pt", 50),
        ("model_0003.safetensors", 3),
        ("iter_000400.pt", 400),
        ("global_step1200", 1200),
        ("model_fp16_step_5.safetensors", 5),
        ("bf16-00012.pt", 12),
        ("000400.safetensors", 400),
        ("checkpoint_3_500.pt", 500),
        ("epoch=3-v1.ckpt", 3),
        ("resnet50_epoch_3.pt", 3),
        ("final.pt", None),
        ("model.safetensors", None),
        # A number in a model's name is no step, nor is a negative one.
        ("resnet50.pt", None),
        ("gpt2-medium.safetensors", None),
        ("llama-3-8b.safetensors", None),
        ("model_v2.pt", None),
        ("step_-5.safetensors", None),
        ("step=-5.ckpt", None),
        ("-5.pt", None),
    ],
)
def test_step_from_name(name: str, step: int | None) -> None:
    assert step_from_name(name) == step


def test_names_without_a_step_are_skipped_with_the_reason(tmp_path: Path) -> None:
    for name in ("resnet50.pt", "step_-5.safetensors", "step_3.pt"):
        _touch_weights(tmp_path / "run" / name)

    found = discover(tmp_path)

    assert [c.path.name for c in found.checkpoints] == ["step_3.pt"]
    notes = "\n".join(found.notes)
    assert "skipped resnet50.pt in run run: no step in its name and none in its metadata" in notes
    assert "skipped step_-5.safetensors in run run: a negative step in its name" in notes
    assert "rename it with its step, e.g. step_100.safetensors" in notes


def test_a_broken_link_or_a_fifo_named_as_a_checkpoint_gets_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _touch_weights(run / "step_1.pt")
    (run / "step_3.pt").symlink_to(tmp_path / "gone.pt")
    os.mkfifo(run / "step_5.pt")  # opening it would wait for a writer: it must never be opened

    found = discover(tmp_path)

    assert [c.step for c in found.checkpoints] == [1]
    notes = "\n".join(found.notes)
    assert f"skipped run/step_3.pt: a broken symbolic link (to {tmp_path / 'gone.pt'})" in notes
    assert "skipped run/step_5.pt: not a regular file (a FIFO, socket or device)" in notes


@given(
    step=st.integers(min_value=0, max_value=10**9),
    template=st.sampled_from(["step_{}.pt", "epoch=2-step={}.ckpt", "global_step{}", "ckpt-{}"]),
)
def test_step_from_name_reads_back_any_step(step: int, template: str) -> None:
    assert step_from_name(template.format(step)) == step


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.module.fc.weight", "fc.weight"),
        ("model.fc.weight", "model.fc.weight"),
        ("encoder.module.fc.weight", "encoder.module.fc.weight"),
    ],
)
def test_normalise_name(key: str, name: str) -> None:
    assert normalise_name(key) == name


def test_single_file_root_is_one_checkpoint(tmp_path: Path) -> None:
    _touch_weights(tmp_path / "final.safetensors")
    _touch_weights(tmp_path / "step_7.pt")

    (unnumbered,) = discover(tmp_path / "final.safetensors").checkpoints
    (numbered,) = discover(tmp_path / "step_7.pt").checkpoints

    # A model without a step is a run of its own; one step belongs to its folder's run.
    assert unnumbered == Checkpoint("final", 0, tmp_path / "final.safetensors")
    assert numbered == Checkpoint(tmp_path.name, 7, tmp_path / "step_7.pt")


def test_checkpoint_directory_root_is_one_checkpoint(tmp_path: Path) -> None:
    _hf_single(tmp_path)

    (checkpoint,) = discover(tmp_path / "run" / "checkpoint-500").checkpoints

    assert checkpoint == Checkpoint("run", 500, tmp_path / "run" / "checkpoint-500")


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"hello", "neither a zip archive nor a pickle"),
        (b"\x80\x02he", "the unpickler stopped: KeyError"),
    ],
)
def test_a_lone_unreadable_file_stops_with_why(tmp_path: Path, content: bytes, why: str) -> None:
    lone = tmp_path / "final.pt"
    lone.write_bytes(content)

    with pytest.raises(UsageError, match=f"cannot read {lone} as a torch.save checkpoint.*{why}"):
        discover(lone)

    # Among others, with a step in its name, it is a checkpoint that fails when read.
    named = tmp_path / "run" / "step_3.pt"
    named.parent.mkdir()
    named.write_bytes(content)
    (checkpoint,) = discover(tmp_path / "run").checkpoints
    with pytest.raises(CheckpointError, match=why):
        list(load_tensors(checkpoint.path))


def test_missing_or_empty_root_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        discover(tmp_path / "nowhere")
    torch.save({}, tmp_path / "optimizer.pt")
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(UsageError, match=r"no checkpoint under .*\.safetensors.*optimizer\.pt"):
        discover(tmp_path)
    with pytest.raises(UsageError, match="no checkpoint"):
        discover(tmp_path / "notes.txt")


def test_discovery_of_a_thousand_files_reads_no_file(tmp_path: Path) -> None:
    for run in range(10):
        for step in range(100):
            (tmp_path / f"run{run}").mkdir(exist_ok=True)
            (tmp_path / f"run{run}" / f"step_{step}.pt").write_bytes(b"not read")

    start = time.perf_counter()
    found = discover(tmp_path)

    assert time.perf_counter() - start < 0.5
    assert len(found.checkpoints) == 1000


_OPTIMIZER = {"state": {0: {"momentum_buffer": torch.ones(2, 4)}}, "param_groups": [{"lr": 0.1}]}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda w: w,
        lambda w: {"state_dict": w, "epoch": 3},
        lambda w: {"epoch": 3, "model_state": w, "optimizer_state": _OPTIMIZER},
        lambda w: {"model_state_dict": w, "optimizer_state_dict": _OPTIMIZER},
        lambda w: {"model": w, "optimizer": _OPTIMIZER, "lr_scheduler": {"step": 3}},
        lambda w: {"module": w},
        lambda w: {"net": w, "optimizer_states": [_OPTIMIZER]},
        lambda w: {"network": w, "scheduler": {"last_epoch": torch.tensor(3)}},
        lambda w: {"model": {"state_dict": w}, "step": 3},
        lambda w: OrderedDict((f"module._orig_mod.{key}", value) for key, value in w.items()),
        lambda w: {"state_dict": {f"_orig_mod.{key}": value for key, value in w.items()}},
    ],
)
def test_load_unwraps_containers_and_prefixes(tmp_path: Path, wrap: Callable) -> None:
    torch.save(wrap(_weights()), tmp_path / "step_1.pt")

    loaded = list(load_tensors(tmp_path / "step_1.pt"))

    assert [name for name, _ in loaded] == list(_weights())
    _assert_same(loaded, _weights())


def _adam_state() -> dict:
    """The state of an Adam optimizer that has taken one step: moments per parameter."""
    model = torch.nn.Linear(3, 4)
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    adam.step()
    return adam.state_dict()


@pytest.mark.parametrize(
    ("wrap", "prefix"),
    [
        (lambda w, opt: {"generator": w, "g_opt": opt}, "generator."),
        (lambda w, opt: {**w, "adam": opt}, ""),
        (lambda w, opt: {"weights": w, "extras": {"inner": opt, "lr": 0.1}}, "weights."),
    ],
    ids=["gan", "beside-the-weights", "nested"],
)
def test_optimizer_state_under_any_key_is_not_decomposed(
    tmp_path: Path, wrap: Callable, prefix: str
) -> None:
    torch.save(wrap(_weights(), _adam_state()), tmp_path / "gan_step_1.pt")

    loaded = list(load_tensors(tmp_path / "gan_step_1.pt"))

    assert [name for name, _ in loaded] == [prefix + key for key in _weights()]


def test_a_file_of_optimizer_state_alone_says_so(tmp_path: Path) -> None:
    torch.save(_adam_state(), tmp_path / "step_1.pt")

    with pytest.raises(CheckpointError, match="holds an optimizer's state, not model weights"):
        list(load_tensors(tmp_path / "step_1.pt"))


def test_nested_state_dicts_are_flattened(tmp_path: Path) -> None:
    nested = {"encoder": {"fc": {"weight": torch.ones(2, 2)}}, "head.weight": torch.zeros(3, 2)}
    torch.save(nested, tmp_path / "step_1.pt")

    names = [name for name, _ in load_tensors(tmp_path / "step_1.pt")]

    assert names == ["encoder.fc.weight", "head.weight"]


def test_model_prefix_is_stripped_only_from_lightning_checkpoints(tmp_path: Path) -> None:
    hf_style = OrderedDict((f"model.{key}", value) for key, value in _weights().items())
    torch.save({"state_dict": hf_style}, tmp_path / "plain.pt")
    lightning = {"state_dict": hf_style, "global_step": 5, "pytorch-lightning_version": "2.4"}
    torch.save(lightning, tmp_path / "lit.ckpt")

    assert [n for n, _ in load_tensors(tmp_path / "plain.pt")] == list(hf_style)
    assert [n for n, _ in load_tensors(tmp_path / "lit.ckpt")] == list(_weights())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_keeps_dtypes(tmp_path: Path, dtype: torch.dtype, suffix: str) -> None:
    weights = _weights(dtype=dtype)
    path = tmp_path / f"step_1{suffix}"
    save_file(dict(weights), path) if suffix == ".safetensors" else torch.save(weights, path)

    _assert_same(list(load_tensors(path)), weights)


def test_legacy_torch_files_load_without_mmap(tmp_path: Path) -> None:
    torch.save(_weights(), tmp_path / "step_1.pt", _use_new_zipfile_serialization=False)

    loaded = list(load_tensors(tmp_path / "step_1.pt"))

    assert [name for name, _ in loaded] == list(_weights())
    _assert_same(loaded, _weights())


def test_safetensors_order_is_natural_when_the_file_keeps_none(tmp_path: Path) -> None:
    layers = {f"layers.{i}.weight": torch.ones(2, 2) for i in (10, 2, 1)} | {"embed": torch.ones(1)}
    save_file(layers, tmp_path / "step_1.safetensors")

    names = [name for name, _ in load_tensors(tmp_path / "step_1.safetensors")]

    assert names == ["embed", "layers.1.weight", "layers.2.weight", "layers.10.weight"]


def test_only_pickles_keep_the_models_order(tmp_path: Path) -> None:
    layers = {"head.weight": torch.ones(2, 2), "body.weight": torch.ones(2, 2)}
    torch.save(layers, tmp_path / "step_1.pt")
    save_file(layers, tmp_path / "step_1.safetensors")

    assert [name for name, _ in load_tensors(tmp_path / "step_1.pt")] == list(layers)
    assert in_model_order(tmp_path / "step_1.pt")
    assert not in_model_order(tmp_path / "step_1.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_prune_pairs_load_as_the_masked_weight(tmp_path: Path, suffix: str) -> None:
    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    path = tmp_path / f"step_1{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)

    loaded = dict(load_tensors(path))
    paired = {name: (tensor, mask) for name, tensor, mask in load_with_masks(path)}

    assert sorted(loaded) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert torch.equal(loaded["0.weight"], net[0].weight.detach())
    assert int((loaded["0.weight"] == 0).sum()) == 24
    orig, mask = paired["0.weight"]
    assert torch.equal(orig, net[0].weight_orig.detach()) and mask is not None
    assert torch.equal(mask, net[0].weight_mask)
    assert paired["2.weight"][1] is None


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_numpy_reading_gives_the_same_weights_and_names(tmp_path: Path, suffix: str) -> None:
    from torch.nn.utils import prune

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3).half())
    prune.l1_unstructured(net[0], "weight", amount=0.5)
    state = {key: value.detach().clone() for key, value in net.state_dict().items()}
    state["steps"] = torch.arange(3)  # an integer buffer
    path = tmp_path / f"step_1{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, path)

    as_tensors = list(load_tensors(path))
    as_arrays = list(load_tensors(path, numpy=True))

    assert [name for name, _ in as_arrays] == [name for name, _ in as_tensors]
    for (name, tensor), (_, array) in zip(as_tensors, as_arrays, strict=True):
        # safetensors files come as NumPy arrays; torch.save files stay tensors.
        assert isinstance(array, np.ndarray) == (suffix == ".safetensors"), name
        assert str(array.dtype).removeprefix("torch.") == str(tensor.dtype).removeprefix("torch.")
        np.testing.assert_array_equal(np.asarray(array), tensor.numpy(), err_msg=name)


@pytest.mark.parametrize(
    ("tensors", "body", "expected"),
    [
        ({"w": ("F32", [10, 10], [0, 400])}, 100, r"truncated or damaged: .* holds only"),
        ({"w": ("F32", [10, 10], [0, 200])}, 200, "invalid shape, data type, or offset"),
        ({"a": ("F32", [2, 2], [0, 16]), "b": ("F32", [2, 2], [8, 24])}, 24, "invalid offset"),
        ({"w": ("F32", [2, 2], [100, 116])}, 16, "invalid offset"),
        ({"w": ("F32", [2, 2], [0, 16])}, 32, "damaged: 16 bytes follow the"),
    ],
    ids=["short", "shape-and-size-differ", "overlapping", "beyond-the-end", "bytes-left-over"],
)
def test_numpy_reading_refuses_layouts_that_would_read_wrong_bytes(
    tmp_path: Path, tensors: dict[str, tuple[str, list[int], list[int]]], body: int, expected: str
) -> None:
    # The arrays are views of the file's bytes: every tensor must lie where its header says.
    header = {
        key: {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        for key, (dtype, shape, offsets) in tensors.items()
    }
    encoded = json.dumps(header).encode()
    path = tmp_path / "step_1.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(body))

    with pytest.raises(CheckpointError, match=expected):
        list(load_tensors(path, numpy=True))


def test_numpy_reading_leaves_bfloat16_files_to_torch(tmp_path: Path) -> None:
    path = tmp_path / "step_1.safetensors"
    save_file({"fc.weight": torch.randn(4, 3).bfloat16(), "fc.bias": torch.zeros(4)}, path)

    loaded = dict(load_tensors(path, numpy=True))

    assert loaded["fc.weight"].dtype == torch.bfloat16
    assert isinstance(loaded["fc.bias"], torch.Tensor)


def test_a_lone_half_of_a_prune_pair_keeps_its_name(tmp_path: Path) -> None:
    torch.save(
        {"a.weight_orig": torch.ones(2, 2), "b.weight_mask": torch.ones(2, 2)}, tmp_path / "x.pt"
    )

    assert sorted(name for name, _ in load_tensors(tmp_path / "x.pt")) == [
        "a.weight_orig",
        "b.weight_mask",
    ]


def test_prune_pair_halves_of_two_shapes_are_refused(tmp_path: Path) -> None:
    torch.save(
        {"a.weight_orig": torch.ones(2, 3), "a.weight_mask": torch.ones(3, 2)}, tmp_path / "x.pt"
    )

    with pytest.raises(CheckpointError, match=r"'a.weight' has weight shape \(2, 3\) but mask"):
        list(load_tensors(tmp_path / "x.pt"))


def test_files_named_as_masks_are_not_checkpoints(tmp_path: Path) -> None:
    for name in ("step_1.pt", "masked_step_2.pt", "mask.safetensors", "lottery_mask_05.pt"):
        _touch_weights(tmp_path / "run" / name)

    found = discover(tmp_path / "run")

    assert [c.path.name for c in found.checkpoints] == ["step_1.pt", "masked_step_2.pt"]
    notes = "\n".join(found.notes)
    assert "skipped mask.safetensors: a mask by its name" in notes
    assert "skipped lottery_mask_05.pt: a mask by its name" in notes
    assert "rename" not in notes


def test_words_like_optimizer_or_mask_inside_a_models_name_do_not_skip_it(
    tmp_path: Path,
) -> None:
    models = ["upscaler_step_100", "optimized_step_200", "mask_rcnn_step_400", "generator_step_500"]
    state = [
        "optimizer_states",
        "optim_step_1",
        "lr_scheduler",
        "grad_scaler",
        "rng_state_3",
        "training_args",
        "mask_step_7",
        "masks_epoch_2",
    ]
    for stem in models + state:
        _touch_weights(tmp_path / "run" / f"{stem}.safetensors")

    found = discover(tmp_path / "run")

    assert sorted(c.path.stem for c in found.checkpoints) == sorted(models)
    notes = "\n".join(found.notes)
    for stem in state:
        assert f"skipped {stem}.safetensors: " in notes


def test_a_model_under_a_key_with_a_state_word_inside_it_is_read(tmp_path: Path) -> None:
    saved = {"generator": _weights(0), "upscaler": _weights(1), "epoch": 3}
    torch.save(saved | {"grad_scaler": {"scale": torch.ones(1)}}, tmp_path / "step_1.pt")

    loaded = dict(load_tensors(tmp_path / "step_1.pt"))

    expected = {f"{model}.{key}" for model in ("generator", "upscaler") for key in _weights()}
    assert set(loaded) == expected
    assert torch.equal(loaded["upscaler.fc2.weight"], _weights(1)["fc2.weight"])


@pytest.mark.parametrize(
    ("saved", "taken", "left"),
    [
        ({"model": _weights(0), "ema": _weights(1)}, "model", ["ema"]),
        ({"model_state": _weights(0), "teacher": {"net": _weights(1)}}, "model_state", ["teacher"]),
        (
            {"model": {"state_dict": _weights(0), "ema": _weights(1)}},
            "model.state_dict",
            ["model.ema"],
        ),
    ],
)
def test_a_second_model_left_out_is_named_in_a_note(
    tmp_path: Path, saved: dict, taken: str, left: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    torch.save(saved, tmp_path / "step_1.pt")
    notes: list[str] = []

    _assert_same(list(load_tensors(tmp_path / "step_1.pt", notes=notes)), _weights(0))

    (note,) = notes
    assert f"read the weights under {taken!r}; left out the weights under {left[0]!r}" in note
    with caplog.at_level("WARNING", logger="spectrum_cli.checkpoints"):
        list(load_tensors(tmp_path / "step_1.pt"))
    assert note in caplog.text


def test_state_beside_the_model_that_holds_no_weights_gets_no_note(tmp_path: Path) -> None:
    lightning = {
        "state_dict": _weights(),
        "global_step": 5,
        "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5)}},
        "optimizer_states": [_OPTIMIZER],
        "lr_schedulers": [{"last_epoch": 3}],
        "ema_optimizer": _adam_state(),
    }
    torch.save(lightning, tmp_path / "epoch=0-step=5.ckpt")
    notes: list[str] = []

    _assert_same(list(load_tensors(tmp_path / "epoch=0-step=5.ckpt", notes=notes)), _weights())

    assert notes == []


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_weights_are_read_dense(tmp_path: Path) -> None:
    dense = {"coo.weight": torch.randn(6, 6), "csr.weight": torch.randn(4, 5)}
    dense["coo.weight"][dense["coo.weight"] < 0] = 0
    saved = {"coo.weight": dense["coo.weight"].to_sparse(), "csr.weight": dense["csr.weight"]}
    saved["csr.weight"] = saved["csr.weight"].to_sparse_csr()
    torch.save({"state_dict": saved}, tmp_path / "step_1.pt")

    loaded = list(load_tensors(tmp_path / "step_1.pt"))

    assert all(tensor.layout == torch.strided for _, tensor in loaded)
    _assert_same(loaded, dense)


def _raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> Path:
    """Write a safetensors file byte by byte, for dtypes no library here can write."""
    header, offset = {}, 0
    for key, (dtype, shape, data) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    body = b"".join(data for _, _, data in tensors.values())
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    return path


_LOW_BIT = {
    "a.weight": ("F32", [2, 3], np.arange(6, dtype="<f4").tobytes()),
    "b.weight": ("F4", [4, 4], bytes(range(8))),  # 16 values of 4 bits
    "c.weight": ("F6_E2M3", [4, 4], bytes(range(12))),  # 16 values of 6 bits
    "d.weight": ("F16", [3, 2], np.ones(6, dtype="<f2").tobytes()),
}


@pytest.mark.parametrize("numpy", [True, False])
def test_tensors_of_a_dtype_that_cannot_be_read_are_left_out_with_a_note(
    tmp_path: Path, numpy: bool
) -> None:
    path = _raw_safetensors(tmp_path / "step_1.safetensors", _LOW_BIT)
    notes: list[str] = []

    loaded = dict(load_tensors(path, numpy=numpy, notes=notes))

    assert sorted(loaded) == ["a.weight", "d.weight"]
    np.testing.assert_array_equal(np.asarray(loaded["a.weight"]), np.arange(6).reshape(2, 3))
    assert [note.split(": ", 1)[1] for note in notes] == [
        f"left out 1 tensor of dtype {dtype}, which spectrum cannot read ({key}); its other "
        "tensors are read"
        for key, dtype in (("b.weight", "F4"), ("c.weight", "F6_E2M3"))
    ]


def test_a_shard_whose_unreadable_tensor_its_index_names_is_read(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    shard = "model-00001-of-00001.safetensors"
    _raw_safetensors(checkpoint / shard, _LOW_BIT)
    index = {"weight_map": {key: shard for key in _LOW_BIT}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    notes: list[str] = []

    assert sorted(name for name, _ in load_tensors(checkpoint, notes=notes)) == [
        "a.weight",
        "d.weight",
    ]
    assert len(notes) == 2


def test_a_dtype_the_safetensors_library_does_not_know_says_so(tmp_path: Path) -> None:
    path = _raw_safetensors(tmp_path / "step_1.safetensors", {"w": ("F2_E1M0", [4], b"\0")})

    with pytest.raises(CheckpointError, match="has dtype F2_E1M0, which the installed safetensors"):
        list(load_tensors(path))


def test_whole_pickled_module_yields_its_state_dict(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    model.register_buffer("scratch", torch.ones(1), persistent=False)
    torch.save(model, tmp_path / "step_1.pt")

    loaded = list(load_tensors(tmp_path / "step_1.pt"))

    assert [name for name, _ in loaded] == list(model.state_dict())
    _assert_same(loaded, model.state_dict())


def test_lightning_hyper_parameters_holding_a_module_are_inert(tmp_path: Path) -> None:
    lightning = {
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in _weights().items()),
        "global_step": 7,
        "pytorch-lightning_version": "2.4",
        "hyper_parameters": {"loss": torch.nn.CrossEntropyLoss(), "lr": 0.1},
    }
    torch.save(lightning, tmp_path / "epoch=0-step=7.ckpt")

    _assert_same(list(load_tensors(tmp_path / "epoch=0-step=7.ckpt")), _weights())


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_files_saved_from_cuda_tensors_load_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zipped: bool
) -> None:
    # torch.save records where each storage lived; a CUDA tensor's storage says "cuda:0".
    path = tmp_path / "step_1.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(_weights(), path, _use_new_zipfile_serialization=zipped)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)

    loaded = list(load_tensors(path))

    assert all(tensor.device.type == "cpu" for _, tensor in loaded)
    _assert_same(loaded, _weights())


@pytest.mark.parametrize(
    "missing",
    [["safe_globals", "get_unsafe_globals_in_checkpoint"], ["get_unsafe_globals_in_checkpoint"]],
)
def test_without_torchs_inert_loading_weights_still_load_and_the_rest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: list[str]
) -> None:
    # PyTorch before 2.5 has neither safe_globals nor get_unsafe_globals_in_checkpoint.
    for name in missing:
        monkeypatch.delattr(torch.serialization, name)
    torch.save(_weights(), tmp_path / "step_1.pt")
    torch.save(_weights(), tmp_path / "step_2.pt", _use_new_zipfile_serialization=False)
    lightning = {"state_dict": _weights(), "hyper_parameters": {"loss": torch.nn.MSELoss()}}
    torch.save(lightning, tmp_path / "step_3.ckpt")

    for name in ("step_1.pt", "step_2.pt"):
        _assert_same(list(load_tensors(tmp_path / name)), _weights())
    with pytest.raises(CheckpointError, match=r"without running code: it names torch\.nn\."):
        list(load_tensors(tmp_path / "step_3.ckpt"))


class _Payload:
    """Pickles as a call to ``function(argument)``: what a hostile checkpoint would run."""

    def __init__(self, function: Callable, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[Callable, tuple[str]]:
        return self.function, (self.argument,)


def _hostile(marker: Path) -> list[tuple[str, object]]:
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('ran')"
    return [
        ("os.system", _Payload(os.system, touch)),
        ("exec", _Payload(exec, write)),
        ("eval", _Payload(eval, write)),
    ]


@pytest.mark.parametrize("how", ["zip", "legacy", "raw pickle", "discovery"])
def test_a_malicious_pickle_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "ran"
    for label, payload in _hostile(marker):
        path = tmp_path / (f"{label}.pt" if how == "discovery" else f"step_1_{label}.pt")
        obj = {"state_dict": _weights(), "extra": payload}
        if how == "raw pickle":
            path.write_bytes(pickle.dumps(obj, protocol=2))
        else:
            torch.save(obj, path, _use_new_zipfile_serialization=how != "legacy")

        try:
            if how == "discovery":
                discover(path)
            else:
                list(load_tensors(path))
        except (CheckpointError, UsageError) as error:
            assert path.name in str(error)

        assert not marker.exists(), f"{label} payload ran ({how})"


def _truncated_safetensors(path: Path) -> Path:
    _touch_weights(path / "step_1.safetensors")
    data = (path / "step_1.safetensors").read_bytes()
    (path / "step_1.safetensors").write_bytes(data[: len(data) - 20])
    return path / "step_1.safetensors"


def _truncated_zip(path: Path) -> Path:
    _touch_weights(path / "step_1.pt")
    data = (path / "step_1.pt").read_bytes()
    (path / "step_1.pt").write_bytes(data[: len(data) // 2])
    return path / "step_1.pt"


def _missing_unindexed_shard(path: Path) -> Path:
    checkpoint = _missing_shard(path)
    (checkpoint / "model.safetensors.index.json").unlink()
    return checkpoint


def _missing_shard(path: Path) -> Path:
    _hf_sharded(path)
    (path / "run" / "checkpoint-10" / "model-00002-of-00002.safetensors").unlink()
    return path / "run" / "checkpoint-10"


def _index_names_an_absent_tensor(path: Path) -> Path:
    checkpoint = path / "run" / "checkpoint-10"
    _hf_sharded(path)
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"]["fc3.weight"] = "model-00002-of-00002.safetensors"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    return checkpoint


def _written(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        (path / name).write_bytes(data)
        return path / name

    return write


def _saved(obj: object) -> Callable[[Path], Path]:
    def save(path: Path) -> Path:
        torch.save(obj, path / "step_1.pt")
        return path / "step_1.pt"

    return save


@pytest.mark.parametrize(
    "make",
    [
        _written("step_1.pt", b""),
        _written("step_1.safetensors", b""),
        _written("step_1.pt", bytes(range(256)) * 4),
        _written("step_1.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"),
        _written("step_1.safetensors", (2**40).to_bytes(8, "little") + b"{}"),
        _truncated_safetensors,
        _truncated_zip,
        _missing_shard,
        _missing_unindexed_shard,
        _index_names_an_absent_tensor,
        _saved({"module.fc.weight": torch.ones(1), "fc.weight": torch.ones(1)}),
        _saved({"epoch": 3, "optimizer_state": _OPTIMIZER}),
        _saved([1, 2, 3]),
    ],
    ids=[
        "empty-pt",
        "empty-safetensors",
        "garbage-pt",
        "garbage-safetensors",
        "huge-header",
        "truncated-safetensors",
        "truncated-zip",
        "missing-shard",
        "missing-unindexed-shard",
        "index-names-an-absent-tensor",
        "two-keys-one-layer",
        "no-weights",
        "not-a-dict",
    ],
)
def test_unreadable_input_is_a_checkpoint_error_naming_the_path(
    tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    path = make(tmp_path)

    with pytest.raises(CheckpointError) as raised:
        list(load_tensors(path))

    assert str(path) in str(raised.value)


@pytest.mark.parametrize("at", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, -1])
@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy", "safetensors-numpy"])
def test_a_file_truncated_anywhere_is_a_checkpoint_error(
    tmp_path: Path, kind: str, at: float
) -> None:
    numpy = kind.endswith("numpy")
    kind = kind.removesuffix("-numpy")
    path = tmp_path / ("step_1.safetensors" if kind == "safetensors" else "step_1.pt")
    if kind == "safetensors":
        save_file(dict(_weights()), path)
    else:
        torch.save(_weights(), path, _use_new_zipfile_serialization=kind == "zip")
    data = path.read_bytes()
    cut = len(data) - 1 if at == -1 else max(1, int(len(data) * at))
    path.write_bytes(data[:cut])

    with pytest.raises(CheckpointError) as raised:
        for _, tensor in load_tensors(path, numpy=numpy):
            tensor.sum()  # memory-mapped bytes are read only here

    assert str(path) in str(raised.value)


@pytest.mark.parametrize("index", [{"metadata": {}}, ["weight_map"]], ids=["no-key", "a-list"])
def test_a_shard_index_without_a_weight_map_says_what_is_missing(
    tmp_path: Path, index: object
) -> None:
    _hf_sharded(tmp_path)
    checkpoint = tmp_path / "run" / "checkpoint-10"
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError) as raised:
        list(load_tensors(checkpoint))

    message = str(raised.value)
    assert f"the shard index {checkpoint / 'model.safetensors.index.json'} has no weight_map" in (
        message
    )
    assert "remove the index to read the shards without it" in message
    (checkpoint / "model.safetensors.index.json").unlink()  # as the message says
    _assert_same(list(load_tensors(checkpoint)), _weights())


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (4, r"the storage data/0 holds 44 bytes, its tensors need 48"),
        (None, r"its pickle names the storage data/0, which the archive lacks"),
    ],
    ids=["short", "missing"],
)
def test_a_zip_whose_storage_record_is_cut_short_fails_rather_than_reading_past_it(
    tmp_path: Path, cut: int | None, why: str
) -> None:
    import zipfile

    saved = tmp_path / "saved.pt"
    torch.save({"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 2)}, saved)
    path = tmp_path / "step_1.pt"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as rewritten:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("/data/0"):
                if cut is None:
                    continue
                data = data[:-cut]
            rewritten.writestr(entry.filename, data)

    with pytest.raises(CheckpointError, match=f"cannot read {path} as a torch.save .*{why}"):
        list(load_tensors(path))


def test_a_checkpoint_folder_without_weights_fails_alone(tmp_path: Path) -> None:
    _touch_weights(tmp_path / "run" / "checkpoint-5" / "model.safetensors")
    (tmp_path / "run" / "checkpoint-9").mkdir()
    (tmp_path / "run" / "checkpoint-9" / "config.json").write_text("{}")

    found = discover(tmp_path)

    assert [(c.step, c.path.name) for c in found.checkpoints] == [
        (5, "checkpoint-5"),
        (9, "checkpoint-9"),
    ]
    with pytest.raises(CheckpointError, match=r"checkpoint-9 holds no model: expected"):
        list(load_tensors(found.checkpoints[1].path))


def test_read_metadata(tmp_path: Path) -> None:
    _touch_weights(tmp_path / "a.safetensors", step="3", task="mnist")
    _touch_weights(tmp_path / "b.safetensors")
    _touch_weights(tmp_path / "c.pt")
    _hf_sharded(tmp_path)
    shard = tmp_path / "run" / "checkpoint-10" / "model-00001-of-00002.safetensors"
    save_file({"fc2.weight": _weights()["fc2.weight"]}, shard, metadata={"format": "pt"})

    assert read_metadata(tmp_path / "a.safetensors") == {"step": "3", "task": "mnist"}
    assert read_metadata(tmp_path / "b.safetensors") == {}
    assert read_metadata(tmp_path / "c.pt") == {}
    assert read_metadata(tmp_path / "run" / "checkpoint-10") == {"format": "pt"}


@pytest.mark.skipif(not (REAL / "mnist-two-seeds").is_dir(), reason="real checkpoints absent")
def test_real_mnist_checkpoints() -> None:
    found = discover(REAL / "mnist-two-seeds")

    runs = {c.run for c in found.checkpoints}
    assert runs == {"edpt1", "edpt2"}
    for run in runs:
        assert [c.step for c in found.checkpoints if c.run == run] == [0, 50, 100, 150, 200]
    shapes = {name: tuple(t.shape) for name, t in load_tensors(found.checkpoints[-1].path)}
    assert shapes == {
        "0.weight": (32, 1, 3, 3),
        "0.bias": (32,),
        "3.weight": (64, 32, 3, 3),
        "3.bias": (64,),
        "7.weight": (10, 1600),
        "7.bias": (10,),
    }
