"""``spectrum analyze`` and ``spectrum ls`` as a user meets them: streams, exit codes, messages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    _TERMINAL_VARIABLES,
    REAL,
    run_cli,
    run_cli_on_a_terminal,
    save_checkpoint,
    tiny_weights,
)

from spectrum_cli.cli import main
from spectrum_cli.store import Store

# Cursor movement, colour and carriage returns: what a progress bar writes.
CONTROL = re.compile(r"\x1b\[|\r")


@pytest.fixture
def spectrum(monkeypatch, capsys):
    """Run the real entry point in this process: ``spectrum(*args) -> (code, stdout, stderr)``."""
    for name in _TERMINAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def run(*args: str | Path) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spectrum", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_summary_on_stdout_and_nothing_else(spectrum, make_run, tmp_path):
    root = make_run("a", [0, 10])
    make_run("b", [5])
    store = tmp_path / "s.zarr"

    code, out, err = spectrum("analyze", root, "--store", store)

    assert code == 0
    (line,) = out.splitlines()
    assert line.startswith("2 runs, 3 checkpoints (3 analysed now, 0 already stored, 0 failed)")
    assert "9 matrices decomposed (0 failed) in " in line and line.endswith(f" s -> {store}")
    assert not CONTROL.search(out + err)
    assert "Traceback" not in err and "failed" not in err

    code, out, _ = spectrum("analyze", root, "--store", store)
    assert code == 0 and "(0 analysed now, 3 already stored, 0 failed)" in out


def test_json_summary_is_the_whole_stdout(spectrum, make_run, tmp_path):
    root = make_run("a", [0, 10])

    code, out, err = spectrum("analyze", root, "--store", tmp_path / "s.zarr", "--format", "json")

    summary = json.loads(out)
    assert code == 0 and summary["ok"] is True
    assert summary["store"] == str(tmp_path / "s.zarr")
    assert (summary["runs"], summary["checkpoints"], summary["analysed"]) == (1, 2, 2)
    assert summary["matrices"] == 6 and summary["seconds"] > 0
    assert summary["failed_checkpoints"] == [] and summary["failed_matrices"] == []
    assert "note: run a: 2 checkpoints" in err


def test_top_k_defaults_to_32_and_is_kept(spectrum, make_run, tmp_path):
    root = make_run("a", [0])
    assert spectrum("analyze", root, "--store", tmp_path / "d.zarr")[0] == 0
    assert spectrum("analyze", root, "--store", tmp_path / "k.zarr", "--top-k", "5")[0] == 0

    assert Store.open(tmp_path / "d.zarr").top_k == 32
    assert Store.open(tmp_path / "k.zarr").read("a", "fc.weight", ("u",)).u.shape == (1, 40, 5)
    code, _, err = spectrum("analyze", root, "--store", tmp_path / "k.zarr")
    assert code == 2
    assert err.strip().endswith(
        "keeps the top 5 singular vectors, not 32; pass --top-k 5 or another --store"
    )


def test_unreadable_checkpoints_fail_one_line_each_and_the_rest_is_stored(
    spectrum, make_run, tmp_path
):
    root = make_run("a", [0, 3])
    truncated = save_checkpoint(root / "a" / "step_1.safetensors", tiny_weights("a", 1))
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = root / "a" / "step_2.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    empty = root / "a" / "step_4.pt"
    empty.write_bytes(b"")

    code, out, err = spectrum("-q", "analyze", root, "--store", tmp_path / "s.zarr")

    assert code == 1
    assert "(2 analysed now, 0 already stored, 3 failed)" in out
    failures = [line for line in err.splitlines() if line.startswith("failed: ")]
    assert len(failures) == 3 and len(err.splitlines()) == 3
    for line, path, reason in zip(
        failures,
        (truncated, garbage, empty),
        ("truncated or not safetensors", "damaged or was not written by torch.save", "is empty"),
        strict=True,
    ):
        assert line.startswith(f"failed: {path} (run a, step ") and reason in line
    assert "documentation" not in err and "Traceback" not in err
    assert Store.open(tmp_path / "s.zarr").done_steps("a") == [0, 3]


def test_a_non_finite_matrix_exits_1_with_its_layer(spectrum, make_run, tmp_path):
    root = make_run("a", [0])
    weights = tiny_weights("a", 1)
    weights["conv.weight"][0, 0, 0, 0] = float("-inf")
    save_checkpoint(root / "a" / "step_1.pt", weights)

    code, out, err = spectrum("analyze", root, "--store", tmp_path / "s.zarr")

    assert code == 1 and "6 matrices decomposed (1 failed)" in out
    (line,) = [line for line in err.splitlines() if line.startswith("failed:")]
    assert line.endswith("(run a, step 1) layer conv.weight: non-finite entries (1 -Inf of 216)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "Missing argument 'checkpoints'"),
        (("nowhere",), "nowhere does not exist"),
        (("RUNS", "--device", "tpu"), "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        (("RUNS", "--device", "cuda:x"), "--device must be auto, cpu, cuda or cuda:N"),
        (("RUNS", "--top-k", "0"), "Invalid value for '--top-k': must be greater than or equal"),
        (("RUNS", "--top-k", "many"), "Invalid value for '--top-k'"),
        (("RUNS", "--format", "xml"), "Invalid value for '--format'"),
        (("RUNS", "--format", "csv"), "Invalid value for '--format': 'csv' is not one of"),
        (("RUNS", "--scheduler", "nowhere"), "--scheduler 'nowhere' is not a Dask scheduler"),
        (("RUNS", "--no-such-flag"), "No such option"),
    ],
)
def test_bad_usage_exits_2_with_one_line(spectrum, make_run, tmp_path, args, message):
    root = make_run("a", [0])
    args = tuple(root if arg == "RUNS" else arg for arg in args)

    code, out, err = spectrum("analyze", *args, "--store", tmp_path / "s.zarr")

    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "s.zarr").exists()


def test_ls_lists_runs_steps_layers_shapes_and_status(spectrum, make_run, tmp_path):
    root = make_run("a", [0, 10])
    make_run("sweep/b", [5])
    weights = tiny_weights("a", 20)
    weights["fc.weight"][0, 0] = float("nan")
    save_checkpoint(root / "a" / "step_20.safetensors", weights)
    store = tmp_path / "s.zarr"
    spectrum("analyze", root, "--store", store)

    code, out, err = spectrum("ls", store, "--format", "json")

    listing = json.loads(out)
    assert code == 0 and err == "" and listing["top_k"] == 32
    assert [run["run"] for run in listing["runs"]] == ["a", "sweep/b"]
    a, b = listing["runs"]
    assert a["steps"] == [0, 10, 20] and b["steps"] == [5]
    assert [layer["layer"] for layer in a["layers"]] == ["conv.weight", "fc.weight", "head.weight"]
    conv, fc, _ = a["layers"]
    assert conv["tensor_shape"] == [8, 3, 3, 3] and conv["matrix_shape"] == [8, 27]
    assert (conv["dtype"], conv["done"], conv["failed"]) == ("float32", 3, 0)
    assert (fc["done"], fc["failed"]) == (2, 1) and "1 NaN" in fc["failures"]["20"]

    code, out, _ = spectrum("ls", store)
    assert code == 0
    rows = [line for line in out.splitlines() if "fc.weight" in line]
    assert len(rows) == 2 and "40x24" in rows[0] and "0..20 (3)" in rows[0]
    assert not CONTROL.search(out)

    code, out, _ = spectrum("ls", store, "--format", "csv")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1 + 6
    assert lines[0] == "run,steps,layer,tensor_shape,matrix_shape,dtype,done,failed"
    assert lines[2] == "a,3,fc.weight,40x24,40x24,float32,2,1"


def test_ls_folds_long_names_and_never_cuts_them(spectrum, make_run, tmp_path):
    run = "digits-shuffled-labels-seed-1234567/spawn-sweep-learning-rate-0.001"
    layer = "encoder.layers.11.attention.self.query_key_value.weight"
    root = make_run(run, [0, 10], layers={layer: ((12, 8), torch.float32)})
    store = tmp_path / "s.zarr"
    assert spectrum("analyze", root, "--store", store)[0] == 0

    # Piped into an 80-column console, as `COLUMNS=80 spectrum ls | less` is.
    done = run_cli("ls", store, env={"COLUMNS": "80"})

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].strip() == f"{store} (top 32 vectors)"  # the whole path, too
    assert max(len(line) for line in lines[1:]) <= 80 and "…" not in done.stdout
    # The run on lines of its own, then its layer with the numbers on the layer's first line:
    # each name breaks only after a separator and reads whole when its lines are joined.
    texts = [line.strip() for line in lines]
    start = next(i for i, text in enumerate(texts) if text and run.startswith(text))
    pieces: list[str] = []
    while "".join(pieces) != run:
        pieces.append(texts[start + len(pieces)])
        assert run.startswith("".join(pieces)), pieces
    first = start + len(pieces)
    assert "12x8" in lines[first] and "0..10 (2)" in lines[first]
    parts: list[str] = []
    while "".join(parts) != layer:
        parts.append(texts[first + len(parts)].split()[0])
        assert layer.startswith("".join(parts)), parts
    assert all(piece[-1] in "/._-" for piece in pieces[:-1] + parts[:-1]), (pieces, parts)


def test_piped_tables_keep_each_row_on_one_line_for_grep(make_run, tmp_path, monkeypatch):
    run = "digits-shuffled-labels-seed-1234567/spawn-sweep-learning-rate-0.001"
    layer = "encoder.layers.11.attention.self.query_key_value.weight"
    root = make_run(run, [0, 10], layers={layer: ((12, 8), torch.float32)})
    store = tmp_path / "s.zarr"
    assert run_cli("analyze", root, "--store", store).returncode == 0
    monkeypatch.delenv("COLUMNS", raising=False)

    for command in ("ls", "rank"):
        done = run_cli(command, store)

        assert done.returncode == 0, done.stderr
        (row,) = [line for line in done.stdout.splitlines() if layer in line]
        assert "12" in row and "8" in row  # the layer's shape, on the same line


def test_ls_of_a_missing_store_is_one_line(spectrum, tmp_path):
    code, out, err = spectrum("ls", tmp_path / "missing.zarr")

    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("error: ") and "does not exist; run `spectrum analyze" in line


def _drop_u(layer: Path) -> None:
    shutil.rmtree(layer / "u")


def _blank_sigma_document(layer: Path) -> None:
    (layer / "sigma" / "zarr.json").write_text("{}")


def _garble_status(layer: Path) -> None:
    (layer / "status" / "c" / "0").write_bytes(b"xx")


def _checkpoints_as_text(layer: Path) -> None:
    document = layer.parent / "zarr.json"
    meta = json.loads(document.read_text())
    meta["attributes"]["checkpoints"] = "0"
    document.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage", [_drop_u, _blank_sigma_document, _garble_status, _checkpoints_as_text]
)
def test_a_damaged_store_stops_analyze_and_ls_in_one_line(make_run, tmp_path, damage):
    root = make_run("run", [0])
    store = tmp_path / "s.zarr"
    assert run_cli("analyze", root, "--store", store).returncode == 0
    make_run("run", [1])
    damage(store / "run" / "fc.weight")
    before = _stored(store)

    # ls reads the steps and status alone: the damage it sees stops it too.
    sees = damage in (_garble_status, _checkpoints_as_text)
    for args in (("analyze", root, "--store", store), ("ls", store))[: 2 if sees else 1]:
        done = run_cli(*args)
        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("error: cannot ") and "the store is damaged" in line
    assert _stored(store) == before


def _stored(store: Path) -> tuple[object, list[list[float]]]:
    """What the run says is done, and the stored singular values of its undamaged layers."""
    import zarr

    run = json.loads((store / "run" / "zarr.json").read_text())["attributes"]
    sigma = [
        zarr.open_array(store / "run" / layer / "sigma", mode="r")[0].tolist()
        for layer in ("conv.weight", "head.weight")
    ]
    return run["checkpoints"], sigma


def test_a_closed_stderr_lets_a_verbose_analyze_finish(make_run, tmp_path):
    # As `spectrum -v analyze ... 2>&1 | head -3`: Dask's threads log into a closed pipe.
    root = make_run("a", [0, 1])
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spectrum_cli",
            "-v",
            "analyze",
            root,
            "--store",
            tmp_path / "s.zarr",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr.read(10)
        process.stderr.close()
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()
    assert Store.open(tmp_path / "s.zarr").done_steps("a") == [0, 1]


def test_piped_subprocess_shows_no_progress(make_run, tmp_path):
    root = make_run("a", [0, 1])

    done = run_cli("analyze", root, "--store", tmp_path / "s.zarr")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 run, 2 checkpoints") and len(done.stdout.splitlines()) == 1
    assert not CONTROL.search(done.stdout + done.stderr)


@pytest.mark.skipif(not (REAL / "mnist-two-seeds").is_dir(), reason="real checkpoints absent")
def test_torch_save_files_in_a_fresh_process_all_decompose(tmp_path):
    # Here worker threads import torch to read the files while others decompose: no thread
    # may see torch half-imported.
    done = run_cli("analyze", REAL / "mnist-two-seeds", "--store", tmp_path / "s.zarr")

    assert done.returncode == 0, done.stderr
    assert all(line.startswith("note: run edpt") for line in done.stderr.splitlines())
    assert done.stdout.startswith("2 runs, 10 checkpoints")


@pytest.mark.parametrize("quiet", [None, "before the command", "after it"])
def test_progress_only_on_a_terminal_and_never_on_stdout(make_run, tmp_path, quiet):
    root = make_run("a", list(range(6)))
    args = ["analyze", root, "--store", tmp_path / "s.zarr"]
    if quiet == "before the command":
        args = ["--quiet", *args]
    elif quiet == "after it":
        args = [*args, "-q"]

    done, stderr = run_cli_on_a_terminal(*args)

    assert done.returncode == 0, stderr
    assert done.stdout.decode().startswith("1 run, 6 checkpoints")
    assert not CONTROL.search(done.stdout.decode())
    if quiet:
        assert stderr == ""
    else:
        assert "decomposing" in stderr and CONTROL.search(stderr)


def test_global_flags_move_before_the_command_but_not_past_a_double_dash():
    from spectrum_cli.cli import _global_flags_first

    assert _global_flags_first(["ls", "s.zarr", "-v", "--format", "json", "--quiet"]) == [
        "-v",
        "--quiet",
        "ls",
        "s.zarr",
        "--format",
        "json",
    ]
    assert _global_flags_first(["analyze", "-q", "--", "-v"]) == ["-q", "analyze", "--", "-v"]


def test_the_command_ends_with_main_s_exit_code_and_its_output_whole(make_run, tmp_path):
    root = make_run("a", [0, 1])
    analyze = run_cli("analyze", root, "--store", tmp_path / "s.zarr", "--format", "json")
    assert analyze.returncode == 0, analyze.stderr
    assert json.loads(analyze.stdout)["analysed"] == 2

    # Piped, stdout is block-buffered: all of it arrives although the process skips its teardown.
    listed = run_cli("ls", tmp_path / "s.zarr", "--format", "json")
    assert listed.returncode == 0 and json.loads(listed.stdout)
    missing = run_cli("ls", tmp_path / "missing.zarr")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


@pytest.mark.parametrize(("raised", "code"), [(None, 0), (3, 3), ("a message", 1)])
def test_entry_exits_with_what_main_raised(monkeypatch, capsys, raised, code):
    import spectrum_cli.cli as cli

    class Ended(Exception):
        pass

    def main() -> None:
        print("result")
        if raised is not None:
            sys.exit(raised)

    def leave(status: int) -> None:
        raise Ended(status)

    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.os, "_exit", leave)
    with pytest.raises(Ended) as ended:
        cli.entry()

    assert ended.value.args == (code,)
    out, err = capsys.readouterr()
    assert out == "result\n"
    assert err == ("a message\n" if isinstance(raised, str) else "")


def test_help_is_fast_to_import():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys, spectrum_cli.cli; print(json.dumps(list(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = set(json.loads(done.stdout))
    assert not loaded & {"torch", "zarr", "distributed", "dask"}


def test_the_readme_says_what_each_kind_of_bad_input_does():
    from spectrum_cli.errors import StoreError, UsageError

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Bad inputs and what happens\n")[1].split("\n#")[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    header, _, *rows = rows
    exits = {row[0].split(":")[0].strip(): row[-1].strip() for row in rows}

    assert [cell.strip() for cell in header] == ["input", "what `analyze` does", "exit"]
    assert list(exits) == [
        "Unreadable files",
        "Untrusted pickles",
        "Numerics",
        "Inconsistent runs",
        "The store",
        "The command line",
    ]
    assert exits["The store"].startswith(f"{StoreError.exit_code};")
    assert exits["The command line"] == str(UsageError.exit_code)
