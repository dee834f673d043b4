"""DistributedDataParallel (gloo, 2 processes on loopback) with a compressed model."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

import opq_torch
from opq_core import Plan

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or
                                not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
STEPS = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def _worker(rank, port, outdir, plan_json, masks):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        # the plan computed once (as rank 0 would) and installed on every rank
        opq_torch.compress(model, Plan.from_json(plan_json), masks=masks)
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(STEPS):
            x = torch.randn(6, 2, 8, 8, generator=g)
            y = torch.randint(0, 5, (6,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        plan = opq_torch.plan_of(ddp)
        state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        eff = opq_torch.compressed_weights(ddp)
        np.savez(os.path.join(outdir, f"rank{rank}.npz"),
                 **{"sd/" + k: v for k, v in state.items()},
                 **{"eff/" + k: v for k, v in eff.items()},
                 plan=np.array(json.dumps([lp.to_dict() for lp in plan.layers])))
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    ref = _model()
    plan = opq_torch.compress(ref, sparsity=0.8, bits=3)
    masks = opq_torch.masks_of(ref)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), plan.to_json(), masks), nprocs=WORLD,
             join=True)
    r0 = dict(np.load(tmp_path / "rank0.npz"))
    r1 = dict(np.load(tmp_path / "rank1.npz"))
    assert set(r0) == set(r1)
    assert str(r0["plan"]) == str(r1["plan"])
    assert json.loads(str(r0["plan"])) == [lp.to_dict() for lp in plan.layers]
    for k in r0:
        # every tensor identical across ranks: masks, scales, thresholds, latent weights
        assert np.array_equal(r0[k], r1[k]), k
    # the model trained (latent weights moved) and pruned positions are still exactly zero
    start = _model().state_dict()
    moved = False
    for k in r0:
        if k.startswith("eff/"):
            name = k[4:]
            path = name.rsplit(".", 1)[0]
            mask = r0[f"sd/{path}.parametrizations.weight.0.mask"]
            assert mask.dtype == np.bool_
            assert np.all(r0[k][~mask] == 0.0)
            assert np.all(r0[k][mask] != 0.0)
            latent = r0[f"sd/{path}.parametrizations.weight.original"]
            moved |= not np.array_equal(latent, start[name].numpy())
    assert moved
