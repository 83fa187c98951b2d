"""A CPU training step under glibc's default malloc against the same step with freed memory kept.

    python -m benchmarks.allocator --config configs/cifar10_cpu.yaml --batch-size 32
    python -m benchmarks.allocator --variant small --depth 9 --optimizer adamw --precision fp32 --batch-size 128

A process cannot return to glibc's default policy once ``vit.allocator.keep_freed_memory`` has
changed it, so each round starts two fresh processes in turn: one with the default policy (the
baseline), one that keeps freed memory first, as ``train.py`` does. Each builds the recipe's
model and optimiser (the config's ``model`` section, through ``benchmarks.optimizer_step``),
warms up, and times ``--steps`` training steps one by one, counting the page faults the process
takes. The medians over rounds of each and their ratio are printed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from benchmarks.optimizer_step import build
from benchmarks.precision import autocast
from vit.allocator import is_glibc, keep_freed_memory


def time_steps(args: argparse.Namespace, model_options: dict) -> dict[str, float]:
    """Median ms of a training step and page faults per step, in this process."""
    model, optimizer = build(model_options, args.optimizer)
    images = torch.randn(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    bf16 = args.precision == "bf16"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: optimiser state, kernels, the allocator's steady state
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"ms": statistics.median(times), "faults": faults / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10_cpu.yaml"))
    parser.add_argument("--variant", help="override the config's model variant")
    parser.add_argument("--depth", type=int, help="override the config's depth")
    parser.add_argument("--optimizer", choices=["muon", "adamw"],
                        help="default: the config's model.optimizer")
    parser.add_argument("--precision", choices=["fp32", "bf16"],
                        help="default: bf16 where the config's trainer.precision is bf16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="pairs of processes")
    parser.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not is_glibc():
        parser.error("the C library here is not glibc: there is no malloc policy to compare.")
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file; pass a recipe from configs/.")
    config = yaml.safe_load(args.config.read_text())
    options = config.get("model", {})
    options.update({k: v for k, v in (("variant", args.variant), ("depth", args.depth)) if v})
    if args.optimizer is None:
        args.optimizer = options.get("optimizer", "adamw")
    if args.precision is None:
        precision = str(config.get("trainer", {}).get("precision"))
        args.precision = "bf16" if "bf16" in precision else "fp32"

    if args.child:
        if args.child == "keep":
            keep_freed_memory()
        print(json.dumps(time_steps(args, options)))
        return

    command = [sys.executable, "-m", "benchmarks.allocator", *sys.argv[1:]]
    results: dict[str, list[dict[str, float]]] = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for policy in results:
            out = subprocess.run([*command, "--child", policy], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr.strip().splitlines()[-1])
            results[policy].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{options.get('variant', 'tiny')} depth {options.get('depth', 'as the variant')} "
          f"({args.config}), {args.optimizer}, {args.precision}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} processes each, "
          f"each the median of {args.steps} steps")
    medians = {policy: {key: statistics.median(r[key] for r in runs) for key in ("ms", "faults")}
               for policy, runs in results.items()}
    for policy, label in (("default", "glibc default"), ("keep", "freed memory kept")):
        m = medians[policy]
        print(f"{label:>18}: {m['ms']:7.1f} ms/step {m['faults']:9.0f} page faults/step")
    print(f"speed-up: {medians['default']['ms'] / medians['keep']['ms']:.2f}x")


if __name__ == "__main__":
    main()
