"""A training step in float32 against the same step under bfloat16 autocast, on the CPU.

    python -m benchmarks.precision --config configs/cifar10_cpu.yaml --batch-size 32

CPUs with bf16 matrix units (Intel AMX, AVX512-BF16) multiply bfloat16 matrices several times
faster than float32 ones; others emulate it and run slower. This prints, for the recipe's model
and optimiser (the shape and ``optimizer`` of the config's ``model`` section), the median
milliseconds of a training step and of a forward pass in each precision and their ratio, and
the attention kernel's forward and backward at the model's shape in each dtype: torch's CPU
kernel is slower in bfloat16, which is why ``vit.attention.Attention`` attends in float32
under CPU autocast. ``--trainer.precision bf16-mixed`` trains with the faster setting.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
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


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


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

    def train_step(bf16: bool) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(bf16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
        return step

    def forward(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(bf16):
                model(images)
        return run

    tokens = model.patch_embed.num_patches + 1
    heads, head_dim = attention_layer.num_heads, attention_layer.head_dim

    def attention(dtype: torch.dtype) -> Callable[[], None]:
        q, k, v = (torch.randn(args.batch_size, heads, tokens, head_dim, dtype=dtype,
                               requires_grad=True) for _ in range(3))
        def run() -> None:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        return run

    model.train()
    rows = [
        ("training step", median_ms({"fp32": train_step(False), "bf16": train_step(True)},
                                    args.steps, args.repeats)),
        ("forward (inference)", median_ms({"fp32": forward(False), "bf16": forward(True)},
                                          args.steps, args.repeats)),
        (f"attention kernel, fwd+bwd ({heads} heads, {tokens} tokens)",
         median_ms({"fp32": attention(torch.float32), "bf16": attention(torch.bfloat16)},
                   args.steps, args.repeats)),
    ]
    print(f"{args.config}, batch {args.batch_size}, {side}x{side}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats of "
          f"{args.steps} calls")
    print("| what | fp32 ms | bf16 ms | fp32 / bf16 (speed-up) |")
    print("|---|---|---|---|")
    for what, ms in rows:
        print(f"| {what} | {ms['fp32']:.1f} | {ms['bf16']:.1f} | {ms['fp32'] / ms['bf16']:.2f} |")


if __name__ == "__main__":
    main()
