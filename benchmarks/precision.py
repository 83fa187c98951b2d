"""A training step in float32 against the same step in bfloat16 (autocast, or products), on the CPU.

    python -m benchmarks.precision --config configs/cifar10_cpu.yaml --batch-size 32

CPUs with bf16 matrix units (Intel AMX, AVX512-BF16) multiply bfloat16 matrices several times
faster than float32 ones; others emulate it and run slower. This prints, for the recipe's model
and optimiser (the shape and ``optimizer`` of the config's ``model`` section), the median
milliseconds of a training step and of a forward pass in each precision and their ratio, and
the attention kernel's forward and backward at the model's shape in each dtype: torch's CPU
kernel is slower in bfloat16, which is why ``vit.attention.Attention`` attends in float32
under CPU autocast. ``--trainer.precision bf16-mixed`` trains with the faster setting.

A third column keeps float32 tensors but lets oneDNN multiply them in bfloat16
(``torch.set_float32_matmul_precision("medium")``, the CPU's counterpart of a GPU's TF32): no
casts between operations, but only the products that torch hands to oneDNN change.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from benchmarks.optimizer_step import build
from vit.attention import Attention


def median_ms(functions: dict[str, Callable[[], None]], calls: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in turn (interleaved)."""
    for function in functions.values():  # warm-up: allocations, optimiser state, kernels
        function()
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: statistics.median(measured) for name, measured in times.items()}


def forward_and_backward_ms(
    paths: dict[str, Callable[[], torch.Tensor]], grad: torch.Tensor, calls: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds per call of each path's forward without gradients, then of its
    forward and backward from ``grad``, timed in turn (:func:`median_ms`)."""
    with torch.no_grad():
        forward = median_ms(dict(paths), calls, repeats)
    both = median_ms(
        {name: lambda path=path: path().backward(grad) for name, path in paths.items()},
        calls, repeats,
    )
    return forward, both


MODES = ("fp32", "bf16 products", "bf16")
"""float32; float32 tensors multiplied in bfloat16 by oneDNN; bfloat16 autocast."""


@contextlib.contextmanager
def float32_products(mode: str) -> Iterator[None]:
    """float32 products in bfloat16 inside the body for ``"bf16 products"``, in float32 for the
    other :data:`MODES`; the setting before is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium" if mode == "bf16 products" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def autocast(mode: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``"bf16"`` (the forward only, as Lightning's ``bf16-mixed``)."""
    if mode == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10_cpu.yaml"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file; pass a recipe from configs/.")

    options = yaml.safe_load(args.config.read_text()).get("model", {})
    model, optimizer = build(options, options.get("optimizer", "adamw"))
    attention_layer = next(module for module in model.modules() if isinstance(module, Attention))
    side = model.patch_embed.image_size
    images = torch.randn(args.batch_size, 3, side, side)
    labels = torch.randint(0, 10, (args.batch_size,))

    def train_step(mode: str) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with float32_products(mode):
                with autocast(mode):
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
            optimizer.step()
        return step

    def forward(mode: str) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), float32_products(mode), autocast(mode):
                model(images)
        return run

    tokens = model.patch_embed.num_patches + 1
    heads, head_dim = attention_layer.num_heads, attention_layer.head_dim

    def attention(mode: str) -> Callable[[], None]:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        q, k, v = (torch.randn(args.batch_size, heads, tokens, head_dim, dtype=dtype,
                               requires_grad=True) for _ in range(3))
        def run() -> None:
            with float32_products(mode):
                F.scaled_dot_product_attention(q, k, v).sum().backward()
        return run

    model.train()
    rows = [
        ("training step", median_ms({mode: train_step(mode) for mode in MODES},
                                    args.steps, args.repeats)),
        ("forward (inference)", median_ms({mode: forward(mode) for mode in MODES},
                                          args.steps, args.repeats)),
        (f"attention kernel, fwd+bwd ({heads} heads, {tokens} tokens)",
         median_ms({mode: attention(mode) for mode in MODES}, args.steps, args.repeats)),
    ]
    print(f"{args.config}, batch {args.batch_size}, {side}x{side}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats of "
          f"{args.steps} calls")
    print("| what | fp32 ms | fp32, bf16 products ms | bf16 ms | speed-up, bf16 products "
          "| speed-up, bf16 |")
    print("|---|---|---|---|---|---|")
    for what, ms in rows:
        print(f"| {what} | {ms['fp32']:.1f} | {ms['bf16 products']:.1f} | {ms['bf16']:.1f} "
              f"| {ms['fp32'] / ms['bf16 products']:.2f} | {ms['fp32'] / ms['bf16']:.2f} |")


if __name__ == "__main__":
    main()
