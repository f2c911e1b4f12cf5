"""The checkpoint readers under damaged and hostile bytes: only spectrum's own errors come out.

Valid checkpoints of every format spectrum reads (safetensors, zip-format and legacy
``torch.save`` files, a Lightning checkpoint whose hyper-parameters need stand-ins, a sharded
Hugging Face directory) are mutated by bit flips, truncations, insertions and overwrites, and
handed to `load_tensors`, `read_metadata` and `discover`. Each either reads the checkpoint or
raises a `SpectrumError` that names the path; none may raise anything else, and none may take
long: each example runs on a thread with a hard time bound, under hypothesis' deadline too.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import struct
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from spectrum_cli.checkpoints import discover, load_tensors, read_metadata
from spectrum_cli.errors import SpectrumError

# A read of a tiny file takes milliseconds; these bounds only catch a hang, on a busy machine.
HARD_BOUND_S = 60.0
FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _weights() -> OrderedDict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("conv.weight", torch.randn(4, 2, 3, 3, generator=generator)),
            ("conv.bias", torch.randn(4, generator=generator)),
            ("fc.weight", torch.randn(3, 8, generator=generator).to(torch.bfloat16)),
            ("steps", torch.arange(3)),
        ]
    )


def _torch_bytes(obj: object, zipped: bool = True) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=zipped)
    return buffer.getvalue()


@functools.cache
def seeds() -> dict[str, tuple[str, bytes]]:
    """Valid checkpoints, by kind: (file suffix, bytes)."""
    lightning = {
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in _weights().items()),
        "global_step": 7,
        "pytorch-lightning_version": "2.4",
        "hyper_parameters": {"loss": torch.nn.CrossEntropyLoss(), "lr": 0.1},
    }
    return {
        "safetensors": (
            ".safetensors",
            save(dict(_weights()), metadata={"step": "7", "spectrum": '{"step": 7}'}),
        ),
        "zip": (".pt", _torch_bytes({"model_state": _weights(), "epoch": 3})),
        "legacy": (".pth", _torch_bytes(_weights(), zipped=False)),
        "lightning": (".ckpt", _torch_bytes(lightning)),
    }


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` after one to four bit flips, truncations, insertions or overwrites."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if how == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del out[at:]
        elif how == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[at : at + len(chunk)] = chunk
    return bytes(out)


def read_everything(path: Path) -> None:
    """What analyze does with a checkpoint: discover it, read metadata, load and touch tensors,
    as torch tensors and as the NumPy arrays analyze reads."""
    read_metadata(path)
    for numpy in (False, True):
        for _, tensor in load_tensors(path, numpy=numpy):
            # Memory-mapped bytes are read only here.
            if isinstance(tensor, np.ndarray):
                tensor.astype(np.float64).sum()
            else:
                tensor.to(torch.float64).sum()


def assert_only_spectrum_errors(action: Callable[[], Any], path: Path) -> None:
    """Run ``action`` on a thread within the hard bound; only a SpectrumError may escape it."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # collected and judged below, on the test's thread
            raised.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HARD_BOUND_S)
    assert not worker.is_alive(), f"reading {path.name} did not finish in {HARD_BOUND_S} s"
    if raised and not isinstance(raised[0], SpectrumError):
        raise AssertionError(f"{type(raised[0]).__name__} escaped the readers") from raised[0]
    if raised:
        assert path.name in str(raised[0]) or str(path.parent) in str(raised[0])


def check_file(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        # A stepped name is read by load_tensors; an unstepped one by discover, for its step.
        stepped = Path(folder) / "run" / f"step_1{suffix}"
        unstepped = Path(folder) / "other" / f"final{suffix}"
        for path in (stepped, unstepped):
            path.parent.mkdir()
            path.write_bytes(data)
        assert_only_spectrum_errors(lambda: read_everything(stepped), stepped)
        assert_only_spectrum_errors(lambda: discover(unstepped.parent), unstepped)
        assert_only_spectrum_errors(lambda: discover(Path(folder)), unstepped)


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy", "lightning"])
def test_the_seeds_read_cleanly(kind: str) -> None:
    suffix, data = seeds()[kind]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"step_1{suffix}"
        path.write_bytes(data)
        names = [name for name, _ in load_tensors(path)]
    assert sorted(names) == sorted(_weights())


@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy", "lightning"])
@FUZZ
@given(data=st.data())
def test_mutated_checkpoints_raise_only_spectrum_errors(kind: str, data: st.DataObject) -> None:
    suffix, seed = seeds()[kind]
    check_file(data.draw(mutated(seed), label="bytes"), suffix)


@FUZZ
@given(data=st.data(), target=st.sampled_from(["index", "model-00001-of-00002.safetensors"]))
def test_mutated_sharded_checkpoints_raise_only_spectrum_errors(
    data: st.DataObject, target: str
) -> None:
    weights = _weights()
    shards = {
        "model-00001-of-00002.safetensors": save({"conv.weight": weights["conv.weight"]}),
        "model-00002-of-00002.safetensors": save({"fc.weight": weights["fc.weight"]}),
    }
    weight_map = {"conv.weight": "model-00001-of-00002.safetensors"}
    weight_map["fc.weight"] = "model-00002-of-00002.safetensors"
    files = shards | {"model.safetensors.index.json": json.dumps({"weight_map": weight_map})}
    name = "model.safetensors.index.json" if target == "index" else target
    files[name] = data.draw(mutated(files[name].encode() if target == "index" else files[name]))
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "run" / "checkpoint-10"
        checkpoint.mkdir(parents=True)
        for file, content in files.items():
            (checkpoint / file).write_bytes(
                content.encode() if isinstance(content, str) else content
            )
        assert_only_spectrum_errors(lambda: read_everything(checkpoint), checkpoint)
        assert_only_spectrum_errors(lambda: discover(Path(folder)), checkpoint)


# Generated headers and state dicts: structure rather than bytes.

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_SPEC = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X"]) | _JSON,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _JSON,
        "data_offsets": st.lists(st.integers(-2, 64), max_size=3) | _JSON,
    },
)


@FUZZ
@given(
    header=st.dictionaries(
        st.text(max_size=6) | st.just("__metadata__"), _SPEC | _JSON, max_size=4
    ),
    body=st.binary(max_size=64),
)
def test_generated_safetensors_headers_raise_only_spectrum_errors(
    header: dict[str, Any], body: bytes
) -> None:
    encoded = json.dumps(header).encode()
    check_file(struct.pack("<Q", len(encoded)) + encoded + body, ".safetensors")


_LEAF = (
    st.none()
    | st.integers()
    | st.text(max_size=6)
    | st.builds(lambda n: torch.ones(n, 2), st.integers(0, 3))
    | st.builds(lambda n: torch.zeros(n, dtype=torch.int8), st.integers(0, 3))
)
_STATE = st.recursive(
    _LEAF,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=12) | st.integers(), children, max_size=4)
    ),
    max_leaves=10,
)


@FUZZ
@given(state=_STATE, zipped=st.booleans())
def test_generated_pickled_objects_raise_only_spectrum_errors(state: Any, zipped: bool) -> None:
    check_file(_torch_bytes(state, zipped=zipped), ".pt")


def _nested(depth: int) -> dict[str, Any]:
    nested: dict[str, Any] = {"weight": torch.ones(2, 2)}
    for _ in range(depth):
        nested = {"inner": nested}
    return nested


def _contains_itself() -> dict[str, Any]:
    state: dict[str, Any] = {"fc.weight": torch.ones(2, 2)}
    state["state_dict"] = state
    return state


@contextlib.contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(saved)


@pytest.mark.parametrize(
    "make", [lambda: _nested(2000), _contains_itself], ids=["nested-2000-deep", "self-containing"]
)
def test_pickles_that_nest_without_end_are_refused(make: Callable[[], Any], tmp_path: Path) -> None:
    path = tmp_path / "step_1.pt"
    with _recursion_limit(10_000):  # torch.save itself recurses
        torch.save(make(), path)

    with pytest.raises(
        SpectrumError, match=r"nest more than \d+ levels deep or contain themselves"
    ):
        list(load_tensors(path))


def test_json_headers_that_nest_without_end_are_refused(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "step_1.safetensors"
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    index = tmp_path / "checkpoint-1"
    index.mkdir()
    (index / "model.safetensors.index.json").write_bytes(b'{"weight_map": ' + deep + b"}")

    for action in (lambda: list(load_tensors(path)), lambda: read_metadata(path)):
        with pytest.raises(SpectrumError, match=f"safetensors header of {path}"):
            action()
    with pytest.raises(SpectrumError, match="cannot read the shard index"):
        list(load_tensors(index))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["safetensors", "zip", "legacy", "lightning"])
@settings(FUZZ, max_examples=1500)
@given(data=st.data())
def test_many_mutated_checkpoints_raise_only_spectrum_errors(
    kind: str, data: st.DataObject
) -> None:
    suffix, seed = seeds()[kind]
    check_file(data.draw(mutated(seed), label="bytes"), suffix)
