"""DReS inside FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 CPU processes over gloo, a
BatchNorm model sharded per block, ``SubmoduleDReS`` attached across steps in both modes. The coded
branch is local to each rank, so training must match one process that averages the two ranks'
losses (what FSDP's gradient averaging computes)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dres_fast
from distributed_common import Net, free_port

pytestmark = pytest.mark.slow  # two gloo processes per test (tens of seconds)

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

WORLD, STEPS, BATCH = 2, 3, 12
MODES = ("separate", "concat")


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    return [(torch.randn(BATCH, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)) for _ in range(STEPS)]


def _regularizer(model, mode):
    return dres_fast.SubmoduleDReS(model, "features", mode=mode, num_coded=10).attach()


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a bounded timeout: a broken collective fails the test instead of hanging CI
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    for mode in MODES:  # one process group for both modes: starting processes is the slow part
        torch.manual_seed(0)
        model = Net()
        fsdp.fully_shard(model.features)
        fsdp.fully_shard(model)
        reg = _regularizer(model, mode)  # attached after sharding: the hooks run on the sharded modules
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for x, target in _batches(rank):
            out = model(x)
            loss = nn.functional.cross_entropy(out, target) + 0.5 * reg.loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(reg.loss.detach()))
        reg.detach()
        full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        torch.save({"params": full, "reg_losses": losses}, os.path.join(out_dir, f"{mode}_rank{rank}.pt"))
    dist.barrier()
    # Skip interpreter teardown, as in test_ddp.py: joining gloo's worker thread at exit can deadlock
    # with torch 2.13. The results are on disk; exit code 0 is all mp.spawn checks.
    os._exit(0)


def _reference(mode):
    """One process: the mean of the ranks' losses, each rank's forward (BatchNorm batch statistics,
    coded branch) on its own batch, as FSDP computes it."""
    torch.manual_seed(0)
    model = Net()
    reg = _regularizer(model, mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [_batches(rank) for rank in range(WORLD)]
    losses = []
    for step in range(STEPS):
        total, step_losses = 0.0, []
        for rank in range(WORLD):
            x, target = data[rank][step]
            out = model(x)
            total = total + (nn.functional.cross_entropy(out, target) + 0.5 * reg.loss) / WORLD
            step_losses.append(float(reg.loss.detach()))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(step_losses)
    reg.detach()
    return {name: p.detach() for name, p in model.named_parameters()}, losses


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    # mp.spawn re-raises a worker's exception here, so a crash fails the test at once
    mp.spawn(_worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return out_dir


@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_matches_one_process_averaging_the_ranks(mode, fsdp_results):
    expected_params, expected_losses = _reference(mode)
    for rank in range(WORLD):
        result = torch.load(fsdp_results / f"{mode}_rank{rank}.pt")
        assert [step[rank] for step in expected_losses] == pytest.approx(result["reg_losses"], rel=1e-5)
        assert all(loss > 0 for loss in result["reg_losses"])
        assert result["params"].keys() == expected_params.keys()
        for name, value in result["params"].items():
            torch.testing.assert_close(value, expected_params[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
