"""Host staging buffers for the rows an embedding table moves between the host and a CUDA
device (docs/tables.md, "On a CUDA worker"): fetched rows go up through one, row gradients
come back through another.

A buffer is page-locked (pinned) when CUDA is available, so that copies to and from the device
are DMA transfers that can run asynchronously; without CUDA, pinning is unavailable
(torch raises) and the buffer is plain memory. Either way it is reused across steps and grown
(at least doubling) when a batch needs more, so a steady workload allocates nothing per step.

Owned by one table module, used on the training thread only.
"""

from __future__ import annotations

import torch


class Staging:
    """One direction's staging buffer of one table (fp32).

    Args:
        pin: page-lock the buffer; default: whether CUDA is available (pin_memory needs it).
    """

    def __init__(self, pin: bool | None = None):
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._buffer = torch.empty(0, dtype=torch.float32)
        self._copy: torch.cuda.Event | None = None  # the last async copy out of the buffer
        self.allocations = 0  # times the buffer was (re)allocated

    def _host(self, numel: int) -> torch.Tensor:
        """The buffer's first `numel` elements, once no copy from it is in flight."""
        if self._copy is not None:
            self._copy.synchronize()  # the device may still be reading the previous rows
            self._copy = None
        if numel > self._buffer.numel():
            size = max(numel, 2 * self._buffer.numel())
            self._buffer = torch.empty(size, dtype=torch.float32, pin_memory=self.pin)
            self.allocations += 1
        return self._buffer[:numel]

    def stage(self, rows: torch.Tensor) -> torch.Tensor:
        """`rows` copied into the buffer (a view of it, valid until the next stage)."""
        view = self._host(rows.numel()).view(rows.shape)
        view.copy_(rows, non_blocking=rows.is_cuda and self.pin)
        return view

    def to_device(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """fp32 CPU `rows` on `device`: on CUDA through the buffer, the copy asynchronous on
        the current stream (the buffer is not written again until it has finished); on the
        CPU `rows` itself."""
        if device.type != "cuda":
            return rows
        out = self.stage(rows).to(device, non_blocking=self.pin)
        if self.pin:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            self._copy = done
        return out

    def to_host(self, values: torch.Tensor) -> torch.Tensor:
        """A CPU fp32 copy of `values` that the caller owns: from CUDA through the buffer
        (the device-to-host copy asynchronous, then waited for); a CPU tensor as it is."""
        if not values.is_cuda:
            return values
        view = self.stage(values)
        if self.pin:
            torch.cuda.current_stream(values.device).synchronize()
        return view.clone()  # the buffer is reused by the next step
