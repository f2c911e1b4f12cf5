"""``spectrum rank``, ``stability`` and ``align`` on stores whose answers are known.

Small stores are written directly from matrices with known singular vectors; the real MNIST
checkpoints and the sample runs go through ``analyze`` first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from spectrum_cli.cli import app
from spectrum_cli.dynamics import select, training_metrics
from spectrum_cli.errors import StoreError, UsageError
from spectrum_cli.store import LayerResult, Store

# analyze's in-process Dask scheduler binds the default HTTP port 8787 and warns when another
# cluster on this machine holds it; that says nothing about the spectra tested here.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning")

MNIST = REAL / "mnist-two-seeds"
PNG = b"\x89PNG\r\n\x1a\n"


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


def rotate(vectors: np.ndarray, theta: float) -> np.ndarray:
    """Rotate the first two columns by theta in their plane."""
    out = vectors.copy()
    c, s = math.cos(theta), math.sin(theta)
    out[:, 0] = c * vectors[:, 0] + s * vectors[:, 1]
    out[:, 1] = -s * vectors[:, 0] + c * vectors[:, 1]
    return out


def decomposed(
    layer: str, matrix: np.ndarray, top_k: int, tensor_shape: tuple[int, ...] | None = None
) -> LayerResult:
    """The store's record of a matrix: all singular values, the top-k vectors."""
    u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
    k = min(top_k, len(sigma))
    return LayerResult(
        layer,
        tuple(tensor_shape or matrix.shape),
        matrix.shape,
        "float32",
        "test",
        sigma=sigma.astype(np.float32),
        u=u[:, :k].astype(np.float32),
        v=vt[:k].T.astype(np.float32),
    )


def write_store(path: Path, runs: dict, top_k: int = 8) -> Path:
    """Write ``{run: {step: [LayerResult, ...]}}`` as a store."""
    with Store.writing(path, top_k) as store:
        for run, steps in runs.items():
            store.add_steps(run, list(steps))
            for step, results in steps.items():
                store.write_checkpoint(run, step, results, {"path": f"{run}/step_{step}.pt"})
    return path


SIGMA = np.array([8.0, 6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5])  # distinct: vectors fixed
THETAS = {0: 0.9, 5: 0.4, 10: 0.0}  # the top pair rotates into place by step 10


@pytest.fixture
def known_store(tmp_path: Path) -> Path:
    """Runs ``a`` and ``b`` of a dense chain fc1 (12 × 10) → fc2 (6 × 12), at steps 0, 5, 10.

    fc1 = U diag(σ) Vᵀ with its top two directions rotated by THETAS[step] away from where
    they end; fc2's right vectors are fc1's final left vectors, so the two align exactly at
    the end. Run ``b`` has a flat spectrum on fc1.
    """
    u, v = orthonormal(12, 10, 1), orthonormal(10, 10, 2)
    fc2 = orthonormal(6, 6, 3) @ np.diag(SIGMA[:6]) @ u[:, :6].T  # (6, 12), right vectors u
    runs: dict = {"a": {}, "b": {}}
    for step, theta in THETAS.items():
        fc1 = rotate(u, theta) @ np.diag(SIGMA) @ rotate(v, theta).T
        runs["a"][step] = [decomposed("fc1.weight", fc1, 8), decomposed("fc2.weight", fc2, 8)]
        flat = u @ v.T  # every singular value 1
        runs["b"][step] = [decomposed("fc1.weight", flat, 8), decomposed("fc2.weight", fc2, 8)]
    return write_store(tmp_path / "known.zarr", runs)


def invoke(*args: str | Path) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.exception


def cli_json(*args: str | Path) -> list[dict]:
    code, out, error = invoke(*args, "--format", "json")
    assert code == 0, (out, error)
    return json.loads(out)


def run_spectrum(*args: str | Path, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORCE_", "TTY_"))}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "spectrum_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------------------- rank


def test_rank_rows_name_run_layer_step_with_the_right_numbers(known_store):
    rows = cli_json("rank", known_store)
    assert len(rows) == 2 * 2 * 3
    first = rows[0]
    assert {"run", "layer", "step", "m", "n"} <= set(first)
    assert (first["run"], first["layer"], first["step"], first["m"], first["n"]) == (
        "a",
        "fc1.weight",
        0,
        12,
        10,
    )
    p = SIGMA / SIGMA.sum()
    erank = math.exp(-(p * np.log(p)).sum())
    assert first["effective_rank"] == pytest.approx(erank, rel=1e-5)
    assert first["normalized_effective_rank"] == pytest.approx(erank / 10, rel=1e-5)
    assert first["stable_rank"] == pytest.approx((SIGMA**2).sum() / 64, rel=1e-5)
    assert first["spectral_norm"] == pytest.approx(8.0, rel=1e-6)
    assert first["frobenius_norm"] == pytest.approx(math.sqrt((SIGMA**2).sum()), rel=1e-6)
    flat = [r for r in rows if r["run"] == "b" and r["layer"] == "fc1.weight"]
    assert [r["effective_rank"] for r in flat] == pytest.approx([10.0] * 3, rel=1e-5)


def test_rank_csv_table_and_selection(known_store):
    code, out, _ = invoke("rank", known_store, "--format", "csv", "--run", "b", "--layers", "fc1")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["run"], r["layer"], r["step"]) for r in rows] == [
        ("b", "fc1.weight", "0"),
        ("b", "fc1.weight", "5"),
        ("b", "fc1.weight", "10"),
    ]

    # The table: one line per run and layer, a trend, no rows per step.
    code, out, _ = invoke("rank", known_store)
    assert code == 0
    lines = [line for line in out.splitlines() if "fc1.weight" in line or "fc2.weight" in line]
    assert len(lines) == 4
    assert "0..10" in out and "▄▄▄" in out
    assert "Traceback" not in out
    # Shapes as ls writes them, so that one grep finds a layer in both.
    assert all(("12x10" in line) == ("fc1" in line) for line in lines)
    assert all(("6x12" in line) == ("fc2" in line) for line in lines)


LONG_RUN = "sweeps/lr-0.003/spawned-at-2000/child-a-with-another-data-order"


@pytest.mark.parametrize("command", ["rank", "stability", "align"])
def test_summary_tables_fit_an_80_column_terminal(command, tmp_path):
    # A long run name and a long layer name, as nested sweeps and transformers have.
    u, v = orthonormal(12, 10, 1), orthonormal(10, 10, 2)
    fc1 = u @ np.diag(SIGMA) @ v.T
    fc2 = orthonormal(6, 6, 3) @ np.diag(SIGMA[:6]) @ u[:, :6].T
    layers = ("encoder.layers.0.self_attention.out_proj.weight", "head.weight")
    steps = {
        step: [decomposed(layers[0], fc1, 8), decomposed(layers[1], fc2, 8)] for step in range(40)
    }
    store = write_store(tmp_path / "wide.zarr", {LONG_RUN: steps, "short": steps})

    done = run_spectrum(command, store, columns=80)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, done.stdout

    # Every layer's numbers and trend sit on one line, under a line naming its run.
    rows = [line for line in lines if "0..39" in line]
    assert len(rows) == (2 if command == "align" else 4), done.stdout
    assert all(re.search(r"[▁▂▃▄▅▆▇█]{12} *$", line) for line in rows), done.stdout
    assert sum(line.strip() == "short" for line in lines) == 1
    assert "head.weight" in done.stdout

    # Long names break only after a separator, and read whole when their lines are joined.
    start = next(
        i for i, line in enumerate(lines) if line.strip() and LONG_RUN.startswith(line.strip())
    )
    pieces = []
    while "".join(pieces) != LONG_RUN:
        pieces.append(lines[start + len(pieces)].strip())
        assert LONG_RUN.startswith("".join(pieces)), pieces
    assert all(piece[-1] in "/._-" for piece in pieces[:-1]), pieces
    layer = layers[0]
    firsts = [
        line.split()[0] for line in lines if line.split() and layer.startswith(line.split()[0])
    ]
    assert firsts and all(first[-1] in "/._-:" or first == layer for first in firsts), lines


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(alphabet="ab/._-:x漢 ", min_size=1, max_size=60),
    width=st.integers(2, 30),
    indent=st.sampled_from(["", "  ", "    "]),
)
def test_names_fold_whole_within_the_width(name, width, indent):
    from rich.cells import cell_len

    from spectrum_cli.cli.output import _fold

    lines = _fold(name, width, indent).split("\n")
    kept = indent if width > len(indent) + 1 else ""
    assert all(line.startswith(kept) for line in lines[1:])
    assert lines[0] + "".join(line[len(kept) :] for line in lines[1:]) == name
    assert all(cell_len(line) <= width for line in lines)
    # A line ends elsewhere than after a separator only when it is full.
    for line, after in pairwise(lines):
        if line[-1] not in "/._-:":
            assert cell_len(line + after[len(kept)]) > width, lines


def test_rank_reads_singular_values_only(known_store, monkeypatch):
    asked = []
    original = Store.read

    def spy(self, run, layer, fields=("sigma",)):
        asked.append(tuple(fields))
        return original(self, run, layer, fields)

    monkeypatch.setattr(Store, "read", spy)
    cli_json("rank", known_store)
    assert set(asked) == {("sigma",)}


def test_rank_plot_writes_one_png_per_run(known_store, tmp_path):
    code, _, error = invoke("rank", known_store, "--plot", tmp_path / "one.png", "--run", "a")
    assert code == 0, error
    assert (tmp_path / "one.png").read_bytes().startswith(PNG)

    code, _, error = invoke("rank", known_store, "--plot", tmp_path / "fig" / "rank.png")
    assert code == 0, error
    for run in ("a", "b"):
        assert (tmp_path / "fig" / f"rank-{run}.png").read_bytes().startswith(PNG)
    assert not (tmp_path / "fig" / "rank.png").exists()


def test_plot_writes_the_format_its_suffix_names(known_store, tmp_path):
    code, _, error = invoke("rank", known_store, "-r", "a", "--plot", tmp_path / "r.pdf")
    assert code == 0, error
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF-")
    code, _, error = invoke("stability", known_store, "--plot", tmp_path / "s.SVG")
    assert code == 0, error
    for run in ("a", "b"):
        assert b"<svg" in (tmp_path / f"s-{run}.SVG").read_bytes()[:1000]


@pytest.mark.parametrize(
    ("plot", "message"),
    [
        ("x.jpg", "ends in '.jpg'; figures are written as .png, .pdf or .svg"),
        ("x", "has no suffix"),
        ("/proc/nope/x.png", "cannot write into /proc/nope"),
        ("taken/x.png", "taken is a file, not a folder"),
        ("folder.png", "is a folder"),
    ],
)
def test_a_bad_plot_path_stops_before_any_work(plot, message, tmp_path):
    (tmp_path / "taken").write_text("mine")
    (tmp_path / "folder.png").mkdir()
    path = plot if plot.startswith("/") else tmp_path / plot

    # The store does not exist, so any work would stop on it: the path is checked first.
    for command in ("rank", "stability", "align"):
        _, _, error = invoke(command, tmp_path / "missing.zarr", "--plot", path)
        assert isinstance(error, UsageError), error
        assert str(error).startswith(f"--plot {path}: ") and message in str(error)


def test_a_bad_plot_path_is_one_line_and_exit_two(tmp_path):
    done = run_spectrum("rank", tmp_path / "missing.zarr", "--plot", "/proc/nope/x.png")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --plot /proc/nope/x.png: cannot write into /proc/nope")
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


def test_plot_files_of_runs_differing_only_in_separators_do_not_collide(tmp_path):
    steps = {0: [decomposed("w", orthonormal(6, 4, 1), 4)]}
    store = write_store(tmp_path / "s.zarr", {"a/b": steps, "a_b": steps, "a b": steps})
    code, _, error = invoke("rank", store, "--plot", tmp_path / "fig" / "r.png")
    assert code == 0, error
    names = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert len(names) == 3 and "r-a_b.png" in names, names
    assert all(re.fullmatch(r"r-a_b(-[0-9a-f]{8})?\.png", name) for name in names), names


# ---------------------------------------------------------------------------- stability


def test_stability_against_the_final_step_by_hand(known_store):
    rows = cli_json("stability", known_store, "--run", "a", "--layers", "^fc1")
    assert [(r["run"], r["layer"], r["step"]) for r in rows] == [
        ("a", "fc1.weight", 0),
        ("a", "fc1.weight", 5),
        ("a", "fc1.weight", 10),
    ]
    assert all(r["reference_step"] == 10 and r["reference"] == "final" for r in rows)
    for row in rows:
        # Both u and v of the top pair rotated by theta: S_11 = S_22 = cos² theta.
        c2 = math.cos(THETAS[row["step"]]) ** 2
        assert len(row["diagonal"]) == 8
        assert row["diagonal"][:2] == pytest.approx([c2, c2], abs=1e-5)
        assert row["diagonal"][2:] == pytest.approx([1.0] * 6, abs=1e-5)
        assert row["score"] == pytest.approx((2 * c2 + 6) / 8, abs=1e-5)  # min(10, k=8)
    assert rows[-1]["score"] == pytest.approx(1.0, abs=1e-6)


def test_stability_previous_and_top(known_store):
    rows = cli_json(
        "stability", known_store, "--reference", "previous", "--top", "3", "-r", "a", "-l", "fc1"
    )
    assert [(r["step"], r["reference_step"]) for r in rows] == [(5, 0), (10, 5)]
    assert all(len(r["diagonal"]) == 3 for r in rows)
    c2 = math.cos(0.9 - 0.4) ** 2  # rotations compose: 0.9 then 0.4 differ by 0.5
    assert rows[0]["diagonal"][0] == pytest.approx(c2, abs=1e-5)
    assert rows[0]["score"] == pytest.approx((2 * c2 + 6) / 8, abs=1e-5)

    code, out, _ = invoke("stability", known_store, "--format", "csv", "--top", "2")
    assert code == 0
    header = out.splitlines()[0].split(",")
    assert header[-3:] == ["score", "diagonal_1", "diagonal_2"]


def test_stability_table_says_when_the_score_settles(known_store, tmp_path):
    code, out, _ = invoke("stability", known_store, "--run", "a", "--plot", tmp_path / "s.png")
    assert code == 0
    line = next(line for line in out.splitlines() if "fc1.weight" in line)
    # Scores: (2cos²0.9 + 6)/8 = 0.85, (2cos²0.4 + 6)/8 = 0.96, 1: at or above 0.9 from step 5.
    assert line.split()[-2] == "5"
    assert (tmp_path / "s.png").read_bytes().startswith(PNG)


# ---------------------------------------------------------------------------- align


def test_align_finds_dense_pairs_and_their_alignment(known_store, tmp_path):
    rows = cli_json("align", known_store, "--run", "a")
    assert {(r["layer"], r["next_layer"], r["connection"]) for r in rows} == {
        ("fc1.weight", "fc2.weight", "dense")
    }
    assert [r["step"] for r in rows] == [0, 5, 10]
    final = rows[-1]
    assert final["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(final["diagonal"]) == 6  # fc2 keeps min(8, 6, 12) vectors
    # At step 0 the top pair of fc1 is rotated by 0.9: A_11 = A_22 = |cos 0.9|.
    assert rows[0]["diagonal"][:2] == pytest.approx([math.cos(0.9)] * 2, abs=1e-5)

    named = cli_json("align", known_store, "--pair", "fc1.weight:fc2.weight", "--top", "2")
    assert len(named) == 6 and all(len(r["diagonal"]) == 2 for r in named)
    # The table's title says which pairs it holds.
    _, table, _ = invoke("align", known_store, "--run", "a")
    assert "of consecutive layers" in table and "named pairs" not in table
    _, table, _ = invoke("align", known_store, "--run", "a", "--pair", "fc1.weight:fc2.weight")
    assert "of the named pairs" in table and "consecutive" not in table
    code, _, _ = invoke("align", known_store, "--plot", tmp_path / "a.png", "-r", "a")
    assert code == 0 and (tmp_path / "a.png").read_bytes().startswith(PNG)


def test_align_convolutions_at_the_kernel_centre(tmp_path):
    # conv2's right vectors at the centre position are conv1's left vectors: A = 1.
    c1 = orthonormal(8, 8, 4)  # conv1's output directions (8 channels)
    conv1 = c1 @ np.diag(SIGMA[:8]) @ orthonormal(27, 8, 5).T  # (8, 3·3·3)
    kernel = np.zeros((4, 8, 3, 3))
    kernel[:, :, 1, 1] = orthonormal(4, 4, 6) @ np.diag(SIGMA[:4]) @ c1[:, :4].T
    results = [
        decomposed("conv1.weight", conv1, 8, (8, 3, 3, 3)),
        decomposed("conv2.weight", kernel.reshape(4, 72), 8, (4, 8, 3, 3)),
        decomposed("fc.weight", np.eye(10, 4 * 36), 8),  # flattened: does not connect
    ]
    store = write_store(tmp_path / "conv.zarr", {"net": {0: results}})
    rows = cli_json("align", store)
    assert [(r["layer"], r["next_layer"], r["connection"]) for r in rows] == [
        ("conv1.weight", "conv2.weight", "convolution")
    ]
    assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_align_refuses_pairs_that_do_not_connect(known_store, tmp_path):
    _, _, error = invoke("align", known_store, "--pair", "fc2.weight:fc1.weight")
    assert isinstance(error, UsageError) and "inputs" in str(error)
    _, _, error = invoke("align", known_store, "--pair", "fc1.weight-fc2.weight")
    assert isinstance(error, UsageError) and "LAYER_A:LAYER_B" in str(error)

    lonely = write_store(
        tmp_path / "lonely.zarr", {"r": {0: [decomposed("w", np.eye(5, 3), 4)]}}, top_k=4
    )
    _, _, error = invoke("align", lonely)
    assert isinstance(error, UsageError) and "--pair" in str(error)


# ---------------------------------------------------------------------------- errors


def test_unknown_run_or_layer_is_one_line_and_exit_two(known_store):
    for args, message in [
        (("rank", known_store, "--run", "zz"), "no run 'zz'"),
        (("stability", known_store, "--layers", "nothing-like-it"), "matches no layer"),
        (("align", known_store, "--layers", "("), "not a regular expression"),
    ]:
        done = run_spectrum(*args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_store_of_another_format_is_refused(known_store, tmp_path):
    meta = json.loads((known_store / "zarr.json").read_text())
    meta["attributes"]["spectrum_format"] = 2
    (known_store / "zarr.json").write_text(json.dumps(meta))
    for command in ("rank", "stability", "align", "report"):
        _, _, error = invoke(command, known_store)
        assert isinstance(error, StoreError) and "format 2" in str(error)
        assert error.exit_code == 2


def test_a_run_without_any_stored_layer_is_named_as_such(tmp_path):
    # Every checkpoint of the run failed: its steps are allocated, no layer was written.
    with Store.writing(tmp_path / "s.zarr", top_k=4) as store:
        store.add_steps("run", [1])
    for command in ("rank", "stability", "align", "report"):
        _, _, error = invoke(command, tmp_path / "s.zarr")
        assert isinstance(error, StoreError) and error.exit_code == 2
        assert "no layer of any run" in str(error) and "--layers" not in str(error)
    code, table, _ = invoke("ls", tmp_path / "s.zarr")
    assert code == 0 and re.search(r"run\s.*\n.*\(no layer stored\)\s+none\s+0\s+0", table)


def test_a_store_that_cannot_be_used_exits_two_in_one_line(tmp_path):
    import zarr

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("mine")
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    damaged = tmp_path / "damaged.zarr"
    damaged.mkdir()
    (damaged / "zarr.json").write_text('{"zarr_format": 3, "node_')
    for store, message in [
        (tmp_path / "missing.zarr", "does not exist"),
        (folder, "not a spectra store"),
        (tmp_path / "v2.zarr", "is a Zarr v2 store, not a spectra store"),
        (damaged, "cannot read"),
    ]:
        done = run_spectrum("rank", store)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


# ---------------------------------------------------------------------------- training metrics


def test_training_metrics_are_found_from_any_folder(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from spectrum_cli.analysis import analyze

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for step in (0, 10):
        save_file(
            {"fc.weight": rng.standard_normal((6, 4)).astype(np.float32)},
            run / f"step_{step}.safetensors",
        )
    log = run / "metrics.csv"
    log.write_text("step,train_loss,val_acc\n0,2.0,0.1\n10,0.5,\n")

    # Analysed from a folder that is neither the runs' nor above them, as `cd elsewhere &&
    # spectrum analyze ../runs --store s.zarr` does.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    analyze(Path("../runs"), Path("s.zarr"), top_k=2)
    store = Store.open(elsewhere / "s.zarr")
    source = store.checkpoints("r1")[10]
    assert source["path"] == "runs/r1/step_10.safetensors"
    assert Path(source["absolute_path"]) == (run / "step_10.safetensors").resolve()

    # The recorded absolute path finds the log from here and from any other folder.
    for folder in (elsewhere, run, tmp_path):
        monkeypatch.chdir(folder)
        found = training_metrics(store, "r1")
        assert found is not None, folder
    assert found["step"].tolist() == [0, 10] and found["train_loss"].tolist() == [2.0, 0.5]
    assert np.isnan(found["val_acc"][1])
    page = json.loads(
        invoke("report", store.path, "--out", tmp_path / "rep", "--format", "json")[1]
    )
    assert page["runs"][0]["training_log"] == str(log.resolve())

    # Runs moved together with the store: the relative path, from the store's folder.
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "runs").rename(moved / "runs")
    (elsewhere / "s.zarr").rename(moved / "s.zarr")
    store = Store.open(moved / "s.zarr")
    assert training_metrics(store, "r1") is not None

    # No log anywhere: `rank --plot` draws without one and says so on stderr.
    (moved / "runs" / "r1" / "metrics.csv").rename(tmp_path / "kept.csv")
    assert training_metrics(store, "r1") is None
    done = run_spectrum("rank", moved / "s.zarr", "--plot", tmp_path / "r.png")
    assert done.returncode == 0, done.stderr
    (note,) = [line for line in done.stderr.splitlines() if line.startswith("note:")]
    assert note.startswith("note: run r1: no metrics.csv found (looked in ")
    assert str(moved / "runs" / "r1") in note and "--metrics FILE.csv" in note
    assert (tmp_path / "r.png").read_bytes().startswith(PNG)

    # A log named on the command line is used as given, with no note.
    assert training_metrics(store, "r1", tmp_path / "kept.csv") is not None
    done = run_spectrum(
        "rank", moved / "s.zarr", "--metrics", tmp_path / "kept.csv", "--plot", tmp_path / "m.png"
    )
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr
    _, _, error = invoke("rank", moved / "s.zarr", "--metrics", "nope.csv")
    assert isinstance(error, UsageError)
    assert select(store, ["r1"])[0].layers == ["fc.weight"]


@pytest.mark.parametrize(
    ("log", "message"),
    [("step,loss\n", "has no rows"), ("epoch,loss\n1,0.5\n", "has no step column")],
)
def test_a_training_log_that_cannot_be_drawn_stops_before_any_output(
    known_store, tmp_path, log, message
):
    (tmp_path / "log.csv").write_text(log)
    metrics = ["--metrics", tmp_path / "log.csv"]

    _, out, error = invoke("rank", known_store, *metrics, "--plot", tmp_path / "r.png")
    assert isinstance(error, UsageError) and error.exit_code == 2 and message in str(error)
    assert out == "" and not (tmp_path / "r.png").exists()

    _, _, error = invoke("report", known_store, *metrics, "--out", tmp_path / "rep")
    assert isinstance(error, UsageError) and message in str(error)
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------- real checkpoints


@pytest.fixture(scope="module")
def mnist_store(tmp_path_factory) -> Path:
    if not MNIST.is_dir():
        pytest.skip(f"{MNIST} is not here")
    from spectrum_cli.analysis import analyze

    store = tmp_path_factory.mktemp("mnist") / "mnist.zarr"
    summary = analyze(MNIST, store, top_k=16)
    assert summary.ok
    return store


def test_real_mnist_effective_rank_falls(mnist_store):
    rows = cli_json("rank", mnist_store, "--layers", r"^3\.weight$")
    for run in ("edpt1", "edpt2"):
        mine = {r["step"]: r for r in rows if r["run"] == run}
        assert sorted(mine) == [0, 50, 100, 150, 200]
        assert (mine[0]["m"], mine[0]["n"]) == (64, 288)
        # The data's README: about 62 at epoch 0, about 23 at epoch 200 (measured 62.1, 62.2
        # and 22.9, 24.2).
        assert mine[0]["effective_rank"] == pytest.approx(62, abs=1.5)
        assert mine[200]["effective_rank"] == pytest.approx(23, abs=1.5)
        assert mine[200]["effective_rank"] < min(mine[s]["effective_rank"] for s in (0, 50))


def test_real_mnist_stability_and_alignment(mnist_store):
    rows = cli_json("stability", mnist_store)
    finals = [r for r in rows if r["step"] == 200]
    assert finals and all(r["score"] == pytest.approx(1.0, abs=1e-5) for r in finals)
    starts = [r["score"] for r in rows if r["step"] == 0]
    assert max(starts) < 0.5  # initial directions are not the trained ones

    aligned = cli_json("align", mnist_store)
    assert {(r["layer"], r["next_layer"], r["connection"]) for r in aligned} == {
        ("0.weight", "3.weight", "convolution")
    }


# ---------------------------------------------------------------------------- sample runs

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
SAMPLE_RUNS = ("modadd-wd", "modadd-nowd", "digits-true", "digits-shuffled")


@pytest.fixture(scope="module")
def samples_store(tmp_path_factory) -> Path:
    """The four sample runs the paper's effects show in, analysed once for this module."""
    if not all((SAMPLES / run / "metrics.csv").is_file() for run in SAMPLE_RUNS):
        pytest.skip(f"{SAMPLES} does not hold the runs {', '.join(SAMPLE_RUNS)}")
    from spectrum_cli.analysis import analyze

    root = tmp_path_factory.mktemp("samples") / "samples"
    root.mkdir()
    for run in SAMPLE_RUNS:
        (root / run).symlink_to(SAMPLES / run, target_is_directory=True)
    store = root.parent / "samples.zarr"
    assert analyze(root, store, top_k=32).ok
    return store


def series_by_step(rows: list[dict], run: str, layer: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if r["run"] == run and r["layer"] == layer}


def test_samples_weight_decay_keeps_cutting_rank_through_grokking(samples_store):
    rows = cli_json("rank", samples_store, "--layers", r"^0\.weight$")
    wd = series_by_step(rows, "modadd-wd", "0.weight", "effective_rank")
    nowd = series_by_step(rows, "modadd-nowd", "0.weight", "effective_rank")

    # The jump in validation accuracy, from the run's own training log.
    log = training_metrics(Store.open(samples_store), "modadd-wd")
    assert log is not None
    before = log["step"][np.flatnonzero(log["val_acc"] < 0.1)[-1]]  # last step below 10 %
    after = log["step"][np.flatnonzero(log["val_acc"] >= 0.9)[0]]  # first step at 90 %
    assert before < after

    # From before the jump to the end, every checkpoint has a lower effective rank than the
    # one before it, and the fall continues well past the jump.
    steps = [s for s in sorted(wd) if s >= before]
    assert len([s for s in steps if s > after]) >= 2
    assert all(wd[b] < wd[a] for a, b in pairwise(steps))
    last = max(wd)
    assert wd[last] < wd[min(s for s in steps if s >= after)] - 3
    assert wd[last] < nowd[last] - 10  # measured 80.2 against 97.7

    # The run without weight decay fits its training set but never generalises.
    plain = training_metrics(Store.open(samples_store), "modadd-nowd")
    assert plain is not None
    assert plain["train_acc"][-1] == 1.0 and plain["val_acc"].max() < 0.05


def test_samples_memorising_shuffled_labels_keeps_rank_high(samples_store):
    rows = cli_json("rank", samples_store, "--run", "digits-true", "--run", "digits-shuffled")
    for layer in ("0.weight", "2.weight"):  # the hidden layers
        true = series_by_step(rows, "digits-true", layer, "effective_rank")
        shuffled = series_by_step(rows, "digits-shuffled", layer, "effective_rank")
        last = max(true)
        assert shuffled[last] > 1.25 * true[last]  # measured 41.6 vs 29.6, 50.6 vs 34.4


def test_samples_top_directions_settle_first(samples_store):
    rows = cli_json("stability", samples_store, "--run", "digits-true")
    end = max(r["step"] for r in rows)
    for layer, share in (("0.weight", 0.5), ("2.weight", 0.25), ("4.weight", 0.25)):
        mine = [r for r in rows if r["layer"] == layer]
        scores = np.array([r["score"] for r in mine])
        steps = np.array([r["step"] for r in mine])

        # The top-10 score reaches 0.9 and stays there well before the end of training.
        below = np.flatnonzero(scores < 0.9)
        settled = steps[below[-1] + 1]
        assert settled <= share * end, (layer, settled)  # measured 3600, 1800, 1200 of 9600

        # Direction by direction, the top ten settle before the last ten stored.
        diagonal = np.array([r["diagonal"] for r in mine])  # (steps, 32)
        if diagonal.shape[1] < 20:
            continue
        per_index = []
        for i in range(diagonal.shape[1]):
            low = np.flatnonzero(diagonal[:, i] < 0.9)
            per_index.append(steps[low[-1] + 1] if len(low) else steps[0])
        top, bottom = np.median(per_index[:10]), np.median(per_index[-10:])
        assert top < bottom, (layer, per_index)  # measured 2700 vs 4800, 1200 vs 4200
