"""``spectrum report``: one self-contained page, checked as text and in a headless browser."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli_on_a_terminal
from typer.testing import CliRunner

from spectrum_cli import __version__
from spectrum_cli.cli import app
from spectrum_cli.errors import UsageError
from spectrum_cli.store import LayerResult, Store

# analyze's in-process Dask scheduler binds the default HTTP port 8787 and warns when another
# cluster on this machine holds it; that says nothing about the spectra tested here.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use:UserWarning")

CHROMIUM = Path("/usr/bin/chromium")

# Run in the browser before the page's own content: record errors, then, once loaded, the
# state of every image, into an element that --dump-dom prints.
CHECK = """<script>
window.__errors = [];
window.addEventListener("error",
  e => window.__errors.push(String(e.message || e.target.src)), true);
window.addEventListener("load", () => {
  const images = [...document.images].map(i => i.complete && i.naturalWidth > 0);
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify({images, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> tuple[Path, Path]:
    """Two runs of a small conv + dense network, analysed, with a training log for one."""
    from safetensors.numpy import save_file

    from spectrum_cli.analysis import analyze

    root = tmp_path_factory.mktemp("report") / "runs"
    rng = np.random.default_rng(0)
    for run in ("seed-1", "seed-2"):
        for step in (0, 50, 100):
            weights = {
                "conv1.weight": rng.standard_normal((8, 3, 3, 3)),
                "conv2.weight": rng.standard_normal((16, 8, 3, 3)),
                "fc1.weight": rng.standard_normal((32, 16)),
                "fc2.weight": rng.standard_normal((10, 32)),
            }
            (root / run).mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.astype(np.float32) for k, v in weights.items()},
                root / run / f"step_{step}.safetensors",
            )
    (root / "seed-1" / "metrics.csv").write_text(
        "step,train_loss,train_acc,val_loss,val_acc\n"
        "0,2.3,0.1,2.3,0.1\n50,0.5,0.8,0.7,0.75\n100,0.1,0.97,0.6,0.8\n"
    )
    store = root.parent / "s.zarr"
    assert analyze(root, store, top_k=8).ok
    out = root.parent / "report"
    result = CliRunner().invoke(app, ["report", str(store), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.exception
    written = json.loads(result.stdout)
    assert written["page"] == str(out / "index.html")
    return store, out / "index.html", written


def small_store(path: Path, runs: list[str], failed: tuple[tuple[int, str], ...] = ()) -> Path:
    """A store of dense runs fc1 (6 × 4) → fc2 (3 × 6) at steps 0 and 10, without logs.

    Each (step, layer) in ``failed`` is stored as a failure in every run.
    """
    rng = np.random.default_rng(1)
    with Store.writing(path, top_k=3) as store:
        for run in runs:
            store.add_steps(run, [0, 10])
            for step in (0, 10):
                results = []
                for layer, (m, n) in (("fc1.weight", (6, 4)), ("fc2.weight", (3, 6))):
                    u, sigma, vt = np.linalg.svd(rng.standard_normal((m, n)), full_matrices=False)
                    if (step, layer) in failed:
                        results.append(
                            LayerResult(layer, (m, n), (m, n), "float32", "test", failure="NaN")
                        )
                        continue
                    results.append(
                        LayerResult(
                            layer,
                            (m, n),
                            (m, n),
                            "float32",
                            "test",
                            sigma=sigma.astype(np.float32),
                            u=u[:, :3].astype(np.float32),
                            v=vt[:3].T.astype(np.float32),
                        )
                    )
                store.write_checkpoint(run, step, results, {"path": f"{run}/step_{step}.pt"})
    return path


def test_report_holds_figures_tables_and_provenance(report_page):
    store, page, _ = report_page
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>")

    # Three figures per run, all embedded PNG; nothing fetched from anywhere.
    sources = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert len(sources) == 6
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", text)
    assert "<script" not in text

    # What was analysed and how.
    for expected in (
        str(store.resolve()),
        "seed-1",
        "seed-2",
        "conv2.weight",
        "16×72",
        "0..100 (3)",
        f"spectrum {__version__}",
        "Roy &amp; Vetterli",
        "metrics.csv",
    ):
        assert expected in text, expected
    assert "none found" in text  # seed-2 has no training log
    assert text.count("<h2 id='run-") == 2


def test_report_json_lists_the_page_figures_and_training_logs(report_page):
    store, page, written = report_page
    assert written["store"] == str(store)
    assert [entry["run"] for entry in written["runs"]] == ["seed-1", "seed-2"]
    seed_1, seed_2 = written["runs"]
    assert seed_1["training_log"] == str(store.parent / "runs" / "seed-1" / "metrics.csv")
    assert seed_2["training_log"] is None
    assert (seed_1["layers"], seed_1["steps"]) == (4, [0, 50, 100])
    text = page.read_text(encoding="utf-8")
    for entry in written["runs"]:
        assert f"<h2 id='{entry['anchor']}'>" in text
        assert sorted(entry["figures"]) == ["alignment", "rank", "stability"]
        for path in entry["figures"].values():
            figure = Path(path)
            assert figure.parent == page.parent / "figures"
            assert figure.read_bytes().startswith(b"\x89PNG")
            # The file is the very image the page embeds.
            embedded = base64.b64encode(figure.read_bytes()).decode("ascii")
            assert f"src='data:image/png;base64,{embedded}'" in text


def test_runs_whose_names_differ_only_in_separators_get_their_own_figures(tmp_path):
    store = small_store(tmp_path / "s.zarr", ["a/b", "a_b"])
    result = CliRunner().invoke(app, ["report", str(store), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.exception
    assert result.stdout.strip() == str(tmp_path / "rep" / "index.html")

    text = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    anchors = re.findall(r"<h2 id='([^']*)'>", text)
    assert len(anchors) == 2 and len(set(anchors)) == 2
    assert all(f"href='#{anchor}'" in text for anchor in anchors)
    figures = sorted(p.name for p in (tmp_path / "rep" / "figures").iterdir())
    assert len(figures) == 6 and "a_b-rank.png" in figures


def test_report_of_chosen_runs_and_layers_only(tmp_path):
    store = small_store(tmp_path / "s.zarr", ["keep", "drop"])
    out = tmp_path / "rep"
    args = ["report", str(store), "--out", str(out), "--run", "keep", "--layers", "fc1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.exception

    text = (out / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<h2 id='([^']*)'>", text) == ["run-keep"]
    # Every table speaks of fc1 alone, but for the layer it aligns with, which --layers keeps.
    named = [[c for c in cells if c.endswith(".weight")] for cells in _table_rows(text)]
    named = [names for names in named if names]
    assert len(named) == 4  # the layers, rank, stability and alignment tables
    assert {names[0] for names in named} == {"fc1.weight"}
    assert [names[1:] for names in named] == [[], [], [], ["fc2.weight"]]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "keep-alignment.png",
        "keep-rank.png",
        "keep-stability.png",
    ]


@pytest.mark.parametrize("choice", [["--run", "nope"], ["--layers", "conv"]])
def test_a_selection_of_nothing_stops_before_writing(choice, tmp_path):
    store = small_store(tmp_path / "s.zarr", ["r"])
    out = tmp_path / "rep"
    done = CliRunner().invoke(app, ["report", str(store), "--out", str(out), *choice])
    assert isinstance(done.exception, UsageError) and done.exception.exit_code == 2
    assert choice[1] in str(done.exception)
    assert not (out / "index.html").exists()


def test_report_lists_the_steps_at_which_each_layer_failed(tmp_path):
    store = small_store(tmp_path / "s.zarr", ["r"], failed=((10, "fc2.weight"), (0, "fc2.weight")))
    out = tmp_path / "rep"
    result = CliRunner().invoke(app, ["report", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.exception

    text = (out / "index.html").read_text(encoding="utf-8")
    # The Layers table ends with the steps at which each layer failed.
    failed = {cells[1]: cells[-1] for cells in _table_rows(text) if len(cells) == 7}
    assert failed == {"fc1.weight": "none", "fc2.weight": "0, 10"}


def _table_rows(text: str) -> list[list[str]]:
    """The cells of every table row of a page that holds data, headers left out."""
    rows = re.findall(r"<tr>(.*?)</tr>", text, flags=re.S)
    return [cells for row in rows if (cells := re.findall(r"<td[^>]*>([^<]*)</td>", row))]


@pytest.mark.parametrize("where", ["a file", "/proc/nope"])
def test_a_bad_output_folder_stops_before_any_work(where, tmp_path, monkeypatch):
    from spectrum_cli import dynamics

    store = small_store(tmp_path / "s.zarr", ["r"])
    out = tmp_path / "taken"
    out.write_text("mine")
    if where != "a file":
        out = Path(where)

    def no_work(*args, **kwargs):
        raise AssertionError("the output folder was not checked first")

    monkeypatch.setattr(dynamics, "rank_series", no_work)
    done = CliRunner().invoke(app, ["report", str(store), "--out", str(out)])
    assert isinstance(done.exception, UsageError) and done.exception.exit_code == 2
    assert str(out) in str(done.exception)
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.parametrize("quiet", [False, True])
def test_report_progress_only_on_a_terminal(quiet, tmp_path):
    store = small_store(tmp_path / "s.zarr", ["r1", "r2"])
    flags = ["--quiet"] if quiet else []

    done, stderr = run_cli_on_a_terminal(*flags, "report", store, "--out", tmp_path / "rep")

    assert done.returncode == 0, stderr
    assert done.stdout.decode().strip() == str(tmp_path / "rep" / "index.html")
    if quiet:
        assert stderr == ""
    else:
        assert "report" in stderr and re.search(r"\x1b\[|\r", stderr)
        assert "note: run r1: no metrics.csv found" in stderr


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_report_renders_in_a_headless_browser(report_page, tmp_path):
    _, page, _ = report_page
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("<head>", "<head>" + CHECK, 1))

    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="report-check">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stdout[-2000:]
    state = json.loads(html.unescape(found.group(1)))
    assert state["images"] == [True] * 6
    assert state["errors"] == []
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
