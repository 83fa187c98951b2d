"""Softmax attention for short sequences on the CPU, as one C++ kernel (``vit/csrc/cpu_attention.cpp``).

torch's CPU attention kernel (flash attention) recomputes the attention weights in the backward,
zero-fills its gradients and leaves them to be stacked into the projection's layout. For the
sequences a ViT on small images has (65 tokens, heads of 16 to 64), this kernel keeps the weights
instead, reads q, k and v where the fused projection wrote them and writes the output and the
gradient in the layouts the neighbouring linear layers use: forward and backward of one layer run
1.5-2.2 times as fast, the whole training step of the ``tiny`` model about 1.13 times
(``benchmarks/RESULTS.md``, "A kernel of our own for the attention"). The mathematics is the same
softmax(q k^T / sqrt(d)) v; the model's tests compare it with ``F.scaled_dot_product_attention``.

The kernel is compiled on first use (about 25 s, then cached by torch under
``~/.cache/torch_extensions``) and needs an x86-64 Linux machine with a C++ compiler, and a torch
built with MKL (the pip wheels are). Where any of that is missing, or ``VIT_CPU_ATTENTION=0`` is
set, ``vit.attention.Attention`` uses ``F.scaled_dot_product_attention`` as before.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
MAX_TOKENS = 256
"""Longer sequences use torch's kernel: the kept weights grow as tokens squared."""

ENV_SWITCH = "VIT_CPU_ATTENTION"


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` command; the pip package's may not be on PATH yet."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # torch's build then says that ninja is missing
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel, built on first call; None where it cannot be built or is switched off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    _put_ninja_on_path()
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # it warns on import when a machine has no CUDA runtime
    log.info("Compiling vit's CPU attention kernel (once per machine, about 25 s)...")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="vit_cpu_attention",
            sources=[str(SOURCE)],
            # -ffast-math lets gcc vectorise exp through glibc's vector math library; it is
            # given to the compiler only, so the process's floating-point mode is left alone.
            extra_cflags=["-O3", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no ninja, a torch without MKL's sgemm, ...
        warnings.warn(
            f"vit's CPU attention kernel could not be built ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1] if str(error).strip() else error}); attention "
            f"falls back to torch's scaled_dot_product_attention, correct but slower. Install a "
            f"C++ compiler (g++) to use it, or set {ENV_SWITCH}=0 to silence this.",
            stacklevel=2,
        )
        return None
    finally:
        torch_log.setLevel(level)


def usable(qkv: torch.Tensor, dropout_p: float) -> bool:
    """Whether :func:`attention` can take this (B, N, 3, H, D) projection.

    A bfloat16 projection only while training: torch's kernel infers as fast in bfloat16. Not
    while a tensor dispatch mode such as ``FlopCounterMode`` watches, which sees torch's
    operators and not this kernel, nor while torch compiles, traces or exports the model.
    """
    trains_in_bf16 = qkv.dtype == torch.bfloat16 and qkv.requires_grad
    return (
        qkv.device.type == "cpu"
        and (qkv.dtype == torch.float32 or trains_in_bf16)
        and dropout_p == 0.0
        and qkv.shape[1] <= MAX_TOKENS
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and _get_current_dispatch_mode() is None
        and extension() is not None
    )


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        out, probs = extension().forward(qkv, scale, True)
        ctx.save_for_backward(qkv, probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        qkv, probs = ctx.saved_tensors
        return extension().backward(grad_out, qkv, probs, ctx.scale), None


def attention(qkv: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of every head, (B, N, 3, H, D) -> (B, N, H * D).

    A bfloat16 projection (bf16 autocast) is attended in float32 and returned in bfloat16, as
    torch's kernel is slow in bfloat16 backward; callers check :func:`usable` first.
    """
    dtype = qkv.dtype
    scale = qkv.shape[-1] ** -0.5
    qkv = qkv.float().contiguous()
    if torch.is_grad_enabled() and qkv.requires_grad:
        out = _Attention.apply(qkv, scale)
    else:
        out, _ = extension().forward(qkv, scale, False)
    return out.to(dtype)
