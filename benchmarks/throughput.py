"""Training and inference throughput of this project's ViT against timm's, same shape and batch.

    python -m benchmarks.throughput --variants tiny small --repeats 5
    python -m benchmarks.throughput --device cuda --precision bf16 --batch-size 128

Both models get identical weights and the same optimiser (AdamW's fused update, as ``train.py``
trains). Each repeat times ``--steps`` steps of ours, then of timm's (interleaved, so that the
machine's noise hits both alike); the median images/s of each and their ratio are printed, with the
achieved GFLOP/s of a training step against this machine's fp32 matmul rate measured in the same
run (the best of its measurements before and after every row: the ceiling). FLOPs are those each
model executes: ours skips the last block's work on every token but CLS, so it runs fewer for the
same logits. On a GPU the timers wait for the device, and ``--precision bf16`` runs both models
under bf16 autocast (the matmul rate is then measured in bf16). Both models share one process,
which keeps freed memory as ``train.py`` does (``vit.allocator``;
``python -m benchmarks.allocator`` measures it). On x86-64 Linux ours attends through its own CPU
kernel (``vit.cpu_attention``; ``VIT_CPU_ATTENTION=0`` times it without), and with
``VIT_CPU_LINEAR=1`` runs its large linear layers through oneDNN (``vit.cpu_linear``; the header
says which library); FLOPs are counted on torch's operators, the same arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from vit import cpu_linear
from vit.allocator import keep_freed_memory
from vit.lit import COMPILE_MODES
from vit.model import ImageClassifier, encoder_config


def parse_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device``'s value as a device, or a usage error when that device is not there."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name}: not a device name; use cpu or cuda (cuda:N for GPU N).")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: torch sees no CUDA GPU here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: only cpu and cuda are supported.")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 20,
    rounds: int = 5,
) -> float:
    """This machine's matrix-multiply rate in ``dtype``: the ceiling for a transformer step.

    The best of ``rounds`` timings of ``repeats`` products, through torch's ``@`` and, in fp32
    on a CPU where ``vit.cpu_linear`` is available, through oneDNN as well (the faster of the
    two libraries sets the ceiling): a ceiling, so a round slowed by another process does not
    lower it.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    products = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and cpu_linear.available():
        products.append(lambda: cpu_linear.onednn_linear(a, b))
    rates = []
    for product in products:
        for _ in range(3):
            product()
        for _ in range(rounds):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                product()
            synchronize(device)
            rates.append(2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return max(rates)


def make_pair(variant: str, image_size: int, patch_size: int) -> tuple[ImageClassifier, VisionTransformer]:
    cfg = encoder_config(variant)
    ours = ImageClassifier(image_size=image_size, patch_size=patch_size, num_classes=10, encoder=cfg)
    theirs = VisionTransformer(
        img_size=image_size, patch_size=patch_size, num_classes=10, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
    )
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def train_step_fn(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as vit.lit trains

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def infer_step_fn(
    model: torch.nn.Module, images: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast():
            model(images)

    return step


def step_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """FLOPs of one training step (forward and backward) and of one inference pass."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        model(images)
    return {"train": counter.get_total_flops(), "infer": forward_only.get_total_flops()}


def interleaved_rates(
    steps: dict[str, Callable[[], None]], batch: int, n_steps: int, repeats: int, warmup: int,
    device: torch.device,
) -> dict[str, float]:
    """Median images/s of each step function, timed in alternation."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n_steps):
                fn()
            synchronize(device)
            rates[name].append(batch * n_steps / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--compile-timm", action="store_true", help="torch.compile timm's model")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for the compiled models (reduce-overhead: "
                             "CUDA graphs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both models under bf16 autocast (slow on CPUs without bf16 units)")
    args = parser.parse_args()
    if args.compile_mode != "default" and not (args.compile or args.compile_timm):
        parser.error(f"--compile-mode {args.compile_mode} needs --compile or --compile-timm.")

    device = parse_device(parser, args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16")

    kept = keep_freed_memory()
    torch.manual_seed(0)
    size = 4096 if device.type == "cuda" else 1024
    peaks = [matmul_gflops(device, dtype, size=size)]
    results = []
    for variant in args.variants:
        ours, theirs = (m.to(device) for m in make_pair(variant, args.image_size, args.patch_size))
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, 10, (args.batch_size,), device=device)
        flops = {"ours": step_flops(ours, images, labels), "timm": step_flops(theirs, images, labels)}
        if args.compile:
            ours.compile(mode=args.compile_mode)
        if args.compile_timm:
            theirs.compile(mode=args.compile_mode)
        for mode in ("train", "infer"):
            models = {"ours": ours, "timm": theirs}
            if mode == "train":
                for m in models.values():
                    m.train()
                fns = {n: train_step_fn(m, images, labels, autocast) for n, m in models.items()}
            else:
                for m in models.values():
                    m.eval()
                fns = {n: infer_step_fn(m, images, autocast) for n, m in models.items()}
            rates = interleaved_rates(
                fns, args.batch_size, args.steps, args.repeats, warmup=2, device=device
            )
            achieved = {n: rates[n] * flops[n][mode] / args.batch_size / 1e9 for n in models}
            results.append((variant, mode, rates, achieved))
            peaks.append(matmul_gflops(device, dtype, size=size))
    # The ceiling is the best matmul rate of the run: measured before and after every row, so
    # that a spell of a shared host's slowness lowers neither it nor a row's share of it.
    peak = max(peaks)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {hardware}, {args.precision} matmul {peak:.1f} GFLOP/s "
          f"(best of {len(peaks)} measurements in this run, lowest {min(peaks):.1f}), "
          f"freed memory kept: {'yes' if kept else 'no (not glibc)'}")
    compiled = [name for name, on in (("ours", args.compile), ("timm", args.compile_timm)) if on]
    print(f"batch {args.batch_size}, {args.image_size}x{args.image_size}, patch {args.patch_size}, "
          f"median of {args.repeats} interleaved repeats of {args.steps} steps"
          + (f", compiled ({args.compile_mode}): {' and '.join(compiled)}" if compiled else "")
          + (f", our large linear layers: {'oneDNN' if cpu_linear.enabled() else 'MKL'}"
             if device.type == "cpu" else ""))
    print("| variant | mode | ours img/s | timm img/s | ours / timm | ours GFLOP/s | ours % of matmul "
          "| timm % of matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, mode, rates, achieved in results:
        print(f"| {variant} | {mode} | {rates['ours']:.0f} | {rates['timm']:.0f} | "
              f"{rates['ours'] / rates['timm']:.2f} | {achieved['ours']:.1f} | "
              f"{100 * achieved['ours'] / peak:.0f} % | {100 * achieved['timm'] / peak:.0f} % |")


if __name__ == "__main__":
    main()
