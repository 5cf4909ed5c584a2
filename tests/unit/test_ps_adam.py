"""The server's fused Adam: bitwise torch.optim.Adam/AdamW(fused=True), whole or block by block."""

import subprocess
import sys

import pytest
import torch

from shardps.server.ps import adam as adam_lib

pytestmark = pytest.mark.skipif(not adam_lib.available(), reason="no fused CPU Adam in this torch")

N = 300_001  # not a multiple of any vector width or block


def reference(decoupled: bool, weights: torch.Tensor, **kw):
    param = weights.clone()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return param, cls([param], fused=True, **kw)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("block", [None, adam_lib.BLOCK_ELEMENTS, 4096])
def test_equals_torch_optim_bitwise_whole_or_in_blocks(decoupled, block):
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(N, generator=gen)
    ours = weights.clone()
    opt = adam_lib.FusedAdam([ours], lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05,
                             decoupled=decoupled)
    param, ref = reference(decoupled, weights, lr=0.01, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.05)
    for step in range(4):
        grad = torch.randn(N, generator=gen)
        lr = 0.01 / (step + 1)  # a schedule: set in param_groups[0] before the step, as the shard does
        opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        if block is None:
            ours.grad = grad
            opt.step()
        else:
            state = opt.begin()
            for start in range(0, N, block):
                opt.apply(state, start, grad[start : start + block])
        param.grad = grad
        ref.step()
    assert torch.equal(ours, param)
    mine, theirs = opt.state_dict()["state"][0], ref.state_dict()["state"][0]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(mine[key], theirs[key]), key
        assert mine[key].dtype == theirs[key].dtype


def test_blocks_cast_from_bf16_equal_a_step_on_the_decoded_gradient():
    weights = torch.randn(N, generator=torch.Generator().manual_seed(1))
    wire = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ours = weights.clone()
    opt = adam_lib.FusedAdam([ours], lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scratch = torch.empty(adam_lib.BLOCK_ELEMENTS)
    state = opt.begin()
    for start in range(0, N, adam_lib.BLOCK_ELEMENTS):
        piece = wire[start : start + adam_lib.BLOCK_ELEMENTS]
        opt.apply(state, start, scratch[: piece.numel()].copy_(piece))
    param, ref = reference(False, weights, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    param.grad = wire.float()
    ref.step()
    assert torch.equal(ours, param)


def test_state_can_be_replaced_like_torch_optims():
    ours = torch.zeros(10)
    opt = adam_lib.FusedAdam([ours], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert opt.state_dict()["state"] == {}
    ours.grad = torch.ones(10)
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[ours].items()}
    opt.step()
    opt.state[ours] = saved  # what a checkpoint restore does
    before = ours.clone()
    opt.step()
    assert int(opt.state[ours]["step"]) == 2 and not torch.equal(ours, before)


def test_stepping_does_not_import_torch_dynamo():
    code = ("import sys, torch; from shardps.server.ps.adam import FusedAdam; p = torch.zeros(4); "
            "o = FusedAdam([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0); "
            "p.grad = torch.ones(4); o.step(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
