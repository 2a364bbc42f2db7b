r"""dhp_deploy.tasks: task facts and exact pixels on the real MNIST files; seeding, imbalance,
limits and carving on synthetic MNIST-format files (the fast lane); batching."""
import json

import pytest
import torch

from dhp_deploy import tasks as B
from dhp_deploy.data import DataError, load_split

SMALL = dict(train_limit=2000, test_limit=300)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.cpu().numpy()}


@pytest.fixture(scope="module")
def split_mnist(data_dir):
    return B.build_benchmark("split-mnist", data_dir)


@pytest.fixture(scope="module")
def raw_mnist(data_dir):
    x_train, y_train = load_split(data_dir, "MNIST", train=True)
    x_test, y_test = load_split(data_dir, "MNIST", train=False)
    return x_train.reshape(-1, 784), y_train, x_test.reshape(-1, 784), y_test


# --------------------------------------------------------------------------- split


def test_split_mnist_facts(split_mnist, raw_mnist):
    tasks = split_mnist.tasks
    assert split_mnist.scenario == "task" and split_mnist.num_classes == 10
    assert split_mnist.input_size == 784 and len(tasks) == 5
    assert tasks[0].sizes == {"train": 12665, "val": 0, "test": 2115}
    assert sum(t.sizes["train"] for t in tasks) == 60000
    assert sum(t.sizes["test"] for t in tasks) == 10000
    pixels_train, y_train, _, _ = raw_mnist
    for t, classes in zip(tasks, [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]):
        assert t.classes == classes and t.permutation is None
        assert set(t.y_train.unique().tolist()) == set(classes) == set(t.y_test.unique().tolist())
        assert t.x_val.shape == (0, 784) and t.y_val.shape == (0,)
    # Exact pixels: the task's rows of the file, in file order, scaled by 1/255.
    mask = (y_train == 0) | (y_train == 1)
    assert torch.equal(tasks[0].x_train, pixels_train[mask].float() / 255)
    assert torch.equal(tasks[0].y_train, y_train[mask])


def test_task_tensors_dtype_and_range(split_mnist):
    for t in split_mnist.tasks:
        for x, y in ((t.x_train, t.y_train), (t.x_val, t.y_val), (t.x_test, t.y_test)):
            assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == 784
            assert y.dtype == torch.int64 and len(y) == len(x)
        assert 0.0 <= t.x_train.min() and t.x_train.max() <= 1.0 and t.x_train.max() == 1.0


def test_class_incremental_and_describe(synthetic_mnist):
    bench = B.build_benchmark("split-mnist", synthetic_mnist, class_incremental=True, num_tasks=2,
                              **SMALL)
    assert bench.scenario == "class" and len(bench.tasks) == 2
    summary = json.loads(json.dumps(bench.describe()))
    assert summary["scenario"] == "class" and summary["num_tasks"] == 2
    assert summary["tasks"][1]["classes"] == [2, 3]
    assert summary["tasks"][1]["sizes"] == {"train": 2000, "val": 0, "test": 300}
    assert sum(summary["tasks"][1]["train_class_counts"]) == 2000


def test_split_fashion_mnist(data_dir):
    if not (data_dir / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("no FashionMNIST files")
    bench = B.build_benchmark("split-fashion-mnist", data_dir, test_limit=None, train_limit=None,
                              num_tasks=2)
    assert [t.sizes for t in bench.tasks] == [{"train": 12000, "val": 0, "test": 2000}] * 2
    assert bench.tasks[1].classes == (2, 3)


# --------------------------------------------------------------------------- permuted


def test_permuted_mnist_permutations(data_dir, raw_mnist):
    bench = B.build_benchmark("permuted-mnist", data_dir, num_tasks=4, train_limit=500)
    _, _, pixels_test, y_test = raw_mnist
    assert bench.scenario == "domain" and len(bench.tasks) == 4
    assert torch.equal(bench.tasks[0].x_test, pixels_test.float() / 255)  # task 0 unpermuted
    perms = [t.permutation for t in bench.tasks]
    assert torch.equal(perms[0], torch.arange(784))
    for t, perm in zip(bench.tasks, perms):
        assert torch.equal(perm.sort().values, torch.arange(784))
        assert torch.equal(t.x_test, pixels_test[:, perm].float() / 255)
        assert torch.equal(t.y_test, y_test) and t.classes == tuple(range(10))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(perms[i], perms[j])


def test_permutations_seeded(synthetic_mnist):
    tiny = dict(train_limit=50, test_limit=50, num_tasks=3)
    a = B.build_benchmark("permuted-mnist", synthetic_mnist, seed=7, **tiny)
    b = B.build_benchmark("permuted-mnist", synthetic_mnist, seed=7, **tiny)
    c = B.build_benchmark("permuted-mnist", synthetic_mnist, seed=8, **tiny)
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks):
        assert torch.equal(ta.permutation, tb.permutation) and torch.equal(ta.x_train, tb.x_train)
        assert torch.equal(ta.x_test, tb.x_test)
        assert ta.task_id == 0 or not torch.equal(ta.permutation, tc.permutation)
    # A shorter sequence is a prefix of a longer one; the default length is 10.
    assert all(torch.equal(p, q) for p, q in zip(B.permutations(3, 7), B.permutations(10, 7)))
    assert len(B.build_benchmark("permuted-mnist", synthetic_mnist, train_limit=10, test_limit=10).tasks) \
        == 10


def test_a_permutation_seed_fixes_the_tasks_and_leaves_the_rest_to_the_seed(synthetic_mnist):
    tiny = dict(train_limit=50, test_limit=50, num_tasks=3)
    fixed = [B.build_benchmark("imbalanced-permuted-mnist", synthetic_mnist, seed=seed,
                               permutation_seed=0, **tiny) for seed in (0, 1)]
    redrawn = B.build_benchmark("imbalanced-permuted-mnist", synthetic_mnist, seed=0, **tiny)
    for a, b, own in zip(fixed[0].tasks, fixed[1].tasks, redrawn.tasks):
        assert torch.equal(a.permutation, b.permutation)  # one sequence of tasks for both seeds
        assert torch.equal(a.x_train, own.x_train)  # seed 0 with its own seed's permutations
        assert a.task_id == 0 or not torch.equal(a.y_train, b.y_train)  # subsets: the seed's
    assert fixed[0].describe()["options"]["permutation_seed"] == 0
    with pytest.raises(DataError, match="permutation_seed"):
        B.build_benchmark("split-mnist", synthetic_mnist, permutation_seed=0, **tiny)


def test_a_benchmark_of_a_known_kind_is_one_spec(data_dir, monkeypatch):
    spec = B.BenchmarkSpec("permuted-fashion-mnist", "FashionMNIST", "permuted")
    monkeypatch.setitem(B.SPECS, spec.name, spec)
    bench = B.build_benchmark(spec.name, data_dir, num_tasks=2, train_limit=50, test_limit=50)
    assert (bench.scenario, bench.options["dataset"], len(bench.tasks)) == \
        ("domain", "FashionMNIST", 2)
    assert not torch.equal(bench.tasks[1].permutation, torch.arange(784))


def test_imbalance_realised_equals_scheme(synthetic_mnist):
    options = dict(seed=3, num_tasks=3, train_limit=6000, test_limit=300, val_fraction=0.1)
    balanced = B.build_benchmark("permuted-mnist", synthetic_mnist, **options)
    imbalanced = B.build_benchmark("imbalanced-permuted-mnist", synthetic_mnist, **options)
    assert imbalanced.scenario == "domain"
    for bal, imb in zip(balanced.tasks, imbalanced.tasks):
        fractions = B.imbalance_fractions(imb.task_id, 3)
        n = torch.bincount(bal.y_train, minlength=10).tolist()
        expected = [round(f * n_c) for f, n_c in zip(fractions, n)]
        assert torch.bincount(imb.y_train, minlength=10).tolist() == expected
        assert _rows(imb.x_train) <= _rows(bal.x_train)  # a subsample of the balanced set
        # Validation and test stay balanced: identical to permuted-mnist's.
        assert torch.equal(imb.x_val, bal.x_val) and torch.equal(imb.y_test, bal.y_test)
        assert torch.equal(imb.x_test, bal.x_test)


def test_imbalance_fractions_scheme():
    for task_id in range(3):
        fractions = B.imbalance_fractions(task_id, seed=0)
        assert fractions == B.imbalance_fractions(task_id, seed=0)
        ranked = sorted(fractions, reverse=True)
        assert ranked[0] == 1.0 and ranked[-1] == pytest.approx(0.1)
        ratios = [ranked[r + 1] / ranked[r] for r in range(9)]
        assert ratios == pytest.approx([0.1 ** (1 / 9)] * 9)  # geometric
    orders = {tuple(B.imbalance_fractions(t, 0)) for t in range(5)}
    assert len(orders) == 5  # each task its own class order
    assert B.imbalance_fractions(0, 0) != B.imbalance_fractions(0, 1)


# --------------------------------------------------------------------------- limits, validation


def test_val_carve_disjoint_and_seeded(synthetic_mnist):
    plain = B.build_benchmark("split-mnist", synthetic_mnist, num_tasks=1, **SMALL)
    carved = B.build_benchmark("split-mnist", synthetic_mnist, num_tasks=1, val_fraction=0.25, **SMALL)
    again = B.build_benchmark("split-mnist", synthetic_mnist, num_tasks=1, val_fraction=0.25, **SMALL)
    task, pool = carved.tasks[0], plain.tasks[0]
    assert task.sizes == {"train": 1500, "val": 500, "test": 300}
    train, val = _rows(task.x_train), _rows(task.x_val)
    assert len(train) == 1500 and len(val) == 500 and not train & val
    assert train | val == _rows(pool.x_train)  # the limit's pick does not depend on the carve
    assert torch.equal(task.x_test, pool.x_test)
    assert torch.equal(task.x_val, again.tasks[0].x_val)
    other = B.build_benchmark("split-mnist", synthetic_mnist, num_tasks=1, seed=1, **SMALL)
    assert not torch.equal(other.tasks[0].y_train, pool.y_train) or \
        not torch.equal(other.tasks[0].x_train, pool.x_train)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="split-cifar"), "unknown benchmark 'split-cifar', expected one of split-mnist, "
                               "permuted-mnist, imbalanced-permuted-mnist, split-fashion-mnist"),
    (dict(val_fraction=1.0), "val_fraction=1.0, expected a value in \\[0, 1\\)"),
    (dict(num_tasks=6), "num_tasks=6 for 'split-mnist', expected \\[1, 5\\]"),
    (dict(train_limit=0), "train_limit=0, expected a positive count"),
    (dict(name="permuted-mnist", class_incremental=True), "expected a split benchmark"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    # Arguments are checked before any file is read: tmp_path holds no data.
    kwargs = {"name": "split-mnist", **kwargs}
    with pytest.raises(DataError, match=message):
        B.build_benchmark(data_dir=tmp_path, **kwargs)


def test_build_validates_labels(monkeypatch):
    def bad_split(root, dataset, train, download):
        return torch.zeros(4, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2, 10])
    monkeypatch.setattr(B, "load_split", bad_split)
    with pytest.raises(DataError, match="MNIST train labels: labels span \\[0, 10\\]"):
        B.build_benchmark("split-mnist")


# --------------------------------------------------------------------------- batching


def test_batches_cover_epoch_and_reproduce():
    n, batch_size = 1000, 64
    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)
    epoch = list(B.batches(x, y, batch_size, torch.Generator().manual_seed(5)))
    assert [len(yb) for _, yb in epoch] == [64] * 15 + [40]
    seen = torch.cat([yb for _, yb in epoch])
    assert torch.equal(seen.sort().values, torch.arange(n)) and not torch.equal(seen, y)
    assert all(torch.equal(xb[:, 0].long(), yb) for xb, yb in epoch)
    again = list(B.batches(x, y, batch_size, torch.Generator().manual_seed(5)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(epoch, again))


def test_batches_generator_state():
    x, y = torch.zeros(100, 3), torch.arange(100)
    generator = torch.Generator().manual_seed(0)
    first = torch.cat([yb for _, yb in B.batches(x, y, 32, generator)])
    state = generator.get_state()  # resume point: after epoch 1's draw
    second = torch.cat([yb for _, yb in B.batches(x, y, 32, generator)])
    assert not torch.equal(first, second)
    generator.set_state(state)
    iterator = B.batches(x, y, 32, generator)  # the draw happens at the call
    assert not torch.equal(generator.get_state(), state)
    assert torch.equal(torch.cat([yb for _, yb in iterator]), second)
    generator.set_state(state)
    ordered = torch.cat([yb for _, yb in B.batches(x, y, 32, generator, shuffle=False)])
    assert torch.equal(ordered, y) and torch.equal(generator.get_state(), state)


def test_batches_on_a_real_task(split_mnist):
    task = split_mnist.tasks[0]
    generator = torch.Generator().manual_seed(0)
    total = sum(len(yb) for _, yb in B.batches(task.x_train, task.y_train, 64, generator))
    assert total == task.sizes["train"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_and_batches(data_dir):
    bench = B.build_benchmark("split-mnist", data_dir, device="cuda", num_tasks=1, **SMALL)
    task = bench.tasks[0]
    assert task.x_train.is_cuda and task.y_train.is_cuda
    xb, yb = next(B.batches(task.x_train, task.y_train, 64, torch.Generator().manual_seed(0)))
    assert xb.is_cuda and yb.is_cuda and len(yb) == 64
