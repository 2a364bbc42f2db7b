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
