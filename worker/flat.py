"""FlatParams: a module's parameters and gradients as views into one flat fp32 buffer each.

Pulls land in one tensor and pushes read one tensor, so nothing gathers or scatters per
parameter (docs/architecture.md, "The parameter server").
"""

from __future__ import annotations

import torch
from torch import nn

from shardps.proto import common_pb2
from shardps.proto import layout as layout_lib


class FlatParams:
    """Owns the flat weight and gradient buffers of one module on one device.

    After construction every parameter `p` of the module is a view into `flat` and `p.grad` a
    view into `grad`; backward accumulates into `grad` in place. Do not move the module
    (`.to()`), call `module.zero_grad()` (it sets grads to None and breaks the views) or
    replace parameters afterwards; use `zero_grad()` here.

    On CUDA the host side uses pinned staging buffers so copies can be asynchronous; every
    method that hands a CPU tensor back has synchronised with the copy first.

    Threading: not thread-safe; owned by the training thread.
    """

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.layout: common_pb2.Layout = layout_lib.layout_of(module)
        total = self.layout.total
        self.flat = torch.empty(total, dtype=torch.float32, device=self.device)
        self.grad = torch.zeros(total, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            for entry, (_, param) in zip(self.layout.params, module.named_parameters(), strict=True):
                n = param.numel()
                view = self.flat[entry.offset : entry.offset + n].view(param.shape)
                view.copy_(param)
                param.data = view  # the Parameter object stays; its storage is now the flat buffer
                param.grad = self.grad[entry.offset : entry.offset + n].view(param.shape)
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            self._host_weights = torch.empty(total, dtype=torch.float32, pin_memory=True)
            self._host_grad = torch.empty(total, dtype=torch.float32, pin_memory=True)
            with torch.cuda.device(self.device):  # events belong to the device they record on
                self._upload_done = torch.cuda.Event()
                self._upload_done.record()
        else:
            # On CPU the parameter buffer itself receives pulls and the grad buffer is pushed:
            # no staging copies at all.
            self._host_weights = self.flat
            self._host_grad = self.grad

    @property
    def numel(self) -> int:
        return self.layout.total

    @property
    def host_weights(self) -> torch.Tensor:
        """The flat CPU fp32 tensor to pull weights into; call `upload()` after filling it.

        On CPU this is the parameter buffer itself (writes change the model at once). On CUDA
        it is a pinned buffer; this waits until the previous upload from it has finished.
        """
        if self._cuda:
            self._upload_done.synchronize()
        return self._host_weights

    def upload(self) -> None:
        """Makes the parameters equal `host_weights` (asynchronous on CUDA, no-op on CPU).

        Kernels queued later on the current stream see the new weights, so no sync is needed
        before the forward pass.
        """
        if self._cuda:
            with torch.cuda.device(self.device):
                self.flat.copy_(self._host_weights, non_blocking=True)
                self._upload_done.record()

    def load(self, flat: torch.Tensor) -> None:
        """Copies a flat tensor of `numel` elements (any device and float dtype) into the weights."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"expected a flat tensor of {self.numel} elements, "
                             f"got shape {tuple(flat.shape)}")
        with torch.no_grad():
            self.flat.copy_(flat)

    def weights_cpu(self) -> torch.Tensor:
        """A CPU fp32 copy of the weights that the caller owns (e.g. the initial weights)."""
        return self.flat.detach().to("cpu", copy=True)

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Scales the gradient down to global L2 norm max_norm (as torch's clip_grad_norm_).

        Returns the norm before clipping; max_norm <= 0 only measures it.
        """
        norm = float(torch.linalg.vector_norm(self.grad))
        if max_norm > 0:
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                self.grad.mul_(coef)
        return norm

    def host_grad(self) -> torch.Tensor:
        """The flat gradient on the CPU, ready to encode.

        Owned by this object and valid until the next backward or zero_grad; on CPU it is the
        gradient buffer itself. On CUDA it is a pinned copy, synchronised before returning.
        """
        if self._cuda:
            with torch.cuda.device(self.device):
                self._host_grad.copy_(self.grad, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            done.synchronize()  # the encoder reads these bytes next
        return self._host_grad
