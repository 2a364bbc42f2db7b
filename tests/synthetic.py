"""Small synthetic task sequences: the maths tests need tensors shaped like a benchmark, not MNIST."""

import torch

from dhp_deploy.tasks import Benchmark, Task


def split_benchmark(input_size: int = 784, train: int = 256, test: int = 64, num_tasks: int = 2,
                    seed: int = 0) -> Benchmark:
    r"""Split-style tasks {0,1}, {2,3}, ...: pixels in [0, 1] whose mean depends on the class, so
    a network can learn them; multi-head scenario, no validation rows."""
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for task_id in range(num_tasks):
        classes = (2 * task_id, 2 * task_id + 1)

        def draw(n):
            y = torch.tensor(classes)[torch.randint(0, 2, (n,), generator=generator)]
            x = (torch.rand(n, input_size, generator=generator) * 0.7
                 + 0.3 * (y[:, None] % 2).float() * (torch.arange(input_size) % 2).float())
            return x, y

        (x_train, y_train), (x_test, y_test) = draw(train), draw(test)
        tasks.append(Task(task_id, classes, x_train, y_train, torch.empty(0, input_size),
                          torch.empty(0, dtype=torch.int64), x_test, y_test))
    return Benchmark("synthetic-split", tasks, "task", seed, num_classes=2 * num_tasks,
                     input_size=input_size)


# --------------------------------------------------------------------------- MNIST-format files


def write_idx_root(root, train: int = 12000, test: int = 2000, seed: int = 0) -> dict:
    r"""An MNIST root (``root/MNIST/raw/*.gz``, the real layout and IDX format) of ``train`` and
    ``test`` 28×28 images, classes 0–9 in turn; each class is its own noisy template, so a network
    can learn them. Returns ``{file name: MD5}`` of the four files: the checksums a test puts in
    ``dhp_deploy.data.MD5`` for the time it reads them (see ``conftest.synthetic_mnist``)."""
    import gzip
    import hashlib
    from pathlib import Path

    import numpy as np

    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.25
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for prefix, count in (("train", train), ("t10k", test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        noise = rng.integers(0, 96, (count, 28, 28))
        images = np.where(templates[labels], 255 - noise, noise).astype(np.uint8)
        for name, magic, dims, body in (
                (f"{prefix}-images-idx3-ubyte.gz", 2051, (count, 28, 28), images),
                (f"{prefix}-labels-idx1-ubyte.gz", 2049, (count,), labels)):
            header = b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims))
            # mtime=0: the same bytes, so the same checksum, on every call.
            payload = gzip.compress(header + body.tobytes(), compresslevel=1, mtime=0)
            (raw / name).write_bytes(payload)
            checksums[name] = hashlib.md5(payload).hexdigest()
    return checksums
