"""DReS inside DistributedDataParallel: 2 CPU processes over gloo, a BatchNorm model, the coded
branch local to each rank; the replicas must stay identical."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dres_fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x))


def _worker(rank, world, port, mode, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(Net())
        reg = dres_fast.SubmoduleDReS(model.module, "features", mode=mode, num_coded=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(4):
            x = torch.randn(12, 6, generator=gen)
            target = torch.randint(0, 3, (12,), generator=gen)
            with reg:
                out = model(x)
            loss = nn.functional.cross_entropy(out, target) + 0.5 * reg.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        queue.put((rank, float((gathered[0] - gathered[1]).abs().max()), float(reg.loss), bool(torch.isfinite(flat).all())))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["separate", "concat"])
def test_ddp_replicas_stay_identical(mode):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, 2, port, mode, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, max_diff, reg_loss, finite in results:
        assert finite
        assert max_diff == 0.0, f"rank {rank}: replicas differ by {max_diff}"
        assert reg_loss > 0.0
