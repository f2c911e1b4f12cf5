"""The store format: its layout pinned, its readers, its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, store_contents

from spectrum_cli.errors import StoreError
from spectrum_cli.store import DONE, FAILED, NOT_COMPUTED, LayerResult, Store

# Every metadata document of a small store, as it must stay: regenerate it deliberately, with
# SPECTRUM_UPDATE_GOLDEN=1, only when the format changes (and its version with it).
GOLDEN = Path(__file__).parent / "golden" / "store_format_1.json"


def result(layer: str, m: int, n: int, k: int, fill: float = 1.0, **extra) -> LayerResult:
    r = min(m, n)
    fields = {
        "sigma": np.linspace(fill, 0.1, r, dtype=np.float32),
        "u": np.full((m, min(k, r)), fill, np.float32),
        "v": np.full((n, min(k, r)), fill, np.float32),
    }
    fields.update(extra)
    return LayerResult(layer, (m, n), (m, n), "float32", "as stored (out × in)", **fields)


def test_layout_is_format_one(tmp_path):
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=4) as store:
        store.add_steps("runA", [10, 0])
        store.write_checkpoint("runA", 0, [result("fc.weight", 6, 3, 4)], {"path": "a/0"})

    # Golden: every metadata document of the store, with what spectrum pins in it.
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    assert root["attributes"]["spectrum_format"] == 1
    assert root["attributes"]["top_k"] == 4 and root["attributes"]["runs"] == ["runA"]
    run = json.loads((path / "runA" / "zarr.json").read_text())["attributes"]
    assert run["steps"] == [0, 10] and run["layers"] == ["fc.weight"]
    assert run["checkpoints"] == {"0": {"path": "a/0"}}
    layer = json.loads((path / "runA" / "fc.weight" / "zarr.json").read_text())["attributes"]
    assert layer["matrix_shape"] == [6, 3] and layer["dtype"] == "float32"
    expected = {
        "step": ("int64", [2], ["step"]),
        "sigma": ("float32", [2, 3], ["step", "index"]),
        "u": ("float32", [2, 6, 3], ["step", "row", "k"]),
        "v": ("float32", [2, 3, 3], ["step", "col", "k"]),
        "status": ("uint8", [2], ["step"]),
    }
    for name, (dtype, shape, dims) in expected.items():
        meta = json.loads((path / "runA" / "fc.weight" / name / "zarr.json").read_text())
        assert (meta["data_type"], meta["shape"], meta["dimension_names"]) == (dtype, shape, dims)

    # And every document whole, the tool's version aside, against the checked-in copy.
    documents = {
        node.relative_to(path).as_posix(): json.loads(node.read_text())
        for node in sorted(path.rglob("zarr.json"))
    }
    documents["zarr.json"]["attributes"]["spectrum_version"] = "<any>"
    if os.environ.get("SPECTRUM_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(documents, indent=2, ensure_ascii=False) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert list(documents) == list(golden)
    for name, document in golden.items():
        assert documents[name] == document, f"{name} differs from {GOLDEN.name}"


def test_read_returns_done_rows_sorted_by_step(tmp_path):
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2) as store:
        store.add_steps("r", [5, 1])
        store.write_checkpoint("r", 5, [result("w", 4, 4, 2, fill=5.0)], {})
        store.add_steps("r", [3])  # added later, so its row comes last
        store.write_checkpoint("r", 3, [result("w", 4, 4, 2, fill=3.0)], {})

    store = Store.open(path)
    rows = store.read("r", "w", ("sigma", "u"))
    assert rows.steps.tolist() == [3, 5]
    assert rows.sigma[:, 0].tolist() == [3.0, 5.0]
    assert rows.u.shape == (2, 4, 2)
    steps, status = store.status("r", "w")
    assert steps.tolist() == [1, 3, 5] and status.tolist() == [NOT_COMPUTED, DONE, DONE]
    assert store.done_steps("r") == [3, 5]


def test_statuses_of_a_run_equal_each_layers_status(tmp_path):
    path = tmp_path / "s.zarr"
    layers = ["a", "b.weight", "c"]
    with Store.writing(path, top_k=2) as store:
        store.add_steps("r", [4, 2])
        store.write_checkpoint("r", 4, [result(name, 4, 3, 2) for name in layers], {})
        store.add_steps("r", [3])
        failed = LayerResult("c", (4, 3), (4, 3), "float32", "as stored", failure="NaN")
        store.write_checkpoint("r", 3, [result("a", 4, 3, 2), failed], {})
        written = store.statuses("r")

    reader = Store.open(path)
    for statuses in (written, reader.statuses("r")):
        assert list(statuses) == reader.layers("r")
        for layer, (steps, status) in statuses.items():
            expected = reader.status("r", layer)
            assert steps.tolist() == expected[0].tolist() == [2, 3, 4]
            assert status.tolist() == expected[1].tolist()
    assert written["c"][1].tolist() == [NOT_COMPUTED, FAILED, DONE]

    # A damaged array is named, as reading its layer alone names it.
    (path / "r" / "b.weight" / "status" / "zarr.json").write_text("{")
    with pytest.raises(StoreError, match=r"b\.weight.*damaged|damaged.*b\.weight"):
        Store.open(path).statuses("r")


def test_a_reader_sees_one_set_of_done_steps_while_a_writer_adds_more(tmp_path):
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2) as writer:
        writer.add_steps("r", [0, 1])
        writer.write_checkpoint("r", 0, [result("a", 4, 3, 2), result("b", 4, 3, 2)], {})
        reader = Store.open(path)
        assert reader.read("r", "a").steps.tolist() == [0]

        writer.write_checkpoint("r", 1, [result("a", 4, 3, 2), result("b", 4, 3, 2)], {})

        # Every layer the reader reads agrees with what it saw first.
        assert reader.read("r", "b").steps.tolist() == [0]
        assert reader.done_steps("r") == [0]
        assert Store.open(path).read("r", "b").steps.tolist() == [0, 1]


def test_forgotten_steps_are_not_computed_until_written_again(tmp_path):
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2) as store:
        store.add_steps("r", [0, 1])
        for step in (0, 1):
            store.write_checkpoint("r", step, [result("a", 4, 3, 2, fill=step + 1.0)], {})
        store.forget("r", [1])

        assert store.done_steps("r") == [0]
        assert store.status("r", "a")[1].tolist() == [DONE, NOT_COMPUTED]
        assert Store.open(path).read("r", "a").steps.tolist() == [0]
        store.write_checkpoint("r", 1, [result("a", 4, 3, 2, fill=5.0)], {})

    rows = Store.open(path).read("r", "a")
    assert rows.steps.tolist() == [0, 1] and rows.sigma[1][0] != rows.sigma[0][0]


def test_failures_and_shape_changes_are_recorded_not_stored(tmp_path):
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2) as store:
        store.add_steps("r", [0, 1, 2])
        store.write_checkpoint("r", 0, [result("w", 4, 4, 2)], {})
        store.write_checkpoint("r", 1, [result("w", 5, 4, 2)], {})
        failed = LayerResult("w", (4, 4), (4, 4), "float32", "as stored", failure="NaN")
        store.write_checkpoint("r", 2, [failed], {})

    store = Store.open(path)
    _, status = store.status("r", "w")
    assert status.tolist() == [DONE, FAILED, FAILED]
    failures = store.layer_attrs("r", "w")["failures"]
    assert "differs" in failures["1"] and failures["2"] == "NaN"
    assert store.read("r", "w").steps.tolist() == [0]


def test_readable_with_xarray(tmp_path):
    xr = pytest.importorskip("xarray")
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2) as store:
        store.add_steps("runs/a", [0, 7])
        for step in (0, 7):
            store.write_checkpoint("runs/a", step, [result("conv.weight", 8, 5, 2)], {})

    data = xr.open_zarr(path, group="runs/a/conv.weight", consolidated=False)
    assert data["sigma"].dims == ("step", "index")
    assert data["u"].dims == ("step", "row", "k")
    assert data["step"].values.tolist() == [0, 7]
    assert data["sigma"].sel(step=7).shape == (5,)


def test_refuses_foreign_folders_formats_and_top_k(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "missing.zarr")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a spectra store"), Store.writing(folder, top_k=2):
        pass
    assert (folder / "a.txt").read_text() == "mine"

    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=2):
        pass
    with pytest.raises(StoreError, match="--top-k 2"), Store.writing(path, top_k=8):
        pass
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["spectrum_format"] = 2
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="format 2"):
        Store.open(path)


def test_a_zarr_v2_store_is_named_as_such(tmp_path):
    import zarr

    path = tmp_path / "old.zarr"
    zarr.open_group(path, mode="w", zarr_format=2).attrs["spectrum_format"] = 1
    with pytest.raises(StoreError, match="is a Zarr v2 store, not a spectra store"):
        Store.open(path)
    with (
        pytest.raises(StoreError, match="is a Zarr v2 store, not a spectra store"),
        Store.writing(path, top_k=2),
    ):
        pass
    assert not (path / "zarr.json").exists()


def test_a_store_that_cannot_be_used_stops_with_exit_code_two(tmp_path):
    # Exit 1 is kept for work done with failures; a store unusable as given is bad input.
    with pytest.raises(StoreError) as raised:
        Store.open(tmp_path / "missing.zarr")
    assert raised.value.exit_code == 2


# The first writer, in a process of its own: it holds the store until its stdin closes.
_HOLDER = """
import sys

from spectrum_cli.store import Store

with Store.writing(sys.argv[1], top_k=32) as store:
    store.add_steps("held", [0])
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_a_second_writer_in_another_process_stops_with_a_clear_message(tmp_path):
    path = tmp_path / "s.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        with (
            pytest.raises(StoreError, match="being written by another spectrum process"),
            Store.writing(path, top_k=32),
        ):
            pass
    finally:
        holder.communicate(timeout=60)
    assert holder.returncode == 0
    assert Store.open(path).runs() == ["held"]


def test_analyze_stops_while_another_process_writes_the_store(make_run, tmp_path):
    root = make_run("a", [0, 1])
    path = tmp_path / "s.zarr"
    with Store.writing(path, top_k=32) as store:
        store.add_steps("held", [0])
        before = store_contents(path)

        # A second writer: a whole `spectrum analyze` in another process.
        done = run_cli("analyze", root, "--store", path)

        assert (done.returncode, done.stdout) == (2, "")
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"error: {path} is being written by another spectrum process")
        assert line.endswith("wait for it to finish or pass another --store")
        assert store_contents(path) == before
