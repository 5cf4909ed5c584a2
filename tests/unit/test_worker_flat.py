"""FlatParams: parameters and gradients are views into one flat buffer each."""

import copy

import pytest
import torch
from torch import nn

from shardps.worker.flat import FlatParams


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_params_are_views_into_the_flat_buffer():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatParams(model)
    assert flat.numel == sum(p.numel() for p in before)
    assert torch.equal(flat.flat, torch.cat([p.flatten() for p in before]))
    start = flat.flat.data_ptr()
    end = start + flat.numel * 4
    for p, entry in zip(model.parameters(), flat.layout.params, strict=True):
        assert start <= p.data_ptr() < end
        assert p.data_ptr() == start + entry.offset * 4
        assert p.grad.data_ptr() == flat.grad.data_ptr() + entry.offset * 4
    flat.flat[0] = 42.0  # writing the buffer writes the parameter
    assert model[0].weight[0, 0].item() == 42.0


def test_flat_grad_after_backward_is_the_concatenated_param_grads():
    model = small_model()
    reference = copy.deepcopy(model)
    flat = FlatParams(model)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(2):  # the second step checks zero_grad keeps the views working
        flat.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        expected = torch.cat([p.grad.flatten() for p in reference.parameters()])
        assert torch.equal(flat.grad, expected)
        assert torch.equal(flat.host_grad(), expected)
        for p in model.parameters():  # .grad still a view: backward accumulated in place
            assert flat.grad.data_ptr() <= p.grad.data_ptr() < flat.grad.data_ptr() + flat.numel * 4
        x = x * 2


def test_loading_a_flat_tensor_updates_the_params():
    model = small_model()
    flat = FlatParams(model)
    new = torch.arange(flat.numel, dtype=torch.float32)
    flat.load(new)
    assert torch.equal(model[0].weight.flatten(), new[:20])
    assert torch.equal(model[2].bias, new[-3:])
    # The pull path: fill host_weights, then upload.
    flat.host_weights.copy_(-new)
    flat.upload()
    assert torch.equal(model[2].bias, -new[-3:])
    with pytest.raises(ValueError, match="flat tensor"):
        flat.load(torch.zeros(3))
    copy_ = flat.weights_cpu()
    copy_.zero_()  # the caller owns it: the model is unchanged
    assert model[2].bias[0].item() == -new[-3].item()


def test_clip_grad_norm_matches_torch():
    model = small_model()
    reference = copy.deepcopy(model)
    flat = FlatParams(model)
    x, y = torch.randn(8, 4) * 10, torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(reference(x), y).backward()
    expected_norm = nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    norm = flat.clip_grad_norm(0.1)
    assert norm == pytest.approx(float(expected_norm), rel=1e-6)
    torch.testing.assert_close(flat.grad, torch.cat([p.grad.flatten()
                                                     for p in reference.parameters()]))
    assert flat.clip_grad_norm(0.0) == pytest.approx(0.1, rel=1e-4)  # 0: measure only


def test_recurrent_model_trains_through_views():
    torch.manual_seed(0)
    model = nn.GRU(3, 4, batch_first=True)
    reference = copy.deepcopy(model)
    flat = FlatParams(model)
    x = torch.randn(2, 5, 3)
    model(x)[0].sum().backward()
    reference(x)[0].sum().backward()
    torch.testing.assert_close(flat.grad, torch.cat([p.grad.flatten()
                                                     for p in reference.parameters()]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip():
    model = small_model()
    flat = FlatParams(model, "cuda")
    assert flat.flat.is_cuda and flat.host_weights.is_pinned()
    new = torch.randn(flat.numel)
    flat.host_weights.copy_(new)
    flat.upload()
    x = torch.randn(8, 4, device="cuda")
    model(x).sum().backward()
    grad = flat.host_grad()
    assert grad.device.type == "cpu" and grad.is_pinned()
    torch.testing.assert_close(grad, flat.grad.cpu())
    torch.testing.assert_close(flat.weights_cpu(), new)
