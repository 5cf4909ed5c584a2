"""worker/staging.py: the host staging buffers of a table's rows - reused across steps, grown
as needed, plain memory without CUDA; and, where a GPU is lent, rows and gradients through
pinned memory."""

import pytest
import torch

from shardps.worker.staging import Staging


def test_without_cuda_the_buffer_is_plain_memory_and_cpu_tensors_skip_it():
    staging = Staging()
    assert staging.pin == torch.cuda.is_available()
    rows = torch.randn(5, 3)
    assert staging.to_device(rows, torch.device("cpu")) is rows
    assert staging.to_host(rows) is rows
    assert staging.allocations == 0  # nothing staged, nothing allocated


def test_the_buffer_is_reused_and_grows_at_least_twofold():
    staging = Staging(pin=False)
    first = staging.stage(torch.arange(12.0).view(4, 3))
    assert torch.equal(first, torch.arange(12.0).view(4, 3)) and not first.is_pinned()
    ptr = first.data_ptr()
    smaller = staging.stage(torch.ones(2, 3))  # fits: the same memory, no allocation
    assert smaller.data_ptr() == ptr and staging.allocations == 1
    assert torch.equal(smaller, torch.ones(2, 3))
    bigger = staging.stage(torch.full((5, 3), 7.0))  # 15 > 12: grows to max(15, 24)
    assert torch.equal(bigger, torch.full((5, 3), 7.0)) and staging.allocations == 2
    staging.stage(torch.zeros(8, 3))  # 24 fits in the grown buffer
    assert staging.allocations == 2
    huge = staging.stage(torch.zeros(100, 3))  # more than double: exactly what is needed
    assert huge.shape == (100, 3) and staging.allocations == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rows_and_gradients_go_through_pinned_buffers():
    staging = Staging()
    assert staging.pin
    device = torch.device("cuda")
    for n in (3, 50, 7, 400):  # grows, is reused; each step's rows arrive intact
        rows = torch.randn(n, 8)
        on_device = staging.to_device(rows, device)
        assert on_device.is_cuda and staging._buffer.is_pinned()
        torch.testing.assert_close(on_device.cpu(), rows, rtol=0, atol=0)
    assert staging.allocations <= 3
    back = Staging()
    grads = torch.randn(64, 8, device=device)
    host = back.to_host(grads)
    assert not host.is_cuda and back._buffer.is_pinned()
    assert host.data_ptr() != back._buffer.data_ptr()  # the caller's own copy
    torch.testing.assert_close(host, grads.cpu(), rtol=0, atol=0)
