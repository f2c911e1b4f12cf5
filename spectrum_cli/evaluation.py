"""Evaluate a checkpoint with a model and data: user callables, sample metadata, loss and error.

Spectra need no model code; barriers (:mod:`spectrum_cli.lmc`) and pruned evaluation
(:mod:`spectrum_cli.pruning`) do. Sample checkpoints carry metadata that rebuilds their model
and data (:mod:`spectrum_cli.samples`); for any other checkpoint the user names two callables.

The contract
------------
``--model SPEC`` and ``--data SPEC`` each name a callable as ``package.module:callable`` (a
module importable from the current directory, as under ``python -m``, or from ``sys.path``)
or ``path/to/file.py:callable`` (a file, imported under a private module name with its folder
put first on ``sys.path``, as ``python file.py`` would); the callable may be a dotted
attribute (``models:Net.build``). Both are called once, with no arguments.
Importing the module or file runs its code: that is what naming it asks for. The checkpoints
themselves are still read weights-only (:func:`spectrum_cli.checkpoints.load_tensors`), and
one that holds NaN or ±Inf anywhere is refused before anything is evaluated.

The model callable returns a :class:`torch.nn.Module`. Its state-dict keys (with the wrapper
prefixes ``module.`` and ``_orig_mod.`` stripped, as for checkpoints) and shapes must be
exactly those of the checkpoint; the weights it starts with are overwritten.

The data callable returns either

- a mapping of split name to split, e.g. ``{"train": ..., "test": ...}``, or
- an object with an attribute ``splits`` holding such a mapping, and optionally ``loss_fn``
  and ``error_fn`` (see below; :class:`EvaluationData` is one such object).

A split is either a pair ``(inputs, targets)`` of tensors or NumPy arrays with one example per
row, which spectrum cuts into batches of ``--batch-size``, or any iterable of
``(inputs, targets)`` batches, such as a :class:`torch.utils.data.DataLoader` (a ``Dataset`` of
single examples is not a batch iterable: wrap it in a ``DataLoader``). Each split is read once
and kept in memory, on the evaluation device, for every later pass; ``--max-examples N`` keeps
its first N examples. A batch's ``inputs`` are passed as ``model(inputs)`` when a tensor,
``model(*inputs)`` when a tuple or list, ``model(**inputs)`` when a dict. The ``train`` split
is needed to recompute BatchNorm statistics; ``--split`` chooses the split a barrier is
measured on.

Loss and error are means over examples. By default the loss is the cross-entropy of the
outputs (n, classes) as logits against integer targets (n,), and the error is the top-1 error,
the fraction of examples whose largest logit is not the target. For another task, set
``loss_fn(outputs, targets)`` and ``error_fn(outputs, targets)`` on the returned object: each
returns the *mean* over the batch as a scalar (tensor or float), and spectrum weights batches
by their number of examples, ``len(targets)``. ``error_fn = None`` reports the loss alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spectrum_cli.checkpoints import load_tensors, normalise_name, read_metadata
from spectrum_cli.errors import CheckpointError, EvaluationError, SpectrumError, UsageError
from spectrum_cli.samples import METADATA_KEY, rebuild_sample

log = logging.getLogger(__name__)

#: The split BatchNorm statistics are recomputed on.
TRAIN_SPLIT = "train"
#: Examples per batch when a split is given as whole tensors.
DEFAULT_BATCH_SIZE = 1024

LossFn = Callable[[Any, Any], Any]
Batch = tuple[Any, torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss: mean cross-entropy of logits (n, classes) against class indices (n,)."""
    return nn.functional.cross_entropy(outputs, targets)


def top1_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default error: the fraction of rows of (n, classes) whose argmax is not the target."""
    return (outputs.argmax(dim=-1) != targets).to(torch.float64).mean()


@dataclass
class EvaluationData:
    """What a data callable may return: splits, and how to score a model's outputs.

    Any object with these attributes will do; this class is a convenience.

    Attributes
    ----------
    splits
        Split name → ``(inputs, targets)`` tensors or an iterable of such batches.
    loss_fn
        ``loss_fn(outputs, targets)``: the mean loss over one batch.
    error_fn
        ``error_fn(outputs, targets)``: the mean error over one batch, or None to report the
        loss alone.
    """

    splits: Mapping[str, Any]
    loss_fn: LossFn = cross_entropy
    error_fn: LossFn | None = top1_error


@dataclass(frozen=True)
class Scores:
    """Mean loss and error of a model over the examples of one split.

    Attributes
    ----------
    loss
        Mean loss per example.
    error
        Mean error per example, or None when the data define no error.
    examples
        How many examples were scored.
    """

    loss: float
    error: float | None
    examples: int


# ---------------------------------------------------------------------------- callables


def load_callable(spec: str, flag: str) -> Callable[[], Any]:
    """Import the callable a ``module:callable`` or ``path/to/file.py:callable`` spec names.

    Parameters
    ----------
    spec
        ``package.module:name`` or ``path/to/file.py:name``; ``name`` may be dotted.
    flag
        The flag the spec came from (``--model``, ``--data``), for messages.

    Returns
    -------
    callable
        The object found; it is checked to be callable, not called.

    Raises
    ------
    UsageError
        If the spec has no ``:callable`` part or names a file that does not exist.
    EvaluationError
        If the module cannot be imported or has no such callable.
    """
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(
            f"{flag} {spec!r} names no callable; expected package.module:callable or "
            "path/to/file.py:callable"
        )
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(Path(where), spec, flag) if is_file else _import_module(where, spec, flag)

    # Follow a dotted name attribute by attribute.
    found: Any = module
    for i, part in enumerate(name.split(".")):
        if not hasattr(found, part):
            owner = ".".join([where, *name.split(".")[:i]])
            callables = sorted(
                key
                for key, value in vars(found).items()
                if callable(value) and not key.startswith("_")
            )
            hint = f"callables there: {', '.join(callables[:12])}" if callables else "it has none"
            raise EvaluationError(f"{flag} {spec}: {owner} has no attribute {part!r}; {hint}")
        found = getattr(found, part)
    if not callable(found):
        raise EvaluationError(
            f"{flag} {spec}: {name} is {_a(found)}, not a callable; name a function "
            "or class that takes no arguments"
        )
    return found


def _import_module(name: str, spec: str, flag: str) -> Any:
    # Modules in the current directory import as they would under `python -m`.
    here = os.getcwd()
    if "" not in sys.path and here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if name == missing or name.startswith(missing + "."):
            raise EvaluationError(
                f"{flag} {spec}: no module named {missing!r}; install it, add its folder to "
                "PYTHONPATH, or give a file path (path/to/file.py:callable)"
            ) from None
        raise EvaluationError(
            f"{flag} {spec}: importing {name} failed: {error}; install what it imports"
        ) from error
    except Exception as error:
        raise EvaluationError(
            f"{flag} {spec}: importing {name} failed: {type(error).__name__}: {_first_line(error)}; "
            "fix the module (--verbose shows the traceback)"
        ) from error


def _import_file(path: Path, spec: str, flag: str) -> Any:
    if not path.is_file():
        raise UsageError(
            f"{flag} {spec}: {path} is not a file; give an existing .py file or package.module"
        )
    path = path.resolve()

    # A private module name, so that the file cannot shadow an installed module.
    stem = re.sub(r"\W", "_", path.stem)
    name = f"spectrum_user_{stem}_{zlib.crc32(str(path).encode()):08x}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"{flag} {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(module_spec)

    # Imports of the file's neighbours work as they would under `python file.py`.
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise EvaluationError(
            f"{flag} {spec}: running {path.name} failed: {type(error).__name__}: {_first_line(error)}; "
            "fix the file (--verbose shows the traceback)"
        ) from error
    return module


def _call(factory: Callable[[], Any], spec: str, flag: str) -> Any:
    try:
        return factory()
    except Exception as error:
        raise EvaluationError(
            f"{flag} {spec}: calling it failed: {type(error).__name__}: {_first_line(error)}; it is called "
            "with no arguments (--verbose shows the traceback)"
        ) from error


def model_from_spec(spec: str) -> nn.Module:
    """Build the model a ``--model`` spec names.

    Parameters
    ----------
    spec
        ``package.module:callable`` or ``path/to/file.py:callable``.

    Returns
    -------
    torch.nn.Module
        What the callable returned.
    """
    model = _call(load_callable(spec, "--model"), spec, "--model")
    if not isinstance(model, nn.Module):
        raise EvaluationError(
            f"--model {spec} returned {_a(model)}, expected a torch.nn.Module; "
            "return the model itself, not its state dict or class"
        )
    return model


def data_from_spec(spec: str) -> EvaluationData:
    """Build the data a ``--data`` spec names, with its loss and error.

    Parameters
    ----------
    spec
        ``package.module:callable`` or ``path/to/file.py:callable``.

    Returns
    -------
    EvaluationData
        The splits, and the callable's ``loss_fn``/``error_fn`` where it set them.
    """
    returned = _call(load_callable(spec, "--data"), spec, "--data")
    splits = returned if isinstance(returned, Mapping) else getattr(returned, "splits", None)
    if not isinstance(splits, Mapping) or not splits:
        raise EvaluationError(
            f"--data {spec} returned {_a(returned)}, expected a non-empty mapping "
            "of split name to (inputs, targets) or to an iterable of batches, or an object "
            "with such a mapping as .splits"
        )
    data = EvaluationData({str(key): value for key, value in splits.items()})
    if not isinstance(returned, Mapping):
        data.loss_fn = getattr(returned, "loss_fn", cross_entropy)
        data.error_fn = getattr(returned, "error_fn", top1_error)
    for attribute in ("loss_fn", "error_fn"):
        value = getattr(data, attribute)
        if value is not None and not callable(value):
            raise EvaluationError(
                f"--data {spec}: its {attribute} is {_a(value)}, expected a "
                "callable (outputs, targets) -> batch mean"
            )
    if data.loss_fn is None:
        raise EvaluationError(f"--data {spec}: loss_fn is None; every evaluation needs a loss")
    return data


def is_sample(checkpoint: Path) -> bool:
    """Whether a checkpoint carries sample metadata that rebuilds its model and data."""
    try:
        return METADATA_KEY in read_metadata(Path(checkpoint))
    except (SpectrumError, OSError, ValueError):
        return False


def sample_model_and_data(checkpoint: Path) -> tuple[nn.Module, EvaluationData]:
    """Rebuild a sample checkpoint's model (weights not loaded) and data from its metadata.

    Parameters
    ----------
    checkpoint
        A ``.safetensors`` file written by ``scripts/make_samples.py``.

    Returns
    -------
    tuple
        The model, and its ``train`` and ``val`` splits with cross-entropy and top-1 error.
    """
    sample = rebuild_sample(Path(checkpoint))
    train, val = sample.data.train, sample.data.val
    return sample.model, EvaluationData({"train": (train.x, train.y), "val": (val.x, val.y)})


# ---------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint to evaluate it, by normalised name, in its own order.

    Parameters
    ----------
    path
        A checkpoint file or directory.

    Returns
    -------
    dict
        Name → tensor.

    Raises
    ------
    UsageError
        If the checkpoint cannot be read: a checkpoint given to evaluate is input the command
        cannot use, and nothing is measured.
    """
    try:
        return dict(load_tensors(Path(path)))
    except CheckpointError as error:
        raise UsageError(str(error)) from error


def require_finite(checkpoints: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Raise UsageError naming every checkpoint and entry that holds NaN or ±Inf.

    A non-finite weight makes every loss measured with it NaN; the command stops before it
    evaluates anything.

    Parameters
    ----------
    checkpoints
        A label for each checkpoint (its role and path) → its tensors by name.

    Raises
    ------
    UsageError
        One line: each checkpoint with non-finite entries, its entries and how many values.
    """
    found = []
    for label, tensors in checkpoints.items():
        bad = []
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                count = int((~torch.isfinite(tensor)).sum())
                if count:
                    bad.append(f"{name} ({count} of {tensor.numel()})")
        if bad:
            found.append(f"{label} in {_names(bad)}")
    if found:
        raise UsageError(
            f"non-finite values (NaN or ±Inf): {'; '.join(found)}; evaluate checkpoints with "
            "finite weights (one saved before training diverged)"
        )


# ---------------------------------------------------------------------------- the evaluator


@dataclass
class Evaluator:
    """One working model and its data, kept in memory, ready to score any weights.

    Build one with :func:`evaluator_for`. Weights are written into the model in place
    (:meth:`load`); nothing is copied per evaluation.

    Attributes
    ----------
    model
        The working model, on ``device``, in eval mode.
    data
        The splits as given, with the loss and error.
    model_source, data_source
        Where the model and data came from, in words (a spec or "sample metadata").
    batch_size
        Examples per batch for splits given as whole tensors.
    max_examples
        Keep at most this many examples of each split (None: all).
    device
        Where the model and the kept batches live.
    """

    model: nn.Module
    data: EvaluationData
    model_source: str
    data_source: str
    batch_size: int = DEFAULT_BATCH_SIZE
    max_examples: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _batches: dict[str, list[Batch]] = field(default_factory=dict, init=False, repr=False)
    _entries: dict[str, torch.Tensor] | None = field(default=None, init=False, repr=False)

    @property
    def split_names(self) -> list[str]:
        """The names of the data's splits, in the order given."""
        return list(self.data.splits)

    @property
    def entries(self) -> dict[str, torch.Tensor]:
        """The model's parameters and persistent buffers by normalised state-dict key."""
        if self._entries is None:
            state = self.model.state_dict(keep_vars=True)
            self._entries = {normalise_name(key): value for key, value in state.items()}
        return self._entries

    @property
    def has_batchnorm(self) -> bool:
        """Whether the model has BatchNorm layers that keep running statistics."""
        return any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            for module in self.model.modules()
        )

    def check_fit(self, tensors: Mapping[str, torch.Tensor], checkpoint: str) -> None:
        """Raise EvaluationError, listing every difference, unless the tensors fit the model.

        Parameters
        ----------
        tensors
            A checkpoint's tensors by normalised name.
        checkpoint
            The checkpoint, for the message.
        """
        problems = state_differences(
            dict(self.entries), dict(tensors), "only in the model", "only in the checkpoint"
        )
        if problems:
            raise EvaluationError(
                f"{checkpoint} does not fit the model from {self.model_source}: "
                f"{'; '.join(problems)}; build the architecture the checkpoint was saved from"
            )

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy weights into the working model in place (cast to each entry's dtype).

        Parameters
        ----------
        tensors
            Every entry of :attr:`entries`, by name; see :meth:`check_fit`.
        """
        with torch.no_grad():
            for name, target in self.entries.items():
                target.copy_(tensors[name])

    def batches(self, split: str) -> list[Batch]:
        """The batches of one split, read once and then kept in memory on the device.

        Parameters
        ----------
        split
            A split name of the data.

        Raises
        ------
        UsageError
            If the data have no such split.
        """
        if split not in self.data.splits:
            raise UsageError(
                f"no split {split!r} in the data from {self.data_source}; "
                f"splits: {', '.join(self.split_names)}"
            )
        if split not in self._batches:
            where = f"split {split!r} of {self.data_source}"
            with _user_code(f"reading {where}", "check what the data callable returns"):
                self._batches[split] = split_batches(
                    self.data.splits[split],
                    batch_size=self.batch_size,
                    max_examples=self.max_examples,
                    device=self.device,
                    where=where,
                )
        return self._batches[split]

    def evaluate(self, split: str) -> Scores:
        """Loss and error of the working model's current weights on one split.

        Raises
        ------
        EvaluationError
            If the model fails on the data (wrong input shape, outputs the loss cannot take).
        """
        batches = self.batches(split)
        with _user_code(
            f"evaluating the model from {self.model_source} on split {split!r} of "
            f"{self.data_source}",
            "check that the data fit the model and its loss",
        ):
            return evaluate(self.model, batches, self.data.loss_fn, self.data.error_fn)

    def reset_batchnorm(self) -> None:
        """Recompute BatchNorm running statistics of the current weights on the train split.

        One pass over the kept ``train`` batches with ``torch.optim.swa_utils.update_bn``
        (a cumulative average over batches); the model is left in eval mode.
        """
        from torch.optim.swa_utils import update_bn

        if TRAIN_SPLIT not in self.data.splits:
            raise EvaluationError(
                f"recomputing BatchNorm statistics needs a {TRAIN_SPLIT!r} split, but the data "
                f"from {self.data_source} have {', '.join(self.split_names)}; add one or pass "
                "--no-bn-reset"
            )
        # update_bn calls model(batch[0]) for tuple batches: wrap the inputs so they pass whole.
        loader = [(inputs,) for inputs, _ in self.batches(TRAIN_SPLIT)]
        with _user_code(
            f"recomputing BatchNorm statistics on the {TRAIN_SPLIT!r} split of {self.data_source}",
            "check that the data fit the model, or pass --no-bn-reset",
        ):
            update_bn(loader, _Caller(self.model))
        self.model.eval()


@contextmanager
def _user_code(doing: str, remedy: str) -> Iterator[None]:
    """Turn any exception from the user's model, data or loss into one EvaluationError line."""
    try:
        yield
    except SpectrumError:
        raise
    except Exception as error:
        raise EvaluationError(
            f"{doing} failed: {type(error).__name__}: {_first_line(error)}; {remedy} "
            "(--verbose shows the traceback)"
        ) from error


class _Caller(nn.Module):
    """Calls a model with a batch's inputs as the contract says (tensor, tuple or dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return call_model(self.model, inputs)


def evaluator_for(
    checkpoint: Path,
    model_spec: str | None = None,
    data_spec: str | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_examples: int | None = None,
    device: torch.device | None = None,
) -> Evaluator:
    """The model and data that evaluate a checkpoint: from specs, or from sample metadata.

    Parameters
    ----------
    checkpoint
        The checkpoint to evaluate (the first, for a pair); its metadata rebuilds model and data
        when no spec is given.
    model_spec, data_spec
        ``--model`` and ``--data``; give both or neither.
    batch_size
        Examples per batch for splits given as whole tensors.
    max_examples
        Keep at most this many examples of each split.
    device
        Where to evaluate; the CPU by default.

    Returns
    -------
    Evaluator
        Its model on ``device`` in eval mode; no weights loaded yet.

    Raises
    ------
    UsageError
        If only one spec is given, or none for a checkpoint that is not a sample.
    """
    if (model_spec is None) != (data_spec is None):
        given, missing = ("--model", "--data") if data_spec is None else ("--data", "--model")
        raise UsageError(f"{given} needs {missing} too; give both, or neither for a sample")
    if batch_size < 1 or (max_examples is not None and max_examples < 1):
        raise UsageError(
            f"--batch-size and --max-examples must be positive, got {batch_size}, {max_examples}"
        )
    if model_spec is not None and data_spec is not None:
        model, data = model_from_spec(model_spec), data_from_spec(data_spec)
        model_source, data_source = f"--model {model_spec}", f"--data {data_spec}"
    elif is_sample(checkpoint):
        model, data = sample_model_and_data(checkpoint)
        model_source = data_source = f"the sample metadata of {Path(checkpoint).name}"
    else:
        raise UsageError(
            f"{checkpoint} is not a sample checkpoint (no {METADATA_KEY!r} metadata); pass "
            "--model module:callable and --data module:callable that build its model and data"
        )
    device = device or torch.device("cpu")
    model.to(device).eval()
    return Evaluator(
        model, data, model_source, data_source, batch_size, max_examples, device=device
    )


# ---------------------------------------------------------------------------- batches and scores


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model on a batch's inputs: ``model(x)``, ``model(*inputs)`` or ``model(**inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def split_batches(
    split: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_examples: int | None = None,
    device: torch.device | None = None,
    where: str = "split",
) -> list[Batch]:
    """Read a split once into a list of (inputs, targets) batches on a device.

    Parameters
    ----------
    split
        ``(inputs, targets)`` tensors or arrays (n, …), cut into batches of ``batch_size``; or
        an iterable of ``(inputs, targets)`` batches, read to the end.
    batch_size
        Examples per batch, for whole tensors.
    max_examples
        Keep the first this many examples (the last batch is cut).
    device
        Where the batches are kept.
    where
        The split, for messages.

    Returns
    -------
    list of tuple
        Batches; inputs keep their structure (tensor, tuple, list or dict of tensors).
    """
    device = device or torch.device("cpu")
    if _is_tensor_pair(split):
        inputs, targets = (_as_tensor(part).to(device) for part in split)
        if len(inputs) != len(targets):
            raise EvaluationError(
                f"{where}: inputs hold {len(inputs)} examples but targets {len(targets)}"
            )
        n = len(targets) if max_examples is None else min(max_examples, len(targets))
        return [
            (inputs[i : min(i + batch_size, n)], targets[i : min(i + batch_size, n)])
            for i in range(0, n, batch_size)
        ]
    if isinstance(split, torch.utils.data.Dataset) and not isinstance(
        split, torch.utils.data.IterableDataset
    ):
        raise EvaluationError(
            f"{where} is {_a(split)} of single examples, not of batches; wrap it "
            "in torch.utils.data.DataLoader(dataset, batch_size=...)"
        )
    if not isinstance(split, Iterable) or isinstance(split, (str, bytes, torch.Tensor)):
        raise EvaluationError(
            f"{where} is {_a(split)}; expected (inputs, targets) tensors or an "
            "iterable of (inputs, targets) batches such as a DataLoader"
        )

    batches: list[Batch] = []
    kept = 0
    for i, batch in enumerate(split):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise EvaluationError(
                f"{where}: batch {i} is {_a(batch)}, expected an (inputs, targets) pair"
            )
        inputs, targets = _to_device(batch[0], device), _as_tensor(batch[1]).to(device)
        if targets.dim() == 0:
            raise EvaluationError(
                f"{where}: batch {i} has a scalar target, as a Dataset of single examples "
                "gives; wrap it in torch.utils.data.DataLoader(dataset, batch_size=...)"
            )
        if max_examples is not None and kept + len(targets) > max_examples:
            take = max_examples - kept
            inputs, targets = _head(inputs, take), targets[:take]
        batches.append((inputs, targets))
        kept += len(targets)
        if max_examples is not None and kept >= max_examples:
            break
    return batches


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn = cross_entropy,
    error_fn: LossFn | None = top1_error,
) -> Scores:
    """Mean loss and error of a model over batches, in inference mode and eval mode.

    Parameters
    ----------
    model
        The model; it is put in eval mode.
    batches
        ``(inputs, targets)`` pairs.
    loss_fn, error_fn
        Batch means ``f(outputs, targets)``; batches are weighted by ``len(targets)``.
        ``error_fn`` None: no error.

    Returns
    -------
    Scores
        The means over all examples.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    error_sum = torch.zeros((), dtype=torch.float64)
    examples = 0

    # Sums stay tensors on the model's device: one synchronisation at the end, not per batch.
    with torch.inference_mode():
        for inputs, targets in batches:
            outputs = call_model(model, inputs)
            count = len(targets)
            loss = torch.as_tensor(loss_fn(outputs, targets))
            loss_sum = loss_sum.to(loss.device) + loss.to(torch.float64) * count
            if error_fn is not None:
                error = torch.as_tensor(error_fn(outputs, targets))
                error_sum = error_sum.to(error.device) + error.to(torch.float64) * count
            examples += count
    if examples == 0:
        raise EvaluationError("no examples to evaluate: the split is empty")
    return Scores(
        float(loss_sum) / examples,
        None if error_fn is None else float(error_sum) / examples,
        examples,
    )


def state_differences(
    left: Mapping[str, torch.Tensor],
    right: Mapping[str, torch.Tensor],
    left_only: str,
    right_only: str,
) -> list[str]:
    """Describe every difference in names, shapes and kinds between two sets of named tensors.

    Parameters
    ----------
    left, right
        Tensors by name.
    left_only, right_only
        How to introduce names found on one side only.

    Returns
    -------
    list of str
        One phrase per kind of difference; empty when names, shapes and kinds (floating or not)
        all agree.
    """
    problems = []
    missing = [name for name in left if name not in right]
    extra = [name for name in right if name not in left]
    if missing:
        problems.append(f"{left_only}: {_names(missing)}")
    if extra:
        problems.append(f"{right_only}: {_names(extra)}")
    shapes = [
        f"{name} {tuple(left[name].shape)} vs {tuple(right[name].shape)}"
        for name in left
        if name in right and left[name].shape != right[name].shape
    ]
    if shapes:
        problems.append(f"shapes differ: {_names(shapes)}")
    kinds = [
        f"{name} {_kind(left[name])} vs {_kind(right[name])}"
        for name in left
        if name in right and left[name].is_floating_point() != right[name].is_floating_point()
    ]
    if kinds:
        problems.append(f"dtypes differ: {_names(kinds)}")
    return problems


def _names(items: list[str]) -> str:
    """Every item, comma-separated: a message that stops the command lists all it found."""
    return ", ".join(items)


def _a(value: Any) -> str:
    """The type of a value with its article: "a dict", "an int"."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _kind(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _is_tensor_pair(split: Any) -> bool:
    return (
        isinstance(split, (tuple, list))
        and len(split) == 2
        and all(isinstance(part, (torch.Tensor, np.ndarray)) for part in split)
    )


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    return torch.as_tensor(value)


def _to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        return _as_tensor(inputs).to(device)
    if isinstance(inputs, Mapping):
        return {key: _to_device(value, device) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to_device(value, device) for value in inputs)
    return inputs


def _head(inputs: Any, count: int) -> Any:
    """The first ``count`` examples of a batch's inputs, whatever their structure."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:count]
    if isinstance(inputs, Mapping):
        return {key: _head(value, count) for key, value in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_head(value, count) for value in inputs)
    return inputs
