"""The ADN step (two backward calls, one optimizer step) under DDP with 2 CPU workers (gloo) gives
the gradients of one process on the whole batch.

BatchNorm is put in eval mode for the comparison: in train mode each rank normalises with its own
half-batch statistics, so no data-parallel run equals the whole batch (SyncBatchNorm would); with
fixed statistics every loss term is a per-sample mean and the ranks' average is the whole-batch
mean. DDP must be built with ``find_unused_parameters=True`` (the model says so in
``ddp_find_unused_parameters``): the super-net pass leaves the skip-aware norms unused and the
base-net pass the skippable halves.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynlab import config
from dynlab.data import static_info
from dynlab.registry import get_method

OVERRIDES = ["method=adn", "backbone=adn_resnet", "adn_resnet.width=4", "adn.temperature=2", "adn.topk=5"]


def build():
    import methods  # noqa: F401  (a spawned process fills the registries itself)

    method = get_method("adn").cls(config.resolve(OVERRIDES))
    torch.manual_seed(0)
    model = method.build_model(static_info("digits"))
    model.eval()  # fixed BN statistics (see the module docstring)
    for p in model.parameters():  # move the skip-aware norms away from their copies' values
        p.data.add_(0.01 * torch.randn_like(p))
    return method, model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def step_grads(method, model, x, y) -> dict[str, torch.Tensor]:
    calls = []
    model.zero_grad(set_to_none=True)
    method.train_step(model, (x, y), lambda loss: (calls.append(1), loss.backward()))
    assert len(calls) == 2
    net = getattr(model, "module", model)
    return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str, find_unused: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method, model = build()
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        x, y = batch()
        half = len(x) // world
        for _ in range(2):  # a second step: DDP without find_unused_parameters fails there if a reduction was left open
            grads = step_grads(method, ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()  # neither rank tears gloo down while the other still uses it (an abort otherwise)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("find_unused", [True, False], ids=["find_unused", "platform_default"])
def test_two_backward_step_under_ddp_with_two_cpu_workers_equals_one_process_on_the_whole_batch(tmp_path, find_unused):
    """find_unused_parameters=True is what ADN asks for; False is what the platform passes today
    (the step then adds 0 x every parameter, see methods.adn.ddp_safe)."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out, find_unused), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)

    method, model = build()
    assert model.ddp_find_unused_parameters is True
    whole = step_grads(method, model, *batch())
    assert set(ddp_grads) == set(whole)
    assert any(".skip_norms." in n for n in whole) and any(n.startswith("layer1.1.") for n in whole)  # both passes' parameters
    for n in whole:
        torch.testing.assert_close(ddp_grads[n], whole[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
