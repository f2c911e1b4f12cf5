"""The decomposition engine against float64 references on matrices with known spectra."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrum_cli import spectra
from spectrum_cli.spectra import (
    DecompositionError,
    _decompose_on_device,
    decompose,
    decompose_batch,
    one_blas_thread,
)


def known_spectrum(m: int, n: int, sigma: np.ndarray, seed: int) -> tuple[torch.Tensor, ...]:
    """A float32 matrix U diag(σ) Vᵀ with random orthonormal U (m, r) and V (n, r)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    w = (u * torch.from_numpy(sigma)) @ v.T
    return w.to(torch.float32), u, v


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (256, 256), (1, 40), (40, 1)])
def test_singular_values_match_float64_reference(shape):
    m, n = shape
    r = min(m, n)
    sigma = np.logspace(0, -4, r)  # decaying, 1 to 1e-4
    w, _, _ = known_spectrum(m, n, sigma, seed=m * 7 + n)
    reference = torch.linalg.svdvals(w.to(torch.float64)).numpy()

    spectrum = decompose(w, top_k=32)

    assert spectrum.sigma.dtype == np.float32
    assert spectrum.sigma.shape == (r,)
    resolved = reference >= 1e-3 * reference[0]
    rel = np.abs(spectrum.sigma[resolved] - reference[resolved]) / reference[resolved]
    assert rel.max() < 1e-5


@pytest.mark.parametrize("condition", [1e10, 1e20, 1e30])
@pytest.mark.parametrize("shape", [(200, 120), (120, 200), (64, 64)])
def test_ill_conditioned_matrices_give_the_float64_singular_values(shape, condition):
    m, n = shape
    sigma = np.logspace(0, -np.log10(condition), min(m, n))
    w, _, _ = known_spectrum(m, n, sigma, seed=int(np.log10(condition)) + m)
    reference = torch.linalg.svdvals(w.to(torch.float64)).numpy()

    spectrum = decompose(w, top_k=16)

    # Resolved values to 1e-5; the rest within float32 rounding of σ₁, finite and sorted.
    resolved = reference >= 1e-3 * reference[0]
    rel = np.abs(spectrum.sigma[resolved] - reference[resolved]) / reference[resolved]
    assert rel.max() < 1e-5
    np.testing.assert_allclose(spectrum.sigma, reference, rtol=0, atol=1e-6 * reference[0])
    assert np.isfinite(spectrum.sigma).all() and (spectrum.sigma >= 0).all()
    assert (np.diff(spectrum.sigma) <= 0).all()
    assert np.isfinite(spectrum.u).all() and np.isfinite(spectrum.v).all()


def _many_rows(m: int, n: int) -> None:
    """A matrix of m rows (or, transposed, columns) against a float64 reference."""
    tall, _, _ = known_spectrum(m, n, np.logspace(0, -2, n), seed=m + n)
    for w in (tall, tall.T):
        u, sigma, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
        spectrum = decompose(w, top_k=8)

        np.testing.assert_allclose(spectrum.sigma, sigma.numpy(), rtol=1e-5)
        gaps = -np.diff(sigma.numpy())
        gap = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf])[:8]
        separated = gap > 1e-3 * float(sigma[0])
        assert separated.sum() >= 4
        cos_u = np.abs(np.sum(spectrum.u * u[:, :8].numpy(), axis=0))
        cos_v = np.abs(np.sum(spectrum.v * vh[:8].T.numpy(), axis=0))
        assert cos_u[separated].min() >= 0.999 and cos_v[separated].min() >= 0.999


def test_tens_of_thousands_of_rows():
    _many_rows(30_000, 64)


@pytest.mark.slow
def test_sixty_thousand_rows_by_512():
    _many_rows(60_000, 512)


def test_top_vectors_match_where_separated():
    m, n, k = 200, 150, 16
    sigma = np.concatenate([10.0 * 0.8 ** np.arange(k), np.full(150 - k, 0.01)])
    w, u_true, v_true = known_spectrum(m, n, sigma, seed=3)

    spectrum = decompose(w, top_k=k)

    assert spectrum.u.shape == (m, k) and spectrum.v.shape == (n, k)
    cos_u = np.abs(np.sum(spectrum.u * u_true[:, :k].numpy(), axis=0))
    cos_v = np.abs(np.sum(spectrum.v * v_true[:, :k].numpy(), axis=0))
    assert cos_u.min() >= 0.999 and cos_v.min() >= 0.999


def test_where_inverse_iteration_does_not_converge_mrrr_gives_the_same_vectors(monkeypatch):
    m, n, k = 400, 300, 12  # n above spectra._SMALL: the tridiagonal route
    sigma = np.concatenate([10.0 * 0.8 ** np.arange(k), np.linspace(0.5, 0.01, n - k)])
    w, _, _ = known_spectrum(m, n, sigma, seed=5)
    calls = []
    inverse_iteration = spectra.lapack.stein

    def not_converged(d, e, values):
        calls.append(len(values))
        vectors, _ = inverse_iteration(d, e, values)
        return vectors, 1  # as dstein says when one vector did not converge

    mrrr = spectra.lapack.stemr_top

    def by_mrrr(d, e, wanted):
        calls.append("mrrr")
        return mrrr(d, e, wanted)

    expected = decompose(w, top_k=k)
    monkeypatch.setattr(spectra.lapack, "stein", not_converged)
    monkeypatch.setattr(spectra.lapack, "stemr_top", by_mrrr)
    fallen_back = decompose(w, top_k=k)

    assert calls == [k, "mrrr"]
    np.testing.assert_array_equal(fallen_back.sigma, expected.sigma)
    np.testing.assert_allclose(fallen_back.u, expected.u, atol=1e-6)
    np.testing.assert_allclose(fallen_back.v, expected.v, atol=1e-6)


def test_signs_are_fixed_and_reconstruction_holds():
    w, _, _ = known_spectrum(80, 60, np.linspace(5, 1, 60), seed=4)
    spectrum = decompose(w, top_k=60)

    peaks = np.abs(spectrum.u).argmax(axis=0)
    assert (spectrum.u[peaks, np.arange(60)] > 0).all()
    rebuilt = (spectrum.u * spectrum.sigma) @ spectrum.v.T
    np.testing.assert_allclose(rebuilt, w.numpy(), atol=1e-5)

    flipped = decompose(-w, top_k=60)
    np.testing.assert_allclose(flipped.u, spectrum.u, atol=1e-5)
    np.testing.assert_allclose(flipped.v, -spectrum.v, atol=1e-5)


def test_batch_equals_one_at_a_time():
    stack = torch.randn(3, 40, 70, generator=torch.Generator().manual_seed(5))
    batched = decompose_batch(stack, top_k=8)
    for matrix, spectrum in zip(stack, batched, strict=True):
        single = decompose(matrix, top_k=8)
        np.testing.assert_allclose(single.sigma, spectrum.sigma, rtol=1e-6)
        np.testing.assert_allclose(single.u, spectrum.u, atol=1e-6)


def test_matrices_side_by_side_equal_one_at_a_time_bit_for_bit():
    # Mixed shapes: tall, wide, square, and small enough for the direct route.
    gen = torch.Generator().manual_seed(11)
    shapes = [(300, 90), (90, 300), (120, 120), (50, 20), (300, 90), (64, 48)]
    matrices = [torch.randn(*shape, generator=gen) for shape in shapes]

    with one_blas_thread():
        alone = [decompose(matrix, 16) for matrix in matrices]
        together = decompose_batch(matrices, 16, side_by_side=3)

    for one, other in zip(alone, together, strict=True):
        for field in ("sigma", "u", "v"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field))


@pytest.mark.parametrize("side_by_side", [1, 2])
def test_callers_sharing_a_pool_never_exceed_its_size(monkeypatch, side_by_side):
    # Two tasks of one run, each with its matrices: together no more than N at once.
    running, most, lock = [0], [0], threading.Lock()
    decompose_one = spectra.decompose_on_cpu

    def counted(matrix, top_k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return decompose_one(matrix, top_k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(spectra, "decompose_on_cpu", counted)
    matrices = [torch.randn(200, 150, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    tasks = [
        threading.Thread(
            target=decompose_batch, args=(matrices, 8), kwargs={"side_by_side": side_by_side}
        )
        for _ in range(2)
    ]
    for task in tasks:
        task.start()
    for task in tasks:
        task.join()

    assert 1 <= most[0] <= side_by_side


def test_one_blas_thread_waits_for_torch_half_imported_by_another_thread(tmp_path):
    # A stand-in torch that takes a second to import: while another thread imports it, the
    # module is in sys.modules without its functions yet.
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import time\n"
        "calls = []\n"
        "time.sleep(1.0)\n"
        "def get_num_threads():\n    return 4\n"
        "def set_num_threads(count):\n    calls.append(count)\n"
    )
    script = (
        "import sys, threading, time\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from spectrum_cli.spectra import one_blas_thread\n"
        "importer = threading.Thread(target=__import__, args=('torch',))\n"
        "importer.start()\n"
        "while 'torch' not in sys.modules:\n    time.sleep(0.005)\n"
        "with one_blas_thread():\n    pass\n"
        "importer.join()\n"
        "print(sys.modules['torch'].calls)\n"
    )

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 4]"  # set to one inside, then back to the count found


def test_one_blas_thread_reaches_every_blas_and_lifts_when_the_last_leaves():
    from threadpoolctl import threadpool_info

    def blas_threads() -> list[int]:
        # Process-wide; OpenMP's count, like torch's, belongs to each thread.
        return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]

    before = blas_threads()
    entered, release = threading.Barrier(3), threading.Event()
    torch_inside: list[int] = []

    def hold() -> None:
        with one_blas_thread():
            torch_inside.append(torch.get_num_threads())
            entered.wait()
            release.wait()

    # As in `analyze`: this thread holds the limit, worker threads enter and leave inside it.
    holders = [threading.Thread(target=hold) for _ in range(2)]
    with one_blas_thread():
        try:
            for holder in holders:
                holder.start()
            entered.wait(timeout=60)
            # SciPy's BLAS, which the engine loads itself, is limited too.
            assert any("scipy" in info["filepath"] for info in threadpool_info())
            assert set(blas_threads()) == {1}
            assert torch_inside == [1, 1] and torch.get_num_threads() == 1
        finally:
            release.set()
            for holder in holders:
                holder.join()
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def test_accelerator_batches_group_shapes_within_the_budget_and_keep_order(monkeypatch):
    # The grouping a CUDA device gets, with the batched arithmetic run on the CPU.
    passes: list[tuple[int, ...]] = []

    def on_cpu(stack, top_k, device):
        passes.append(tuple(stack.shape))
        return _decompose_on_device(stack, top_k, torch.device("cpu"))

    monkeypatch.setattr(spectra, "_decompose_on_device", on_cpu)
    monkeypatch.setattr(spectra, "_DEVICE_BUDGET_BYTES", 2 * 8 * (60 * 40 + 40 * 40))
    gen = torch.Generator().manual_seed(12)
    shapes = [(60, 40), (30, 50), (60, 40), (60, 40), (30, 50)]
    matrices = [torch.randn(*shape, generator=gen) for shape in shapes]

    got = decompose_batch(matrices, 8, torch.device("meta"))

    assert passes == [(2, 60, 40), (1, 60, 40), (2, 30, 50)]
    for matrix, spectrum in zip(matrices, got, strict=True):
        np.testing.assert_allclose(spectrum.sigma, decompose(matrix, 8).sigma, rtol=1e-5)


@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (64, 64)])
def test_the_batched_accelerator_route_agrees_with_the_cpu_route(shape):
    # The route a CUDA device takes is plain torch; run its arithmetic on the CPU here.
    m, n = shape
    r = min(m, n)
    sigma = np.logspace(0, -3, r)
    stack = torch.stack([known_spectrum(m, n, sigma, seed=seed)[0] for seed in (7, 8)])

    on_device = _decompose_on_device(stack, 16, torch.device("cpu"))
    on_cpu = decompose_batch(stack, 16)

    for ours, theirs in zip(on_device, on_cpu, strict=True):
        np.testing.assert_allclose(ours.sigma, theirs.sigma, rtol=1e-5)
        np.testing.assert_allclose(ours.sigma, sigma, rtol=1e-5)
        # Both fix signs the same way, so the vectors agree entry by entry.
        np.testing.assert_allclose(ours.u, theirs.u, atol=1e-4)
        np.testing.assert_allclose(ours.v, theirs.v, atol=1e-4)


@pytest.mark.parametrize("kind", ["tensor", "array"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [(float("nan"), "1 NaN"), (float("inf"), "1 +Inf"), (float("-inf"), "1 -Inf")],
)
def test_non_finite_input_is_refused_with_its_reason(value, expected, kind):
    w = torch.ones(5, 4)
    w[2, 1] = value
    with pytest.raises(DecompositionError, match=re.escape(f"({expected} of 20)")):
        decompose(w if kind == "tensor" else w.numpy(), top_k=2)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_arrays_and_tensors_give_the_same_spectrum_bit_for_bit(dtype):
    # Arrays (as safetensors files are read for analyze) take the route tensors take.
    w, _, _ = known_spectrum(90, 60, np.logspace(0, -2, 60), seed=13)
    array = w.numpy().astype(dtype)
    from_array = decompose(array, top_k=8)
    from_tensor = decompose(torch.from_numpy(array), top_k=8)
    for field in ("sigma", "u", "v"):
        np.testing.assert_array_equal(getattr(from_array, field), getattr(from_tensor, field))


def test_singular_values_beyond_float32_are_refused_for_arrays_too():
    # Finite float64 entries whose σ₁ cannot be stored in float32.
    w = np.full((4, 3), 1e38)
    with pytest.raises(DecompositionError, match="beyond the float32 range"):
        decompose(w, top_k=2)
    decompose(w * 1e-2, top_k=2)  # σ₁ ≈ 3.5e36: stored


@pytest.mark.parametrize(("scale", "dtype"), [(1e-50, np.float64), (1e-41, np.float32)])
def test_singular_values_below_float32_are_refused_not_stored_as_zero(scale, dtype):
    # float64 weights whose σ₁ underflows float32, and float32 weights of subnormal size.
    w = (np.random.default_rng(3).standard_normal((5, 4)) * scale).astype(dtype)
    with pytest.raises(DecompositionError, match="below the float32 range"):
        decompose(w, top_k=2)
    assert (decompose(np.zeros((5, 4), dtype), top_k=2).sigma == 0).all()


@pytest.mark.parametrize(
    ("version", "platform", "nodes", "possible"),
    [
        ("2.13.0+cpu", "linux", ["/dev/nvidiactl"], False),  # a CPU build never sees CUDA
        ("2.13.0", "linux", [], False),  # no driver's device files
        ("2.13.0", "linux", ["/dev/nvidiactl", "/dev/nvidia0"], True),
        ("2.13.0+rocm6.4", "linux", ["/dev/kfd"], True),
        ("2.13.0", "linux", ["/dev/dxg"], True),  # WSL
        ("2.13.0", "darwin", [], False),
        ("2.13.0", "win32", [], True),  # only torch can tell
        (None, "linux", ["/dev/nvidiactl"], False),  # no torch installed
    ],
)
def test_whether_cuda_is_possible_is_told_without_torch(
    monkeypatch, version, platform, nodes, possible
):
    import importlib.metadata

    def torch_version(name):
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", torch_version)
    monkeypatch.setattr(spectra.sys, "platform", platform)
    monkeypatch.setattr(spectra.os.path, "exists", lambda path: path in nodes)
    assert spectra.cuda_possible() is possible


def test_auto_and_cpu_resolve_to_the_cpu_without_asking_torch(monkeypatch):
    monkeypatch.setattr(spectra, "cuda_possible", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("torch was asked"))
    assert spectra.resolve_device("auto") == "cpu"
    assert spectra.resolve_device("cpu") == "cpu"


def test_zero_and_rank_deficient_matrices_give_finite_orthonormal_vectors():
    zero = decompose(torch.zeros(6, 4), top_k=4)
    assert (zero.sigma == 0).all() and np.isfinite(zero.u).all()

    rank_one = torch.outer(torch.arange(1.0, 7.0), torch.arange(1.0, 5.0))
    spectrum = decompose(rank_one, top_k=3)
    assert spectrum.sigma[1] < 1e-5 * spectrum.sigma[0]
    gram = spectrum.u.T @ spectrum.u
    np.testing.assert_allclose(gram, np.eye(3), atol=1e-5)


def test_values_near_the_float32_limit_stay_finite():
    w, _, _ = known_spectrum(30, 20, np.linspace(1, 0.5, 20), seed=6)
    big = decompose(w * 1e37, top_k=4)
    tiny = decompose(w * 1e-37, top_k=4)
    reference = torch.linalg.svdvals(w.double()).numpy()
    np.testing.assert_allclose(big.sigma / 1e37, reference, rtol=1e-5)
    np.testing.assert_allclose(tiny.sigma / 1e-37, reference, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
)
def test_invariants(m, n, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen) * scale
    spectrum = decompose(w, top_k=5)

    # Sorted, non-negative, and unchanged by an orthogonal rotation of either side.
    assert (spectrum.sigma >= 0).all()
    assert (np.diff(spectrum.sigma) <= 1e-6 * spectrum.sigma[0]).all()
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    rotated = decompose((q @ w.double()).float(), top_k=5)
    np.testing.assert_allclose(rotated.sigma, spectrum.sigma, rtol=1e-4, atol=1e-5 * scale)
