"""One attention layer's core on the CPU: this project's kernel against torch's, same inputs.

    python -m benchmarks.attention
    python -m benchmarks.attention --shapes 128x65x4x32 128x65x12x16 --repeats 9

For each (batch x tokens x heads x head width) shape, both paths start from the fused q/k/v
projection (B, N, 3 * H * D) that ``vit.attention.Attention`` makes and end with the (B, N, H * D)
tensor its output projection reads; the backward ends with the projection's gradient. Torch's
path is ``F.scaled_dot_product_attention`` (its CPU flash kernel) with the head split and merge
the layer does around it; this project's is ``vit.cpu_attention``. Each repeat times ``--steps``
calls of each in turn; the medians, in ms, and their ratio are printed, for the forward alone
(no gradient) and for forward and backward. Freed memory is kept for both, as in ``train.py``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.precision import forward_and_backward_ms
from vit import cpu_attention
from vit.allocator import keep_freed_memory


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``128x65x4x32`` -> (batch, tokens, heads, head width)."""
    try:
        batch, tokens, heads, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a shape as BATCHxTOKENSxHEADSxWIDTH, e.g. 128x65x4x32"
        ) from None
    if min(batch, tokens, heads, width) < 1 or tokens > cpu_attention.MAX_TOKENS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: every size must be at least 1 and tokens at most {cpu_attention.MAX_TOKENS}"
        )
    return batch, tokens, heads, width


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def torch_path(projected: torch.Tensor, heads: int) -> torch.Tensor:
    """What ``Attention`` does around torch's kernel: split heads, attend, merge heads."""
    b, n, _ = projected.shape
    q, k, v = (part.transpose(1, 2) for part in projected.view(b, n, 3, heads, -1).unbind(2))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)


def our_path(projected: torch.Tensor, heads: int) -> torch.Tensor:
    return cpu_attention.attention(projected, heads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape("128x65x4x32"), parse_shape("128x65x12x16")],
                        help="BATCHxTOKENSxHEADSxWIDTH; the defaults are the tiny and small "
                             "models' layers at batch 128 on 32x32 images")
    parser.add_argument("--steps", type=positive, default=10, help="calls per timed repeat")
    parser.add_argument("--repeats", type=positive, default=7)
    args = parser.parse_args()
    if cpu_attention.extension() is None:
        parser.error("vit's CPU attention kernel is not available here (x86-64 Linux with a C++ "
                     f"compiler, and {cpu_attention.ENV_SWITCH} not 0); nothing to compare.")

    keep_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of "
          f"{args.repeats} interleaved repeats of {args.steps} calls")
    print("| shape (B x N x H x D) | pass | torch ms | ours ms | torch / ours |")
    print("|---|---|---|---|---|")
    for batch, tokens, heads, width in args.shapes:
        projected = torch.randn(batch, tokens, 3 * heads * width, requires_grad=True)
        grad = torch.randn(batch, tokens, heads * width)
        forward, both = forward_and_backward_ms(
            {"torch": lambda: torch_path(projected, heads),
             "ours": lambda: our_path(projected, heads)},
            grad, args.steps, args.repeats,
        )
        shape = f"{batch} x {tokens} x {heads} x {width}"
        for name, ms in (("forward", forward), ("forward + backward", both)):
            print(f"| {shape} | {name} | {ms['torch']:.2f} | {ms['ours']:.2f} | "
                  f"{ms['torch'] / ms['ours']:.2f} |")


if __name__ == "__main__":
    main()
