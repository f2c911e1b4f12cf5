"""``--scheduler``: the same store from a Dask cluster of separate processes as from a local run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_same_store, run_cli

from spectrum_cli.analysis import analyze
from spectrum_cli.store import Store

pytestmark = pytest.mark.slow


def _start(*args: str, cwd: Path, log: Path) -> subprocess.Popen:
    """A process in its own session, so that it and its children can be stopped together."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[str]:
    """A scheduler and two one-thread workers on 127.0.0.1, each a separate process.

    They run in a folder of their own, so that only absolute paths reach the checkpoints.
    """
    where = tmp_path / "cluster"
    where.mkdir()
    info = where / "scheduler.json"
    processes = [
        _start(
            "distributed.cli.dask_scheduler",
            *("--host", "127.0.0.1", "--port", "0", "--no-dashboard"),
            *("--scheduler-file", str(info)),
            cwd=where,
            log=where / "scheduler.log",
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            assert processes[0].poll() is None, (where / "scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        for name in ("w1", "w2"):
            processes.append(
                _start(
                    "distributed.cli.dask_worker",
                    address,
                    *("--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--name", name),
                    *("--host", "127.0.0.1", "--local-directory", str(where / name)),
                    cwd=where,
                    log=where / f"{name}.log",
                )
            )
        _wait_for_workers(address, 2, deadline)
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)


def _wait_for_workers(address: str, count: int, deadline: float) -> None:
    """Ask the scheduler (from a subprocess, leaving this one clean) until the workers are in."""
    script = (
        "import sys; from distributed import Client\n"
        f"with Client({address!r}, timeout='30s') as c:\n"
        f"    c.wait_for_workers({count}, timeout={max(1, deadline - time.monotonic()):.0f})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_a_remote_cluster_writes_the_store_a_local_run_does(scheduler, make_run, tmp_path):
    root = make_run("a", [0, 10, 20])
    make_run("b", [0, 5], suffix=".pt")
    broken = root / "b" / "step_7.pt"
    broken.write_bytes(b"not a checkpoint")
    local = analyze(root, tmp_path / "local.zarr")

    # From another folder and with a relative path: the workers must get absolute ones.
    done = run_cli(
        "analyze",
        "runs",
        *("--store", tmp_path / "remote.zarr", "--scheduler", scheduler, "--format", "json"),
        cwd=tmp_path,
    )

    summary = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert (summary["runs"], summary["analysed"], summary["matrices"]) == (2, 5, 15)
    (failure,) = summary["failed_checkpoints"]
    assert failure.startswith(f"{broken} (run b, step 7): cannot read {broken}")
    assert summary["failed_checkpoints"] == local.failed_checkpoints
    # Remote and local workers alike decompose each matrix on one BLAS thread: every bit agrees.
    assert_same_store(tmp_path / "remote.zarr", tmp_path / "local.zarr")
    assert (
        Store.open(tmp_path / "remote.zarr").checkpoints("a")[10]["path"]
        == "runs/a/step_10.safetensors"
    )


def test_an_unreachable_scheduler_exits_2_with_one_line(make_run, tmp_path):
    # Nothing was done: like a bad flag, not like a run that stored some and failed some.
    root = make_run("a", [0])

    done = run_cli(
        *("analyze", root, "--store", tmp_path / "s.zarr", "--scheduler", "tcp://127.0.0.1:9"),
        env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"},
    )

    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert not (tmp_path / "s.zarr").exists()
