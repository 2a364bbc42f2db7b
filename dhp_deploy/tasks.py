r"""Image tensors → continual-learning task sequences, and seeded batching.

Benchmarks (docs/DESIGN.md §1); task ids are 0-based list indices (the paper's "task 1" is ``0``):

- ``split-mnist``: 5 tasks with classes {0,1} {2,3} {4,5} {6,7} {8,9}. Scenario ``"task"``
  (multi-head, evaluated within the task's classes), or ``"class"`` with ``class_incremental``.
- ``split-fashion-mnist``: the same on Fashion-MNIST.
- ``permuted-mnist``: 10 tasks over all 10 classes (scenario ``"domain"``). Task 0 keeps the
  original pixel order; task t ≥ 1 applies ``torch.randperm(784)`` number t drawn from one
  ``torch.Generator`` seeded with ``seed``, so a shorter sequence is a prefix of a longer one.
- ``imbalanced-permuted-mnist``: ``permuted-mnist`` with each task's TRAINING set subsampled
  (validation and test stay balanced). The scheme, from :func:`imbalance_fractions`: task t
  draws a class order (a seeded permutation of the 10 classes); the class at rank r keeps the
  fraction ``f_r = 0.1 ** (r / 9)`` of its examples — geometric from 1.0 down to 0.1, an
  imbalance ratio of 10 — i.e. ``round(f_c * n_c)`` seeded-random examples of class c, where
  n_c counts class c in the balanced training set that ``permuted-mnist`` with the same
  arguments would give.

Every task's data is built in this order, each step seeded by (seed, step, task) alone so that
options do not disturb one another: the task's examples (its classes) → at most ``train_limit``
/ ``test_limit`` of them → a ``val_fraction`` carve from the training ones → (imbalanced only)
class subsampling of the rest. Pixels are float32 ``x / 255`` flattened row-major to 784.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dhp_deploy.data import DataError, load_split, validate_labels



@dataclass(frozen=True)
class BenchmarkSpec:
    r"""A named task sequence: which dataset, cut how (``"split"``: class pairs, scenario
    "task" or "class"; ``"permuted"``: pixel permutations, scenario "domain"), and whether each
    task's training set is class-imbalanced. A new benchmark of these kinds is one entry here."""

    name: str
    dataset: str  # a folder of dhp_deploy.data: "MNIST" or "FashionMNIST"
    kind: str  # "split" or "permuted"
    imbalanced: bool = False


SPECS = {spec.name: spec for spec in (
    BenchmarkSpec("split-mnist", "MNIST", "split"),
    BenchmarkSpec("permuted-mnist", "MNIST", "permuted"),
    BenchmarkSpec("imbalanced-permuted-mnist", "MNIST", "permuted", imbalanced=True),
    BenchmarkSpec("split-fashion-mnist", "FashionMNIST", "split"),
)}
BENCHMARKS = tuple(SPECS)
NUM_CLASSES = 10
INPUT_SIZE = 28 * 28
SPLIT_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
DEFAULT_PERMUTED_TASKS = 10
IMBALANCE_MIN_FRACTION = 0.1  # the rarest class keeps 10% of its examples

# Independent random streams per build step, so e.g. changing val_fraction never changes which
# examples train_limit picks.
_STREAM_TRAIN_LIMIT, _STREAM_TEST_LIMIT, _STREAM_VAL = 1, 2, 3
_STREAM_CLASS_ORDER, _STREAM_IMBALANCE = 4, 5


@dataclass
class Task:
    r"""One task of a sequence. Pixels float32 ``[N, 784]`` in [0, 1], labels int64 global ids."""

    task_id: int  # 0-based position in the sequence
    classes: tuple[int, ...]  # global class ids this task trains and evaluates on
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor  # empty [0, 784] when val_fraction == 0
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    permutation: torch.Tensor | None = None  # pixel order applied (int64 [784], CPU), if any

    @property
    def sizes(self) -> dict[str, int]:
        r"""Example counts: ``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


@dataclass
class Benchmark:
    r"""A task sequence plus what a model and a report need to know about it."""

    name: str
    tasks: list[Task]
    scenario: str  # "task" (multi-head), "class" (class-incremental) or "domain" (permuted)
    seed: int
    num_classes: int = NUM_CLASSES
    input_size: int = INPUT_SIZE
    scheme: str = ""  # one line saying how the tasks were built (for reports and manifests)
    options: dict = field(default_factory=dict)  # build arguments beyond name and seed

    def describe(self) -> dict:
        r"""JSON-able summary: scenario, scheme, and per task its classes and sizes."""
        return {
            "name": self.name,
            "scenario": self.scenario,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "num_tasks": len(self.tasks),
            "scheme": self.scheme,
            "options": dict(self.options),
            "tasks": [
                {
                    "task_id": t.task_id,
                    "classes": list(t.classes),
                    "sizes": t.sizes,
                    "train_class_counts": _class_counts(t.y_train),
                    "permuted": t.permutation is not None and t.task_id > 0,
                }
                for t in self.tasks
            ],
        }


def _class_counts(y: torch.Tensor) -> list[int]:
    return torch.bincount(y.cpu(), minlength=NUM_CLASSES).tolist()


# --------------------------------------------------------------------------- randomness


def seeded_generator(*parts) -> torch.Generator:
    r"""A CPU generator seeded from ``parts`` alone: the first 8 bytes of the sha256 of
    ``"/".join(parts)``, so neighbouring seeds or keys share nothing. The one way the data and the
    training loop derive their random streams (``steps.derived_generator`` too)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _generator(seed: int, stream: int, task_id: int) -> torch.Generator:
    return seeded_generator("dhp", seed, stream, task_id)  # a stable stream per (seed, task)


def permutations(num_tasks: int, seed: int) -> list[torch.Tensor]:
    r"""Pixel orders of a permuted sequence: identity first, then seeded ``randperm(784)``."""
    generator = torch.Generator().manual_seed(seed)
    perms = [torch.arange(INPUT_SIZE)]
    perms += [torch.randperm(INPUT_SIZE, generator=generator) for _ in range(num_tasks - 1)]
    return perms


def imbalance_fractions(task_id: int, seed: int) -> list[float]:
    r"""Fraction of each class's training examples kept in ``imbalanced-permuted-mnist``.

    Returns a list indexed by class id: the class at rank r of the task's seeded class order
    keeps ``0.1 ** (r / 9)``, from 1.0 (most frequent) down to 0.1 (rarest).
    """
    order = torch.randperm(NUM_CLASSES, generator=_generator(seed, _STREAM_CLASS_ORDER, task_id))
    fractions = [0.0] * NUM_CLASSES
    for rank, cls in enumerate(order.tolist()):
        fractions[cls] = IMBALANCE_MIN_FRACTION ** (rank / (NUM_CLASSES - 1))
    return fractions


def _subset(index: torch.Tensor, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    # A seeded random subset kept in file order. Masks, not sort: sorting 60k ints costs ~70 ms
    # here, a mask ~1 ms.
    if limit is None or len(index) <= limit:
        return index
    return index[_mask(len(index), torch.randperm(len(index), generator=generator)[:limit])]


def _carve(index: torch.Tensor, fraction: float, generator: torch.Generator):
    # (train, val): a random floor(fraction * n) examples go to val, disjoint from train.
    n_val = int(fraction * len(index))
    if n_val == 0:
        return index, index[:0]
    val = _mask(len(index), torch.randperm(len(index), generator=generator)[:n_val])
    return index[~val], index[val]


def _imbalance(index, labels, fractions, generator) -> torch.Tensor:
    # Keep round(f_c * n_c) random examples of each class c: the first ones of that class in
    # one seeded shuffle. Ten masked passes, no per-sample Python.
    order = torch.randperm(len(index), generator=generator)
    label_in_order = labels[index][order]
    keep = []
    for cls, fraction in enumerate(fractions):
        of_class = order[label_in_order == cls]
        keep.append(of_class[: round(fraction * len(of_class))])
    return index[_mask(len(index), torch.cat(keep))]


def _mask(n: int, positions: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    return mask


# --------------------------------------------------------------------------- building


def build_benchmark(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    permutation_seed: int | None = None,
    val_fraction: float = 0.0,
    device: str | torch.device = "cpu",
    class_incremental: bool = False,
    num_tasks: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    download: bool = False,
) -> Benchmark:
    r"""Build a named task sequence from the MNIST-family files under ``data_dir``.

    Args:
        name: one of :data:`BENCHMARKS`.
        data_dir: data root (None → ``$DHP_DATA_DIR`` → ``./data``), torchvision layout.
        seed: seeds permutations, limits, the validation carve and the imbalance.
        permutation_seed: permuted benchmarks: seeds the permutations instead of ``seed``.
        val_fraction: in [0, 1): share of each task's training examples held out for
            validation (tuning), disjoint from train. 0 gives empty val tensors.
        device: where the task tensors live.
        class_incremental: split benchmarks only: scenario "class" instead of "task".
        num_tasks: first tasks only (default and maximum 5 for split; default 10 for
            permuted, where any positive count works).
        train_limit, test_limit: at most this many seeded-random examples per task (before the
            validation carve), for quick runs.
        download: fetch missing files from the public mirrors.

    Raises:
        DataError: an unknown name, an argument out of range, or a missing/corrupt file.
    """
    _check_arguments(name, val_fraction, class_incremental, num_tasks, train_limit, test_limit)
    spec = SPECS[name]
    if permutation_seed is not None and (spec.kind != "permuted" or permutation_seed < 0):
        raise DataError(f"permutation_seed={permutation_seed} for {name!r}, expected a "
                        f"non-negative seed of a permuted benchmark")
    dataset = spec.dataset
    x_train, y_train = load_split(data_dir, dataset, train=True, download=download)
    x_test, y_test = load_split(data_dir, dataset, train=False, download=download)
    validate_labels(y_train, NUM_CLASSES, f"{dataset} train labels")
    validate_labels(y_test, NUM_CLASSES, f"{dataset} test labels")
    pixels_train, pixels_test = x_train.reshape(-1, INPUT_SIZE), x_test.reshape(-1, INPUT_SIZE)

    if spec.kind == "split":
        plans = [(t, classes, None) for t, classes in enumerate(SPLIT_CLASSES[: num_tasks or 5])]
        scenario = "class" if class_incremental else "task"
    else:
        perms = permutations(num_tasks or DEFAULT_PERMUTED_TASKS,
                             seed if permutation_seed is None else permutation_seed)
        plans = [(t, tuple(range(NUM_CLASSES)), perm) for t, perm in enumerate(perms)]
        scenario = "domain"
    limits = dict(train_limit=train_limit, test_limit=test_limit, val_fraction=val_fraction)
    tasks = [
        _build_task(t, classes, perm, pixels_train, y_train, pixels_test, y_test,
                    seed=seed, imbalanced=spec.imbalanced, device=device, **limits)
        for t, classes, perm in plans
    ]
    return Benchmark(
        name=name, tasks=tasks, scenario=scenario, seed=seed, scheme=_scheme(spec, scenario),
        options=dict(limits, dataset=dataset, class_incremental=class_incremental,
                     **({} if permutation_seed is None else {"permutation_seed": permutation_seed})),
    )


def _check_arguments(name, val_fraction, class_incremental, num_tasks, train_limit, test_limit):
    if name not in SPECS:
        raise DataError(f"unknown benchmark {name!r}, expected one of {', '.join(SPECS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}, expected a value in [0, 1)")
    split = SPECS[name].kind == "split"
    if class_incremental and not split:
        raise DataError(f"class_incremental=True with {name!r}, expected a split benchmark")
    if num_tasks is not None and not 1 <= num_tasks <= (len(SPLIT_CLASSES) if split else 10**6):
        most = f"[1, {len(SPLIT_CLASSES)}]" if split else "a positive count"
        raise DataError(f"num_tasks={num_tasks} for {name!r}, expected {most}")
    for label, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit < 1:
            raise DataError(f"{label}={limit}, expected a positive count or None")


def _build_task(task_id, classes, perm, pixels_train, y_train, pixels_test, y_test, *, seed,
                imbalanced, device, train_limit, test_limit, val_fraction) -> Task:
    train_index = _class_index(y_train, classes)
    train_index = _subset(train_index, train_limit, _generator(seed, _STREAM_TRAIN_LIMIT, task_id))
    test_index = _class_index(y_test, classes)
    test_index = _subset(test_index, test_limit, _generator(seed, _STREAM_TEST_LIMIT, task_id))
    train_index, val_index = _carve(train_index, val_fraction,
                                    _generator(seed, _STREAM_VAL, task_id))
    if imbalanced:
        train_index = _imbalance(train_index, y_train, imbalance_fractions(task_id, seed),
                                 _generator(seed, _STREAM_IMBALANCE, task_id))

    def pick(pixels, labels, index):
        return _pixels(pixels, index, perm).to(device), labels[index].to(device)

    return Task(task_id, tuple(classes), *pick(pixels_train, y_train, train_index),
                *pick(pixels_train, y_train, val_index), *pick(pixels_test, y_test, test_index),
                permutation=perm)


def _class_index(labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    if len(classes) == NUM_CLASSES:
        return torch.arange(len(labels))
    return torch.isin(labels, torch.tensor(classes)).nonzero().squeeze(1)


def _pixels(pixels: torch.Tensor, index: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    # Gather on uint8 (4x less memory traffic than float), then scale like torchvision's
    # ToTensor. Indices are unique and in file order, so a full-length index is every row.
    rows = pixels if len(index) == len(pixels) else pixels.index_select(0, index)
    if perm is not None and not _is_identity(perm):
        # numpy's take is ~4x faster than torch's column index_select on this CPU.
        rows = torch.from_numpy(np.take(rows.numpy(), perm.numpy(), axis=1))
    return rows.to(torch.float32).div_(255)


def _is_identity(perm: torch.Tensor) -> bool:
    # The identity order needs no gather.
    return torch.equal(perm, torch.arange(len(perm)))


def _scheme(spec: BenchmarkSpec, scenario: str) -> str:
    if spec.kind == "split":
        return f"split into class pairs {list(SPLIT_CLASSES)}; scenario {scenario}"
    scheme = "task 0 identity, task t>=1 seeded randperm(784) of the pixels"
    if spec.imbalanced:
        scheme += ("; train class c keeps round(0.1**(rank_c/9) * n_c) examples, rank_c from a "
                   "seeded class order per task (val/test balanced)")
    return scheme


# --------------------------------------------------------------------------- batching


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    part: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    r"""One epoch of ``(xb, yb)`` minibatches; the last one may be smaller.

    ``part`` (data-parallel training: :meth:`dhp_deploy.distributed.Replicas.shard`) picks this
    process's rows of each batch's indices before they are gathered.

    The epoch's order is one ``torch.randperm(n, generator=generator)``, drawn when this is
    called (not lazily at the first ``next``), so the generator's state right after the call
    already accounts for this epoch. Same generator state → same batches. Indexing happens on
    the data's device; ``shuffle=False`` gives file order and leaves the generator untouched.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected a positive count")
    if len(x) != len(y):
        raise ValueError(f"x holds {len(x)} examples but y {len(y)}, expected equal counts")
    order = None
    if shuffle:
        order = torch.randperm(len(x), generator=generator, device=generator.device)
        order = order.to(x.device)
    return _slices(x, y, batch_size, order, part)


def _slices(x, y, batch_size, order, part) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(x), batch_size):
        if order is None and part is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
            continue
        index = (torch.arange(start, min(start + batch_size, len(x)), device=x.device)
                 if order is None else order[start : start + batch_size])
        if part is not None:
            index = part(index)
        yield x.index_select(0, index), y.index_select(0, index)  # 4x faster than x[index]
