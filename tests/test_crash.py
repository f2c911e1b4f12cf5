"""A killed ``spectrum analyze`` loses only the work in flight: the next run completes the store.

The slow tests kill with SIGKILL (no handler runs, no file is closed) a subprocess that runs
analyze, or one that makes the store writes analyze makes with the spectra an uninterrupted
run stored (so that, started in a fraction of the time, it can be killed many times), run
analyze again and compare the store with the one an uninterrupted run writes. The others build,
by hand, the states a kill can leave between two writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import assert_same_store, run_cli, save_checkpoint, tiny_weights

from spectrum_cli.analysis import analyze
from spectrum_cli.store import DONE, NOT_COMPUTED, Store

# Enough layers that writing one checkpoint takes a noticeable time, to be killed in the middle.
STEPS = list(range(0, 1200, 100))
LAYERS = {f"layers.{i}.weight": ((64, 48), torch.float32) for i in range(24)}
LAYERS["conv.weight"] = ((16, 8, 3, 3), torch.float32)
# One worker, so that every run uses the same number of BLAS threads and stores the same bits.
ANALYZE = ("--workers", "1")


@dataclass
class Timing:
    """When an uninterrupted run stored its first checkpoint, and how long each one took."""

    first: float
    each: float


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "runs"
    for step in STEPS:
        save_checkpoint(
            root / "run" / f"step_{step}.safetensors", tiny_weights("run", step, LAYERS)
        )
    return root


@pytest.fixture(scope="module")
def reference(runs: Path) -> tuple[Path, Timing]:
    """The store of an uninterrupted run, and its timing."""
    store = runs.parent / "reference.zarr"
    started = time.monotonic()
    process = _start(runs, store)
    seen = {}
    while process.poll() is None:
        seen.setdefault(len(_done_steps(store)), time.monotonic() - started)
        time.sleep(0.01)
    _, errors = process.communicate()
    assert process.returncode == 0, errors
    assert len(_done_steps(store)) == len(STEPS)
    first = min(t for n, t in seen.items() if n > 0)
    each = (max(seen.values()) - first) / (len(STEPS) - 1)
    return store, Timing(first, each)


def _start(root: Path, store: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "spectrum_cli", "analyze", root, "--store", store, *ANALYZE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the analysis and every worker it started."""
    with contextlib.suppress(ProcessLookupError):  # it may have finished already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


def _done_steps(store: Path) -> list[str]:
    """The steps the store marks done, read straight from the run's metadata document."""
    try:
        attributes = json.loads((store / "run" / "zarr.json").read_text())["attributes"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return list(attributes.get("checkpoints", {}))


def assert_consistent(store_path: Path) -> int:
    """What readers see of a killed run's store: whole checkpoints or none. Returns done count."""
    if not (store_path / "zarr.json").exists():
        return 0
    store = Store.open(store_path)
    if "run" not in store.runs():
        return 0
    done = store.done_steps("run")
    for layer in store.layers("run"):
        steps, status = store.status("run", layer)
        assert set(steps[status == DONE].tolist()) == set(done), layer
        assert (status[~np.isin(steps, done)] == NOT_COMPUTED).all()
        assert store.read("run", layer, ("sigma", "u", "v")).steps.tolist() == done
    return len(done)


@pytest.mark.slow
def test_a_run_killed_after_some_checkpoints_resumes(runs, reference, tmp_path):
    reference_store, _ = reference
    store = tmp_path / "s.zarr"

    # Kill as soon as the store shows a checkpoint done.
    process = _start(runs, store)
    deadline = time.monotonic() + 120
    while not _done_steps(store) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    _kill(process)
    before = assert_consistent(store)
    assert 0 < before < len(STEPS), "the run was not killed part-way; make the checkpoints larger"

    done = run_cli("analyze", runs, "--store", store, *ANALYZE, "--format", "json")

    summary = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert (summary["already_stored"], summary["analysed"]) == (before, len(STEPS) - before)
    assert_same_store(store, reference_store)
    assert not list(store.rglob("*.partial"))


# spectrum, with Ctrl-C handled as Python does from a terminal: a shell that started the tests
# in the background made its children ignore SIGINT, which Python would otherwise keep.
_AS_FROM_A_TERMINAL = """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv[0] = "spectrum"
runpy.run_module("spectrum_cli", run_name="__main__")
"""


@pytest.mark.slow
def test_ctrl_c_says_one_line_and_the_next_run_completes(runs, reference, tmp_path):
    reference_store, _ = reference
    store = tmp_path / "s.zarr"
    # On a busy machine the run may end before the signal lands: then try again.
    for _ in range(3):
        shutil.rmtree(store, ignore_errors=True)
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _AS_FROM_A_TERMINAL,
                "analyze",
                runs,
                "--store",
                store,
                *ANALYZE,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not _done_steps(store) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        out, errors = process.communicate(timeout=120)
        before = assert_consistent(store)
        if before < len(STEPS):
            break
    assert 0 < before < len(STEPS), "the run was not interrupted part-way"

    # Without --quiet, one line: none of Dask's logs of the tasks it cancelled.
    assert process.returncode == 130 and out == ""
    assert errors.splitlines() == ["error: interrupted; what was stored stays stored"]

    done = run_cli("analyze", runs, "--store", store, *ANALYZE, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["analysed"] == len(STEPS) - before
    assert_same_store(store, reference_store)


@pytest.mark.slow
def test_kills_at_random_points_never_corrupt_the_store(runs, reference, tmp_path):
    reference_store, timing = reference
    store = tmp_path / "s.zarr"
    rng = random.Random(20240811)

    # Once early, while the store is created and its rows allocated.
    process = _start(runs, store)
    time.sleep(rng.uniform(0.2, 1.0) * (timing.first - timing.each))
    _kill(process)
    assert_consistent(store)

    # Then several times part-way, once a checkpoint more is done: at a random moment of the
    # next one, or as soon as its rows are being written (a layer's status chunk rewritten).
    mid_write = 0
    for kill in range(3):
        before = assert_consistent(store)
        process = _start(runs, store)
        while len(_done_steps(store)) <= before and process.poll() is None:
            time.sleep(0.002)
        if kill == 0:
            time.sleep(rng.uniform(0, timing.each))
        else:
            _wait_for_rows_written(store, process)
        _kill(process)
        assert before < assert_consistent(store) < len(STEPS)
        mid_write += _rows_of_unfinished_checkpoints(store)

    done = run_cli("analyze", runs, "--store", store, *ANALYZE)

    assert done.returncode == 0, done.stderr
    assert mid_write > 0, "no kill landed while a checkpoint was being written"
    assert_same_store(store, reference_store)
    assert not list(store.rglob("*.partial"))


# The store writes `analyze` makes (every step's rows allocated, then each checkpoint not yet
# done written, in step order, as one worker does), with made-up spectra that depend only on
# the step: without torch or Dask it starts in a fraction of the time, to be killed many times.
_WRITER = """
import sys

import numpy as np

from spectrum_cli.store import LayerResult, Store

path, steps = sys.argv[1], list(range(0, 100 * int(sys.argv[2]), 100))
print("ready", flush=True)
with Store.writing(path, top_k=32) as store:
    store.add_steps("run", steps)
    done = set(store.done_steps("run"))
    for step in steps:
        if step in done:
            continue
        rng = np.random.default_rng(step)
        results = [
            LayerResult(
                f"layers.{i}.weight", (64, 48), (64, 48), "float32", "as stored (out x in)",
                sigma=np.sort(rng.random(48, dtype=np.float32))[::-1],
                u=rng.random((64, 32), dtype=np.float32),
                v=rng.random((48, 32), dtype=np.float32),
            )
            for i in range(16)
        ]
        store.write_checkpoint("run", step, results, {"path": f"run/step_{step}.pt"})
"""
WRITER_STEPS = 30


def _start_writer(store: Path) -> subprocess.Popen:
    """Start the writer; return once its imports are done and it is about to write."""
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, store, str(WRITER_STEPS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline() == "ready\n", process.communicate()[1]
    return process


@pytest.mark.slow
def test_twenty_kills_at_random_points_of_the_writes_never_corrupt_the_store(tmp_path):
    # An uninterrupted writer's store, and how long its first and later checkpoints take.
    reference = tmp_path / "reference.zarr"
    process = _start_writer(reference)
    started, seen = time.monotonic(), {}
    while process.poll() is None:
        seen.setdefault(len(_done_steps(reference)), time.monotonic() - started)
        time.sleep(0.002)
    _, errors = process.communicate()
    assert process.returncode == 0, errors
    first = min(t for n, t in seen.items() if n > 0)
    each = (max(seen.values()) - first) / (WRITER_STEPS - 1)

    # Kills in the store's creation (first while nothing is done), then in the opening of the
    # store and the allocation of rows, at a random moment of the checkpoint after the next, or
    # as soon as that checkpoint's rows are being written.
    store = tmp_path / "s.zarr"
    rng = random.Random(20240812)
    alive = mid_write = 0
    for kill in range(20):
        before = assert_consistent(store)
        process = _start_writer(store)
        if kill < 4:
            time.sleep(rng.uniform(0, first))
        elif kill % 4 == 0:
            time.sleep(rng.uniform(0, each))
        else:
            while len(_done_steps(store)) <= before and process.poll() is None:
                time.sleep(0.001)
            if kill % 4 == 2:
                _wait_for_rows_written(store, process)
            else:
                time.sleep(rng.uniform(0, each))
        alive += process.poll() is None
        _kill(process)
        process.stdout.close()
        assert assert_consistent(store) >= before
        if (store / "run" / "zarr.json").exists():
            mid_write += _rows_of_unfinished_checkpoints(store) > 0

    process = _start_writer(store)
    _, errors = process.communicate()
    assert process.returncode == 0, errors
    assert alive >= 18, "the writer finished before most kills"
    assert mid_write > 0, "no kill landed while a checkpoint was being written"
    assert_same_store(store, reference)
    assert not list(store.rglob("*.partial"))


def _wait_for_rows_written(store: Path, process: subprocess.Popen) -> None:
    """Return once the writer rewrites a layer's status chunk (or has ended)."""
    chunks = list(store.glob("run/*/status/c/0"))
    seen = {chunk: chunk.stat().st_mtime_ns for chunk in chunks}
    while process.poll() is None:
        for chunk in chunks:
            with contextlib.suppress(FileNotFoundError):
                if chunk.stat().st_mtime_ns != seen[chunk]:
                    return
        time.sleep(0.0005)


def _rows_of_unfinished_checkpoints(store: Path) -> int:
    """Rows already written for a checkpoint not yet marked done, which readers must not see."""
    run = zarr.open_group(store, mode="r")["run"]
    done = [int(step) for step in run.attrs["checkpoints"]]
    return sum(
        int(((run[layer]["status"][:] == DONE) & ~np.isin(run[layer]["step"][:], done)).sum())
        for layer in run.attrs["layers"]
    )


# The states a kill leaves between two writes, built by hand.


def test_a_store_killed_while_being_created_is_created_again(make_run, tmp_path):
    root = make_run("run", [0])
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / f"zarr.{'0' * 32}.partial").write_text('{"zarr_format"')

    analyze(root, store)

    assert Store.open(store).done_steps("run") == [0]
    assert not list(store.rglob("*.partial"))


def test_rows_of_an_unmarked_checkpoint_are_not_read_and_are_written_again(make_run, tmp_path):
    root = make_run("run", [0, 1])
    analyze(root, tmp_path / "reference.zarr")
    store = tmp_path / "s.zarr"
    analyze(root, store)

    # Killed after every row of step 1 was written, before the step was marked done.
    run = zarr.open_group(store, mode="r+")["run"]
    run.attrs["checkpoints"] = {"0": run.attrs["checkpoints"]["0"]}
    opened = Store.open(store)
    assert opened.status("run", "fc.weight")[1].tolist() == [DONE, NOT_COMPUTED]
    assert opened.read("run", "fc.weight").steps.tolist() == [0]

    summary = analyze(root, store)

    assert (summary.analysed, summary.already_stored) == (1, 1)
    assert_same_store(store, tmp_path / "reference.zarr", rtol=1e-6)


def test_a_layer_killed_while_growing_is_grown_again(make_run, tmp_path):
    root = make_run("run", [0])
    analyze(root, tmp_path / "s.zarr")
    make_run("run", [5])
    analyze(root, tmp_path / "reference.zarr")

    # Killed after step 5 was allocated and the first array of one layer grown.
    run = zarr.open_group(tmp_path / "s.zarr", mode="r+")["run"]
    run.attrs["steps"] = [0, 5]
    run["fc.weight"]["step"].resize((2,))

    summary = analyze(root, tmp_path / "s.zarr")

    assert (summary.analysed, summary.ok) == (1, True)
    assert_same_store(tmp_path / "s.zarr", tmp_path / "reference.zarr", rtol=1e-6)
