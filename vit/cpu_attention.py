"""Softmax attention for short sequences on the CPU: one C++ kernel, ``vit/csrc/cpu_attention.cpp``.

torch's CPU attention kernel (flash attention) recomputes the attention weights in the backward,
zero-fills its gradients and leaves them to be stacked into the projection's layout. For the
sequences a ViT on small images has (65 tokens, heads of 16 to 64), this kernel keeps the weights
instead, reads q, k and v where the fused projection wrote them and writes the output and the
gradient in the layouts the neighbouring linear layers use: forward and backward of one layer of
the ``tiny`` and ``small`` models run 1.7-1.9 times as fast on two cores, the ``tiny`` model's
whole fp32 training step about 1.1 times (``benchmarks/RESULTS.md``, "A kernel of our own for the
attention"). The mathematics is the same softmax(q k^T / sqrt(d)) v; the tests compare it, and its
gradients, with ``F.scaled_dot_product_attention`` against a float64 reference.

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

from vit.eager import runs_eagerly

SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
MAX_TOKENS = 256
"""Longer sequences use torch's kernel: the kept weights grow as tokens squared."""

ENV_SWITCH = "VIT_CPU_ATTENTION"
NAME = "vit_cpu_attention"


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` command; the pip package's may not be on PATH yet."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # torch's build then says that ninja is missing
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _built_before() -> bool:
    """Whether torch's extension cache holds a build of the kernel (then loading is quick)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # not public; may move

        return any(Path(_get_build_directory(NAME, verbose=False)).glob(f"{NAME}*.so"))
    except Exception:
        return False


@functools.cache
def extension() -> ModuleType | None:
    """The compiled kernel, built on first call; None where it cannot be built or is off."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    _put_ninja_on_path()
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)  # it warns on import when a machine has no CUDA runtime
    try:
        from torch.utils.cpp_extension import load

        if not _built_before():
            print("Compiling vit's CPU attention kernel (once per machine, about 25 s)...",
                  file=sys.stderr, flush=True)

        return load(
            name=NAME,
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


def usable(projection: torch.Tensor, dropout_p: float) -> bool:
    """Whether this kernel can attend over the keys and values of ``projection`` (B, N, width).

    A bfloat16 projection only while training: torch's kernel infers as fast in bfloat16. Not
    while a tensor dispatch mode such as ``FlopCounterMode`` watches, which sees torch's
    operators and not this kernel, nor while torch compiles, traces or exports the model.
    """
    trains_in_bf16 = projection.dtype == torch.bfloat16 and projection.requires_grad
    return (
        projection.device.type == "cpu"
        and (projection.dtype == torch.float32 or trains_in_bf16)
        and dropout_p == 0.0
        and projection.shape[1] <= MAX_TOKENS
        and runs_eagerly()
        and extension() is not None
    )


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        out, weights = extension().fused_forward(qkv, heads, scale, True)
        ctx.save_for_backward(qkv, weights)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        qkv, weights = ctx.saved_tensors
        return extension().fused_backward(grad_out, qkv, weights, ctx.heads, ctx.scale), None, None


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q: torch.Tensor, kv: torch.Tensor, heads: int, scale: float
    ) -> torch.Tensor:
        out, weights = extension().split_forward(q, kv, heads, scale, True)
        ctx.save_for_backward(q, kv, weights)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        q, kv, weights = ctx.saved_tensors
        grad_q, grad_kv = extension().split_backward(grad_out, q, kv, weights, ctx.heads, ctx.scale)
        return grad_q, grad_kv, None, None


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().contiguous()


def attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of every head from the fused projection, (B, N, 3 * H * D) ->
    (B, N, H * D), in the head order of timm's ``Attention`` (q, k, v; head by head in each).

    A bfloat16 projection (bf16 autocast) is attended in float32, the kernel's only precision,
    and returned in bfloat16. Callers check :func:`usable` first.
    """
    scale = (qkv.shape[-1] // (3 * heads)) ** -0.5
    fused = _as_float(qkv)
    if torch.is_grad_enabled() and fused.requires_grad:
        out = _FusedAttention.apply(fused, heads, scale)
    else:
        out, _ = extension().fused_forward(fused, heads, scale, False)
    return out.to(qkv.dtype)


def attention_of_queries(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """As :func:`attention`, for queries (B, Nq, H * D) of their own over the keys and values
    (B, N, 2 * H * D): the CLS-only last block, whose one query attends over every token."""
    scale = (kv.shape[-1] // (2 * heads)) ** -0.5
    queries, keys_values = _as_float(q), _as_float(kv)
    if torch.is_grad_enabled() and (queries.requires_grad or keys_values.requires_grad):
        out = _SplitAttention.apply(queries, keys_values, heads, scale)
    else:
        out, _ = extension().split_forward(queries, keys_values, heads, scale, False)
    return out.to(q.dtype)
