"""The shipped sample checkpoints: readable, rebuildable, and showing the effects they are for.

Each sample run must rebuild its model and data from one checkpoint's metadata and reproduce
the numbers in its ``metrics.csv``; beyond that, each family must show its effect: grokking
with a falling effective rank, memorisation keeping the rank high, top singular directions
settling before the lower ones, siblings agreeing more the later they split, and a magnitude
mask keeping the top directions that a random mask loses.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from spectrum_cli.errors import CheckpointError, EvaluationError
from spectrum_cli.samples import (
    build_data,
    build_model,
    evaluate,
    load_sample,
    modular_addition,
    read_metadata,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"
SCRIPT = REPO / "scripts" / "make_samples.py"

RUNS = [
    "modadd-wd",
    "modadd-nowd",
    "digits-true",
    "digits-shuffled",
    "spawn/parent",
    *(f"spawn/spawn-{k:04d}/child-{c}" for k in (0, 250, 1000, 2000) for c in "ab"),
    "spawn/stranger/parent",
    "spawn/stranger/spawn-2000/child-a",
    "masked/dense",
    "masked/sparse",
]
HIDDEN = ["0.weight", "2.weight"]  # every matrix but the output layer's
METRIC_COLUMNS = ["step", "train_loss", "train_acc", "val_loss", "val_acc"]


def checkpoints(run: str) -> list[Path]:
    """A run's checkpoint files in step order."""
    return sorted((SAMPLES / run).glob("step_*.safetensors"))


def step_of(path: Path) -> int:
    """The step in a checkpoint's file name."""
    return int(path.stem.removeprefix("step_"))


def weights(run: str, step: int | None = None) -> dict[str, torch.Tensor]:
    """A run's weights at a step, by default its last."""
    paths = checkpoints(run)
    path = paths[-1] if step is None else next(p for p in paths if step_of(p) == step)
    return load_file(path)


def metrics(run: str) -> dict[int, dict[str, float]]:
    """A run's ``metrics.csv`` by step."""
    with (SAMPLES / run / "metrics.csv").open() as file:
        return {
            int(row["step"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(file)
        }


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli)."""
    sigma = torch.linalg.svdvals(matrix.double())
    p = sigma / sigma.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The diagonal S_ii = |(u_i(a)·u_i(b)) (v_i(a)·v_i(b))| over every index i."""
    u_a, _, vh_a = torch.linalg.svd(a.double(), full_matrices=False)
    u_b, _, vh_b = torch.linalg.svd(b.double(), full_matrices=False)
    return ((u_a * u_b).sum(0) * (vh_a * vh_b).sum(1)).abs()


def score(a: torch.Tensor, b: torch.Tensor) -> float:
    """The agreement score: the mean of the first 10 diagonal entries."""
    return agreement(a, b)[:10].mean().item()


def loss_barrier(run_a: str, run_b: str) -> float:
    """The training-loss barrier on the straight line between two runs' final weights."""
    sample = load_sample(checkpoints(run_a)[-1])
    a, b = weights(run_a), weights(run_b)
    losses = []
    for alpha in torch.linspace(0, 1, 11).tolist():
        sample.model.load_state_dict({k: (1 - alpha) * a[k] + alpha * b[k] for k in a})
        losses.append(evaluate(sample.model, sample.data.train)[0])
    return max(
        loss - ((1 - i / 10) * losses[0] + i / 10 * losses[-1]) for i, loss in enumerate(losses)
    )


# ----------------------------------------------------------------------------- the files


def test_runs_are_all_there_and_nothing_else_looks_like_one():
    found = sorted(str(p.parent.relative_to(SAMPLES)) for p in SAMPLES.rglob("metrics.csv"))
    assert found == sorted(RUNS)

    # The mask is the only non-checkpoint safetensors file, and its stem says so.
    extra = [p for p in SAMPLES.rglob("*.safetensors") if not p.name.startswith("step_")]
    assert [p.relative_to(SAMPLES).as_posix() for p in extra] == ["masked/mask.safetensors"]
    assert all("mask" not in p.stem for run in RUNS for p in checkpoints(run))


def test_total_size_is_within_budget():
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


@pytest.mark.parametrize("run", RUNS)
def test_every_checkpoint_has_metadata_and_a_metrics_row(run):
    rows = metrics(run)
    with (SAMPLES / run / "metrics.csv").open() as file:
        assert next(csv.reader(file)) == METRIC_COLUMNS

    paths = checkpoints(run)
    assert len(paths) >= 2
    for path in paths:
        meta = read_metadata(path)
        assert list(meta)[:5] == ["task", "arch", "step", "data", "hparams"]
        assert meta["step"] == step_of(path)
        assert meta["step"] in rows
        with safe_open(path, framework="pt") as file:
            layers = list(file.keys())
            dtypes = {file.get_slice(layer).get_dtype() for layer in layers}
        assert layers == [f"{i}.{kind}" for i in (0, 2, 4) for kind in ("bias", "weight")]
        assert dtypes == {"F32"}


@pytest.mark.parametrize("run", RUNS)
def test_model_and_data_rebuild_and_reproduce_the_metrics(run):
    path = checkpoints(run)[-1]
    sample = load_sample(path)  # loads the weights strictly
    row = metrics(run)[step_of(path)]

    train_loss, train_acc = evaluate(sample.model, sample.data.train)
    val_loss, val_acc = evaluate(sample.model, sample.data.val)

    assert train_acc == pytest.approx(row["train_acc"], abs=1e-5)
    assert val_acc == pytest.approx(row["val_acc"], abs=1e-5)
    assert train_loss == pytest.approx(row["train_loss"], rel=1e-3, abs=1e-6)
    assert val_loss == pytest.approx(row["val_loss"], rel=1e-3, abs=1e-6)


def test_build_model_keeps_layer_order_and_seeds_without_touching_global_state():
    arch = {"kind": "mlp", "widths": [5, 7, 3], "activation": "relu"}
    before = torch.random.get_rng_state()
    a = build_model(arch, seed=3)
    b = build_model(arch, seed=3, init_scale=0.5)

    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(a.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.allclose(b[0].weight, 0.5 * a[0].weight)
    with pytest.raises(EvaluationError, match="kind"):
        build_model({"kind": "transformer"})


def test_modular_addition_labels_are_sums_mod_p():
    data = modular_addition(59, 0.4, 0)
    assert (len(data.train), len(data.val), data.num_classes) == (1392, 2089, 59)
    for split in (data.train, data.val):
        a, b = split.x[:, :59].argmax(1), split.x[:, 59:].argmax(1)
        assert torch.equal(split.y, (a + b) % 59)
        assert torch.equal(split.x.sum(1), torch.full((len(split),), 2.0))

    # Train and validation partition the p² pairs.
    x = torch.cat([data.train.x, data.val.x])
    pairs = x[:, :59].argmax(1) * 59 + x[:, 59:].argmax(1)
    assert torch.equal(pairs.sort().values, torch.arange(59 * 59))


def test_digits_rebuild_with_a_fixed_split_and_shuffled_labels():
    true = build_data("digits", read_metadata(checkpoints("digits-true")[0])["data"])
    shuffled = build_data("digits", read_metadata(checkpoints("digits-shuffled")[0])["data"])

    assert (len(true.train), len(true.val), true.train.x.shape[1]) == (1438, 359, 64)
    assert true.train.x.min() >= 0.0 and true.train.x.max() <= 1.0
    assert torch.equal(true.train.x, shuffled.train.x)
    assert torch.equal(true.val.y, shuffled.val.y)
    assert torch.equal(true.train.y.sort().values, shuffled.train.y.sort().values)
    assert (true.train.y != shuffled.train.y).float().mean() > 0.8


def test_metadata_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"plain\.safetensors"):
        read_metadata(path)
    with pytest.raises(EvaluationError, match="unknown sample task"):
        build_data("cifar", {})


# ----------------------------------------------------------------------------- grokking


def test_modular_addition_groks_with_weight_decay_only():
    wd, nowd = metrics("modadd-wd"), metrics("modadd-nowd")
    chance = 1 / 59

    assert wd[max(wd)]["val_acc"] > 0.95 and nowd[max(nowd)]["val_acc"] < 0.5
    assert wd[max(wd)]["train_acc"] > 0.99 and nowd[max(nowd)]["train_acc"] > 0.99

    # Train accuracy is perfect long before validation accuracy leaves chance.
    fitted = min(s for s, r in wd.items() if r["train_acc"] > 0.99)
    generalised = min(s for s, r in wd.items() if r["val_acc"] > 0.5)
    assert generalised >= 5 * fitted
    assert all(r["val_acc"] < 2 * chance for s, r in wd.items() if s <= fitted)


def test_effective_rank_falls_through_the_jump_and_ends_below_no_decay():
    wd = metrics("modadd-wd")
    steps = [step_of(p) for p in checkpoints("modadd-wd")]
    start = max(s for s in steps if wd[s]["val_acc"] < 0.05)
    end = min(s for s in steps if wd[s]["val_acc"] > 0.95)

    # The first layer's rank keeps falling from before the jump to after it.
    ranks = [
        effective_rank(weights("modadd-wd", s)["0.weight"]) for s in steps if start <= s <= end
    ]
    assert len(ranks) >= 5
    assert all(later < earlier for earlier, later in itertools.pairwise(ranks))

    for layer, ratio in (("0.weight", 0.9), ("2.weight", 0.5)):
        with_decay = effective_rank(weights("modadd-wd")[layer])
        without = effective_rank(weights("modadd-nowd")[layer])
        assert with_decay < ratio * without


# ----------------------------------------------------------------------------- memorisation


def test_classifiers_fit_true_and_shuffled_labels():
    true, shuffled = metrics("digits-true"), metrics("digits-shuffled")
    assert true[max(true)]["train_acc"] > 0.999 and shuffled[max(shuffled)]["train_acc"] > 0.999
    assert true[max(true)]["val_acc"] > 0.9 and shuffled[max(shuffled)]["val_acc"] < 0.2


@pytest.mark.parametrize("layer", HIDDEN)
def test_memorising_keeps_the_rank_higher(layer):
    true = effective_rank(weights("digits-true")[layer])
    shuffled = effective_rank(weights("digits-shuffled")[layer])
    assert shuffled > 1.15 * true


@pytest.mark.parametrize("layer", HIDDEN)
def test_top_directions_settle_before_the_lower_ones(layer):
    paths = checkpoints("digits-true")
    final = load_file(paths[-1])[layer]
    last = step_of(paths[-1])
    top, lower = {}, {}
    for path in paths:
        diagonal = agreement(load_file(path)[layer], final)
        top[step_of(path)] = diagonal[:10].mean().item()
        lower[step_of(path)] = diagonal[20:30].mean().item()

    top_settled = min(s for s, v in top.items() if v >= 0.9)
    lower_settled = min(s for s, v in lower.items() if v >= 0.9)
    assert top_settled <= last / 2
    assert lower_settled > top_settled
    assert lower[top_settled] < top[top_settled] - 0.05


# ----------------------------------------------------------------------------- spawning


def test_children_start_from_their_parents_weights():
    for run in RUNS:
        first = checkpoints(run)[0]
        meta = read_metadata(first)
        if "spawn" not in meta:
            continue
        assert meta["spawn"]["step"] == step_of(first)
        parent = weights(meta["spawn"]["parent"], meta["spawn"]["step"])
        assert all(torch.equal(parent[k], v) for k, v in load_file(first).items())


def sibling_agreement(k: int) -> float:
    """Mean agreement score over the hidden layers of the two children spawned at step k."""
    a, b = weights(f"spawn/spawn-{k:04d}/child-a"), weights(f"spawn/spawn-{k:04d}/child-b")
    return sum(score(a[layer], b[layer]) for layer in HIDDEN) / len(HIDDEN)


def test_siblings_agree_more_the_later_they_split():
    scores = [sibling_agreement(k) for k in (0, 250, 1000, 2000)]
    assert scores == sorted(scores)
    assert scores[-1] > 0.95 and scores[0] < scores[-1] - 0.1


def test_late_siblings_share_a_basin_and_strangers_do_not():
    late = ("spawn/spawn-2000/child-a", "spawn/spawn-2000/child-b")
    stranger = ("spawn/spawn-2000/child-a", "spawn/stranger/spawn-2000/child-a")

    assert abs(loss_barrier(*late)) < 0.01
    assert loss_barrier(*stranger) > 0.1

    a, c = weights(stranger[0]), weights(stranger[1])
    assert all(score(a[layer], c[layer]) < 0.2 for layer in HIDDEN)


# ----------------------------------------------------------------------------- masks


def test_mask_file_is_global_magnitude_over_hidden_layers():
    masks = load_file(SAMPLES / "masked/mask.safetensors")
    with safe_open(SAMPLES / "masked/mask.safetensors", framework="pt") as file:
        description = json.loads(file.metadata()["spectrum"])
    dense = weights("masked/dense")

    assert sorted(masks) == HIDDEN == description["layers"]
    assert description["kept_fraction"] == 0.05
    kept = sum(m.sum().item() for m in masks.values())
    assert kept == round(0.05 * sum(m.numel() for m in masks.values()))

    # Every kept magnitude is at least every pruned one, across layers.
    kept_min = min(dense[k][masks[k] == 1].abs().min().item() for k in HIDDEN)
    pruned_max = max(dense[k][masks[k] == 0].abs().max().item() for k in HIDDEN)
    assert kept_min >= pruned_max


def test_sparse_run_is_rewound_and_stays_masked():
    masks = load_file(SAMPLES / "masked/mask.safetensors")
    first = checkpoints("masked/sparse")[0]
    rewind = read_metadata(first)["mask"]["rewind_step"]
    dense = weights("masked/dense", rewind)

    assert step_of(first) == rewind
    for path in checkpoints("masked/sparse"):
        sparse = load_file(path)
        assert all(torch.all(sparse[k][masks[k] == 0] == 0) for k in HIDDEN)
    start = load_file(first)
    assert all(torch.equal(start[k], dense[k] * masks.get(k, 1.0)) for k in dense)
    assert metrics("masked/sparse")[max(metrics("masked/sparse"))]["train_acc"] > 0.98


@pytest.mark.parametrize("layer", HIDDEN)
def test_magnitude_mask_keeps_top_directions_a_random_mask_loses(layer):
    masks = load_file(SAMPLES / "masked/mask.safetensors")
    w = weights("masked/dense")[layer]
    density = masks[layer].mean().item()

    generator = torch.Generator().manual_seed(0)
    random_scores = [
        score(w, w * (torch.rand(w.shape, generator=generator) < density).float()) for _ in range(5)
    ]
    magnitude = score(w, w * masks[layer])
    assert magnitude > 0.3
    assert magnitude > 4 * max(random_scores)


# ----------------------------------------------------------------------------- the generator


@pytest.mark.slow
def test_generator_is_deterministic(tmp_path):
    outputs = []
    for name in ("one", "two"):
        out = tmp_path / name
        (out / "data").mkdir(parents=True)
        shutil.copy(SAMPLES / "data/digits.npz", out / "data/digits.npz")
        subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(out), "--only", "digits-true"],
            check=True,
            capture_output=True,
        )
        outputs.append(out / "digits-true")

    files = sorted(p.name for p in outputs[0].iterdir())
    assert files == sorted(p.name for p in (SAMPLES / "digits-true").iterdir())
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
        if name.endswith(".safetensors"):
            assert read_metadata(outputs[0] / name) == read_metadata(SAMPLES / "digits-true" / name)
