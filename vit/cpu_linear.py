"""Linear layers on x86-64 CPUs through oneDNN's matrix multiply, the input gradient included.

torch runs ``F.linear`` in float32 on the CPU through MKL's sgemm, which first copies the bias
into the output and then adds the product to it. For inputs of many rows (a batch of 128 images
of 65 tokens: 8,320) oneDNN, torch's other CPU matrix library, adds the bias inside the product.
On one two-core AMD EPYC host its products for the output and for the gradient of the input ran
faster than MKL's, and the whole fp32 training step of the ``small`` model went from 1.11-1.19
to 1.24-1.34 times timm's; on another host of the same AMD model and on a two-core Intel Xeon
they ran slower (0.86-1.03 times MKL's speed at 8,320 rows) and the step lost with them
(1.19-1.21 and 1.12-1.14 times timm's against 1.26-1.32 and 1.19-1.22 with MKL;
``benchmarks/RESULTS.md``, "Linear layers through oneDNN"). So this path is a choice, off by
default: ``VIT_CPU_LINEAR=1`` turns it on, and ``python -m benchmarks.throughput`` with and
without it shows which is faster on a given machine. Below 8,192 rows MKL was the faster
everywhere (a batch of 32: 0.70-0.94 times in the forward), so those stay with ``F.linear``; so
does the weights' gradient, faster with MKL at the sizes measured. The arithmetic is the same
x W^T + b in float32; the two libraries differ only in rounding.

Even when chosen, layers run ``F.linear`` outside float32 on the CPU, under autocast, while
torch compiles, traces or exports the model, under a tensor dispatch mode such as
``FlopCounterMode``, and where torch lacks oneDNN's linear operator (the pip wheels for x86-64
have it).
"""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

from vit.eager import runs_eagerly
from vit.errors import ConfigError

ENV_SWITCH = "VIT_CPU_LINEAR"
MIN_ROWS = 8192
"""Inputs of fewer rows (all dimensions but the last) run through ``F.linear``: MKL's is faster."""


@functools.cache
def available() -> bool:
    """Whether this torch has oneDNN's linear operator on an x86-64 CPU."""
    return (
        platform.machine() in ("x86_64", "AMD64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


@functools.cache
def enabled() -> bool:
    """Whether large float32 products take oneDNN: ``VIT_CPU_LINEAR=1`` and :func:`available`."""
    choice = os.environ.get(ENV_SWITCH, "")
    if choice not in ("", "0", "1"):
        raise ConfigError(
            f"{ENV_SWITCH}={choice!r} is not a choice: set it to 1 (large float32 linear layers "
            "through oneDNN) or to 0, or leave it unset (torch's F.linear, through MKL)."
        )
    return choice == "1" and available()


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs through oneDNN: where :func:`enabled`, float32 CPU tensors
    of at least :data:`MIN_ROWS` rows outside autocast, eager mode, no tensor dispatch mode."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and runs_eagerly()
        and enabled()
        # last: while torch.export traces, the checks above end the test before a size
        # comparison would constrain the exported batch size
        and x.numel() >= MIN_ROWS * max(x.shape[-1], 1)
    )


def _onednn_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN, for x of any leading shape."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_product(x, weight, bias)

    @staticmethod
    def backward(
        ctx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_product(rows, weight.t(), None).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t() @ x.reshape(-1, x.shape[-1])  # MKL: the faster one here
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN at any size, with its gradients; callers check
    :func:`available` (or :func:`usable`, which also applies the size limit) first."""
    return _OneDnnLinear.apply(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN where :func:`usable`."""
    if usable(x, weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose product runs through :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
