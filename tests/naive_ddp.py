r"""What a user gets from plain DistributedDataParallel around a DHP network (run by torchrun).

The same model, data and global batches as ``dhp-train --method finetune`` on the first task, one
epoch, but trained the textbook way: ``DistributedDataParallel(model)`` with its default buffer
broadcast, autograd, each rank the DHP head's own Hebbian update from its slice. Rank 0 saves the
trace to ``argv[1]``; tests/test_distributed.py compares it with the one-process trace.

    torchrun --standalone --nproc-per-node 2 tests/naive_ddp.py HEBB_OUT DATA_DIR TRAIN_LIMIT
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dhp_deploy.distributed import from_environment, shutdown
from dhp_deploy.network import task_logits
from dhp_deploy.config import build_model
from dhp_deploy.tasks import batches, build_benchmark
from dhp_deploy.steps import derived_generator
from dhp_deploy.train import TrainConfig


def main(hebb_out: str, data_dir: str, train_limit: int) -> None:
    replicas, _ = from_environment("cpu")
    config = TrainConfig(benchmark="split-mnist", epochs=1, num_tasks=1, train_limit=train_limit,
                         test_limit=100)
    benchmark = build_benchmark(**config.data_arguments(), data_dir=data_dir, device="cpu")
    torch.manual_seed(config.seed)  # dhp-train's initial weights
    model = build_model(config.to_json(benchmark)).train()
    ddp = DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's trace every forward
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    task = benchmark.tasks[0]
    head = torch.tensor(task.classes)
    targets_of = torch.full((benchmark.num_classes,), -1, dtype=torch.int64)
    targets_of[head] = torch.arange(len(head))
    generator = derived_generator(config.seed, "batches", 0, 0)
    for xb, yb in batches(task.x_train, task.y_train, config.batch_size, generator,
                          part=replicas.shard):
        loss = F.cross_entropy(task_logits(ddp(xb, yb), head), targets_of[yb])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if replicas.is_main:
        torch.save(model.head.hebb.detach().clone(), hebb_out)
    replicas.barrier()  # leave together, as dhp-train does: a rank that exits early can abort
    shutdown(replicas)  # its peer's gloo teardown (SIGABRT, seen once in CI here)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
