"""Evaluation: model and data from specs or sample metadata, the contract, loss and error."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spectrum_cli.errors import EvaluationError, UsageError
from spectrum_cli.evaluation import (
    EvaluationData,
    Evaluator,
    data_from_spec,
    evaluate,
    evaluator_for,
    load_callable,
    model_from_spec,
    split_batches,
)
from spectrum_cli.samples import load_sample

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
DIGITS_FINAL = SAMPLES / "digits-true" / "step_009600.safetensors"

USER_FILE = """
import numpy as np
import torch
from torch import nn

VALUE = 3


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def not_a_model():
    return {"weight": torch.zeros(2)}


def needs_arguments(width):
    return nn.Linear(width, width)


def splits():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=generator)
    y = torch.randint(0, 3, (50,), generator=generator)
    return {"train": (x, y), "test": (x[:20].numpy(), y[:20].numpy())}


class Regression:
    def __init__(self):
        generator = torch.Generator().manual_seed(2)
        self.splits = {"train": (torch.randn(30, 4, generator=generator), torch.randn(30, 3))}
        self.error_fn = None

    @staticmethod
    def loss_fn(outputs, targets):
        return ((outputs - targets) ** 2).mean()


class Factory:
    @staticmethod
    def build():
        return nn.Linear(4, 3)
"""


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(USER_FILE)
    return path


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable package ``userpkg`` with the same module as ``user_file``."""
    package = tmp_path / "site" / "userpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(USER_FILE)
    (package / "broken.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return "userpkg.models"


def classifier_data(n: int = 37, features: int = 4, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(
        0, classes, (n,), generator=generator
    )


# ---------------------------------------------------------------------------- specs


def test_a_file_spec_and_a_module_spec_build_the_same_model(user_file, user_package):
    from_file = model_from_spec(f"{user_file}:build")
    from_module = model_from_spec(f"{user_package}:build")
    assert isinstance(from_file, nn.Sequential)
    for left, right in zip(from_file.parameters(), from_module.parameters(), strict=True):
        assert torch.equal(left, right)


def test_a_module_spec_imports_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "spectrum_task_here.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "spectrum_task_here", raising=False)
    model = model_from_spec("spectrum_task_here:build")
    assert isinstance(model, nn.Sequential)
    assert sys.path[0] == str(tmp_path)
    sys.modules.pop("spectrum_task_here")


def test_a_dotted_callable_is_followed(user_package):
    assert isinstance(model_from_spec(f"{user_package}:Factory.build"), nn.Linear)


def test_data_as_a_mapping_gets_the_default_loss_and_error(user_file):
    data = data_from_spec(f"{user_file}:splits")
    assert list(data.splits) == ["train", "test"]
    assert data.loss_fn is not None and data.error_fn is not None


def test_data_as_an_object_brings_its_own_loss(user_file):
    data = data_from_spec(f"{user_file}:Regression")
    assert data.error_fn is None
    outputs, targets = torch.ones(2, 3), torch.zeros(2, 3)
    assert float(data.loss_fn(outputs, targets)) == 1.0


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ("no_callable_here", UsageError, "names no callable"),
        ("{file}:nope", EvaluationError, "has no attribute 'nope'; callables there: Factory"),
        ("{file}:VALUE", EvaluationError, "not a callable"),
        ("{file}:not_a_model", EvaluationError, "expected a torch.nn.Module"),
        ("{file}:needs_arguments", EvaluationError, "called with no arguments"),
        ("{dir}/missing.py:build", UsageError, "is not a file"),
        ("spectrum_no_such_module:build", EvaluationError, "no module named"),
        ("userpkg.broken:build", EvaluationError, "install what it imports"),
    ],
)
def test_a_bad_model_spec_fails_in_one_line_naming_the_spec(
    spec, error, words, user_file, user_package
):
    spec = spec.format(file=user_file, dir=user_file.parent)
    with pytest.raises(error) as raised:
        model_from_spec(spec)
    message = str(raised.value)
    assert words in message
    assert spec in message
    assert "\n" not in message


def test_a_file_that_fails_to_run_is_reported(tmp_path: Path):
    path = tmp_path / "crashes.py"
    path.write_text("raise ValueError('no GPU here')\n")
    with pytest.raises(EvaluationError, match=r"running crashes.py failed: ValueError: no GPU"):
        load_callable(f"{path}:build", "--model")


def test_data_of_the_wrong_type_is_reported(user_file):
    with pytest.raises(EvaluationError, match="expected a non-empty mapping of split name"):
        data_from_spec(f"{user_file}:VALUE.__class__")


# ---------------------------------------------------------------------------- batches and scores


def test_batched_evaluation_matches_one_pass_over_all_examples():
    x, y = classifier_data()
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    logits = model(x)
    expected_loss = nn.functional.cross_entropy(logits, y).item()
    expected_error = (logits.argmax(1) != y).double().mean().item()
    for batch_size in (1, 5, 37, 1000):
        scores = evaluate(model, split_batches((x, y), batch_size=batch_size))
        assert scores.examples == 37
        assert scores.loss == pytest.approx(expected_loss, rel=1e-6)
        assert scores.error == pytest.approx(expected_error, abs=1e-12)


def test_a_dataloader_numpy_arrays_and_tensors_give_the_same_scores():
    x, y = classifier_data()
    model = nn.Linear(4, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    tensors = evaluate(model, split_batches((x, y), batch_size=8))
    arrays = evaluate(model, split_batches((x.numpy(), y.numpy()), batch_size=8))
    batches = evaluate(model, split_batches(loader))
    assert tensors == arrays == batches


def test_max_examples_keeps_the_first_examples_of_any_split():
    x, y = classifier_data()
    model = nn.Linear(4, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    expected = evaluate(model, [(x[:20], y[:20])])
    cut = evaluate(model, split_batches((x, y), batch_size=8, max_examples=20))
    assert cut.examples == 20
    assert cut.loss == pytest.approx(expected.loss, rel=1e-6)
    cut = split_batches(loader, max_examples=20)
    assert [len(targets) for _, targets in cut] == [8, 8, 4]
    assert evaluate(model, cut).loss == pytest.approx(expected.loss, rel=1e-6)


def test_tuple_and_dict_inputs_are_spread_over_the_model_arguments():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left, self.right = nn.Linear(2, 3), nn.Linear(2, 3)

        def forward(self, a, b):
            return self.left(a) + self.right(b)

    x, y = classifier_data(features=4)
    model = TwoInputs()
    as_tuple = evaluate(model, [((x[:, :2], x[:, 2:]), y)])
    as_dict = evaluate(model, [({"a": x[:, :2], "b": x[:, 2:]}, y)])
    assert as_tuple == as_dict


def test_a_dataset_of_single_examples_is_refused_with_the_fix():
    x, y = classifier_data()
    with pytest.raises(EvaluationError, match=r"wrap it in torch.utils.data.DataLoader"):
        split_batches(torch.utils.data.TensorDataset(x, y))


def test_custom_loss_and_no_error(user_file):
    evaluator = evaluator_for(Path("unused"), f"{user_file}:build", f"{user_file}:Regression")
    scores = evaluator.evaluate("train")
    x, y = evaluator.data.splits["train"]
    with torch.no_grad():
        expected = ((evaluator.model(x) - y) ** 2).mean().item()
    assert scores.error is None
    assert scores.loss == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------- the evaluator


def test_any_failure_of_the_user_data_or_loss_is_one_evaluation_error():
    x, y = classifier_data()

    def broken_loss(outputs, targets):
        return {"mean": outputs.mean()}["sum"]

    class FailingLoader:
        def __iter__(self):
            yield x[:8], y[:8]
            raise FileNotFoundError("shard-2.bin")

    data = EvaluationData({"train": (x, y), "test": FailingLoader()}, loss_fn=broken_loss)
    evaluator = Evaluator(nn.Linear(4, 3), data, "a model", "the data")
    with pytest.raises(EvaluationError, match=r"on split 'train' of the data failed: KeyError"):
        evaluator.evaluate("train")
    with pytest.raises(EvaluationError, match=r"reading split 'test'.*FileNotFoundError: shard-2"):
        evaluator.batches("test")
    assert EvaluationError.exit_code == 2


def test_a_checkpoint_that_does_not_fit_is_reported_with_every_difference(user_file):
    evaluator = evaluator_for(Path("unused"), f"{user_file}:build", f"{user_file}:splits")
    state = {name: t.detach().clone() for name, t in evaluator.model.state_dict().items()}
    state["0.weight"] = torch.zeros(9, 4)
    state["extra.weight"] = torch.zeros(2, 2)
    del state["2.bias"]
    with pytest.raises(EvaluationError) as raised:
        evaluator.check_fit(state, "ckpt.pt")
    message = str(raised.value)
    for words in ("only in the model: 2.bias", "only in the checkpoint: extra.weight", "0.weight"):
        assert words in message
    assert "\n" not in message


def test_an_unknown_split_names_the_splits_there_are(user_file):
    evaluator = evaluator_for(Path("unused"), f"{user_file}:build", f"{user_file}:splits")
    with pytest.raises(UsageError, match=r"no split 'val'.*splits: train, test"):
        evaluator.evaluate("val")


def test_a_model_that_does_not_take_the_data_is_an_evaluation_error(user_file):
    model = nn.Linear(5, 3)  # the data have 4 features
    evaluator = Evaluator(model, data_from_spec(f"{user_file}:splits"), "a model", "the data")
    with pytest.raises(EvaluationError, match="evaluating the model from a model on split"):
        evaluator.evaluate("train")


def test_a_sample_rebuilds_its_model_and_data_without_flags():
    evaluator = evaluator_for(DIGITS_FINAL)
    assert evaluator.split_names == ["train", "val"]
    evaluator.load(dict(load_sample(DIGITS_FINAL).model.state_dict()))
    sample = load_sample(DIGITS_FINAL)
    from spectrum_cli.samples import evaluate as sample_evaluate

    loss, accuracy = sample_evaluate(sample.model, sample.data.val)
    scores = evaluator.evaluate("val")
    assert scores.loss == pytest.approx(loss, rel=1e-5)
    assert scores.error == pytest.approx(1 - accuracy, abs=1e-6)


def test_a_checkpoint_that_is_not_a_sample_needs_both_flags(tmp_path: Path, user_file):
    path = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2, 2)}, path)
    with pytest.raises(UsageError, match=r"not a sample checkpoint.*--model module:callable"):
        evaluator_for(path)
    with pytest.raises(UsageError, match="--model needs --data too"):
        evaluator_for(path, f"{user_file}:build")


def test_evaluation_data_is_a_plain_container():
    x, y = classifier_data()
    data = EvaluationData({"train": (x, y)})
    evaluator = Evaluator(nn.Linear(4, 3), data, "m", "d", batch_size=10, max_examples=25)
    assert [len(t) for _, t in evaluator.batches("train")] == [10, 10, 5]
    assert evaluator.evaluate("train").examples == 25
    assert np.isfinite(evaluator.evaluate("train").loss)


def test_the_readme_task_file_fits_the_sample_checkpoints(tmp_path, monkeypatch):
    """The file-based example of the README builds a model and data the samples fit."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    (block,) = re.findall(r"```python\n(# task\.py.*?)```", readme, flags=re.S)
    task = tmp_path / "task.py"
    task.write_text(block)
    monkeypatch.chdir(root)  # the example reads the sample data by its relative path
    evaluator = evaluator_for(DIGITS_FINAL, f"{task}:build", f"{task}:loaders")
    assert evaluator.split_names == ["train", "test"]
    state = dict(load_sample(DIGITS_FINAL).model.state_dict())
    evaluator.check_fit(state, str(DIGITS_FINAL))
    evaluator.load(state)
    scores = evaluator.evaluate("test")
    assert scores.examples == 397
    assert scores.error is not None and scores.error < 0.1
