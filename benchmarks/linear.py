"""One linear layer on the CPU: oneDNN (``vit.cpu_linear``) against ``F.linear`` (MKL), same inputs.

    python -m benchmarks.linear
    python -m benchmarks.linear --shapes 8320x192x576 --repeats 9

For each (rows x in x out) shape, both compute x W^T + b from float32 x (rows, in); forward and
backward also make the gradients of x, W and b. Each repeat times ``--steps`` calls of each in
turn; the medians, in ms, and their ratio are printed, for the forward alone (no gradient) and
for forward and backward, and whether the model's layers take oneDNN's path at that size
(``vit.cpu_linear.MIN_ROWS``; only with ``VIT_CPU_LINEAR=1``). The defaults are the four layers
of a block of the ``small`` model (q/k/v, output projection, MLP in and out) at batch 128 on
32x32 images (65 tokens a sample) and the recipe's ``tiny`` MLP at batch 32. Freed memory is
kept for both, as in ``train.py``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.attention import positive
from benchmarks.precision import forward_and_backward_ms
from vit import cpu_linear
from vit.allocator import keep_freed_memory

DEFAULT_SHAPES = ["8320x192x576", "8320x192x192", "8320x192x384", "8320x384x192", "2080x128x256"]


def parse_shape(text: str) -> tuple[int, int, int]:
    """``8320x192x576`` -> (rows, in features, out features)."""
    try:
        rows, features_in, features_out = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a shape as ROWSxINxOUT, e.g. 8320x192x576"
        ) from None
    if min(rows, features_in, features_out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every size must be at least 1")
    return rows, features_in, features_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(shape) for shape in DEFAULT_SHAPES],
                        help="ROWSxINxOUT; the defaults are a block of the small model at batch "
                             "128 and the tiny recipe's first MLP layer at batch 32")
    parser.add_argument("--steps", type=positive, default=10, help="calls per timed repeat")
    parser.add_argument("--repeats", type=positive, default=7)
    args = parser.parse_args()
    if not cpu_linear.available():
        parser.error("oneDNN's linear operator is not available here (it needs an x86-64 CPU and "
                     "a torch built with oneDNN); nothing to compare.")

    keep_freed_memory()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of "
          f"{args.repeats} interleaved repeats of {args.steps} calls")
    print("| shape (rows x in x out) | pass | torch (MKL) ms | oneDNN ms | MKL / oneDNN "
          "| the model uses |")
    print("|---|---|---|---|---|---|")
    for rows, features_in, features_out in args.shapes:
        x = torch.randn(rows, features_in, requires_grad=True)
        weight = torch.randn(features_out, features_in, requires_grad=True)
        bias = torch.randn(features_out, requires_grad=True)
        grad = torch.randn(rows, features_out)
        used = "oneDNN" if cpu_linear.usable(x, weight) else "MKL"
        forward, both = forward_and_backward_ms(
            {"torch": lambda: F.linear(x, weight, bias),
             "ours": lambda: cpu_linear.onednn_linear(x, weight, bias)},
            grad, args.steps, args.repeats,
        )
        shape = f"{rows} x {features_in} x {features_out}"
        for name, ms in (("forward", forward), ("forward + backward", both)):
            print(f"| {shape} | {name} | {ms['torch']:.2f} | {ms['ours']:.2f} | "
                  f"{ms['torch'] / ms['ours']:.2f} | {used} |")


if __name__ == "__main__":
    main()
