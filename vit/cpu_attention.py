"""Softmax attention for short sequences on the CPU: one C++ kernel, ``vit/csrc/cpu_attention.cpp``.

torch's CPU attention kernel (flash attention) recomputes the attention weights in the backward,
zero-fills its gradients and leaves them to be stacked into the projection's layout. For the
sequences a ViT on small images has (65 tokens, heads of 16 to 64), this kernel keeps the weights
instead, reads q, k and v where the fused projection wrote them and writes the output and the
gradient in the layouts the neighbouring linear layers use: forward and backward of one layer of
the ``tiny`` and ``small`` models run 1.7-2.0 times as fast on a two-core Intel Xeon (about 1.5
times on an AMD EPYC), the ``tiny`` model's whole fp32 training step about 1.1 times
(``benchmarks/RESULTS.md``, "A kernel of our own for the attention"). The mathematics is the
same softmax(q k^T / sqrt(d)) v; the tests compare it, and its gradients, with
``F.scaled_dot_product_attention`` against a float64 reference.

The kernel is compiled on first use (about 25 s, then cached by torch under
``~/.cache/torch_extensions``) and needs an x86-64 Linux machine with a C++ compiler, and a torch
built with MKL (the pip wheels are). Where any of that is missing, or ``VIT_CPU_ATTENTION=0`` is
set, ``vit.attention.Attention`` uses ``F.scaled_dot_product_attention`` as before.

The kernel is registered as torch operators (``torch.ops.vit.attention`` and
``torch.ops.vit.attention_of_queries``, with their backwards), so ``torch.compile``
(``--model.compile true``) keeps it and compiles the rest of the model around it. While torch
exports the model (``torch.export``, ONNX), the layer uses torch's attention, so that the exported
graph runs without this project.
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


def may_run() -> bool:
    """Whether the kernel may run now: in eager execution, and inside ``torch.compile``, which
    sees it as the registered operators below and compiles the rest of the model around them.

    Not while torch exports the model (``torch.export``, ONNX): an exported graph must run
    without this project. Not under a tensor dispatch mode such as ``FlopCounterMode``, which
    counts torch's attention and not this kernel, nor while TorchScript traces or scripts.
    """
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export()
    return runs_eagerly()


@torch.compiler.assume_constant_result
def _built() -> bool:
    """Whether the kernel is built (``torch.compile`` takes the answer as a constant)."""
    return extension() is not None


def usable(projection: torch.Tensor, dropout_p: float) -> bool:
    """Whether this kernel can attend over the keys and values of ``projection`` (B, N, width).

    A bfloat16 projection only while training: torch's kernel infers as fast in bfloat16.
    """
    trains_in_bf16 = projection.dtype == torch.bfloat16 and projection.requires_grad
    return (
        projection.device.type == "cpu"
        and (projection.dtype == torch.float32 or trains_in_bf16)
        and dropout_p == 0.0
        and projection.shape[1] <= MAX_TOKENS
        and may_run()
        and _built()
    )


# The kernel as torch operators (``torch.ops.vit.*``), so that autograd and ``torch.compile``
# treat it as they treat torch's own: the forwards return the output and the attention weights
# (an empty tensor when not kept), the backwards the gradients of the projections.


@torch.library.custom_op("vit::attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor, heads: int, scale: float, keep_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, weights = extension().fused_forward(qkv, heads, scale, keep_weights)
    return out, weights


@_attention_op.register_fake
def _attention_shapes(
    qkv: torch.Tensor, heads: int, scale: float, keep_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, width = qkv.shape
    weights = (batch, heads, tokens, tokens) if keep_weights else (0,)
    return qkv.new_empty(batch, tokens, width // 3), qkv.new_empty(weights)


@torch.library.custom_op("vit::attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, qkv: torch.Tensor, weights: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    return extension().fused_backward(grad_out, qkv, weights, heads, scale)


@_attention_backward_op.register_fake
def _attention_backward_shapes(
    grad_out: torch.Tensor, qkv: torch.Tensor, weights: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    return torch.empty_like(qkv)


def _no_gradient_for_the_weights(ctx, weights: torch.Tensor) -> None:
    """The kept weights are an output for the backward's sake only: without this, autograd
    would hand the backward a zero-filled (B, H, N, N) gradient for them at every call."""
    ctx.mark_non_differentiable(weights)
    ctx.set_materialize_grads(False)


def _keep_for_attention_backward(ctx, inputs: tuple, output: tuple) -> None:
    qkv, heads, scale, _ = inputs
    ctx.save_for_backward(qkv, output[1])
    ctx.heads, ctx.scale = heads, scale
    _no_gradient_for_the_weights(ctx, output[1])


def _attention_backward(ctx, grad_out: torch.Tensor, _: None) -> tuple:
    qkv, weights = ctx.saved_tensors
    return _attention_backward_op(grad_out, qkv, weights, ctx.heads, ctx.scale), None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_keep_for_attention_backward)


@torch.library.custom_op("vit::attention_of_queries", mutates_args=())
def _queries_op(
    q: torch.Tensor, kv: torch.Tensor, heads: int, scale: float, keep_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out, weights = extension().split_forward(q, kv, heads, scale, keep_weights)
    return out, weights


@_queries_op.register_fake
def _queries_shapes(
    q: torch.Tensor, kv: torch.Tensor, heads: int, scale: float, keep_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, queries, _ = q.shape
    weights = (batch, heads, queries, kv.shape[1]) if keep_weights else (0,)
    return torch.empty_like(q), q.new_empty(weights)


@torch.library.custom_op("vit::attention_of_queries_backward", mutates_args=())
def _queries_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, weights: torch.Tensor, heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_q, grad_kv = extension().split_backward(grad_out, q, kv, weights, heads, scale)
    return grad_q, grad_kv


@_queries_backward_op.register_fake
def _queries_backward_shapes(
    grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, weights: torch.Tensor, heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(kv)


def _keep_for_queries_backward(ctx, inputs: tuple, output: tuple) -> None:
    q, kv, heads, scale, _ = inputs
    ctx.save_for_backward(q, kv, output[1])
    ctx.heads, ctx.scale = heads, scale
    _no_gradient_for_the_weights(ctx, output[1])


def _queries_backward(ctx, grad_out: torch.Tensor, _: None) -> tuple:
    q, kv, weights = ctx.saved_tensors
    grad_q, grad_kv = _queries_backward_op(grad_out, q, kv, weights, ctx.heads, ctx.scale)
    return grad_q, grad_kv, None, None, None


_queries_op.register_autograd(_queries_backward, setup_context=_keep_for_queries_backward)


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
    out, _ = _attention_op(fused, heads, scale, torch.is_grad_enabled() and fused.requires_grad)
    return out.to(qkv.dtype)


def attention_of_queries(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """As :func:`attention`, for queries (B, Nq, H * D) of their own over the keys and values
    (B, N, 2 * H * D): the CLS-only last block, whose one query attends over every token."""
    scale = (kv.shape[-1] // (2 * heads)) ** -0.5
    queries, keys_values = _as_float(q), _as_float(kv)
    keep = torch.is_grad_enabled() and (queries.requires_grad or keys_values.requires_grad)
    out, _ = _queries_op(queries, keys_values, heads, scale, keep)
    return out.to(q.dtype)
