"""Time of a training step with Muon against the same step with AdamW, on one model and batch.

    python -m benchmarks.optimizer_step --config configs/cifar10_cpu.yaml --batch-size 32

Three optimisers train copies of the recipe's model (its shape from the config's ``model``
section): AdamW on every parameter (the baseline), ``vit.optimizers.MuonWithAdamW`` (Muon's
Newton-Schulz iterations in bfloat16 where the hardware has bf16 units, else fp32, with the
matrices of one shape as one batch), and ``torch.optim.Muon`` with AdamW (its iterations always
in bfloat16, one matrix at a time). The first two run twice: with torch's default AdamW update
(one parameter at a time on a CPU) and with its fused one (``fused=True``, one kernel), as
``vit.lit`` trains. Each repeat times ``--steps`` steps of each in turn; the median milliseconds
per step and the ratio to AdamW's are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from vit.model import ImageClassifier, encoder_config
from vit.optimizers import MuonWithAdamW, is_encoder_matrix


class TorchMuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on the matrices and AdamW on the rest, stepped together."""

    def __init__(self, matrices: list[torch.Tensor], rest: list[torch.Tensor], lr: float) -> None:
        self.muon = torch.optim.Muon(matrices, lr=lr, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], defaults={})

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        self.muon.step()
        self.adamw.step()


def build(
    model_options: dict, optimizer: str, fused: bool = False
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A copy of the recipe's model and ``optimizer`` ("adamw", "muon" or "torch.optim.Muon") for
    it; ``fused``: AdamW's fused update."""
    torch.manual_seed(0)
    shape = {k: model_options[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio") if k in model_options}
    model = ImageClassifier(
        image_size=32, patch_size=model_options.get("patch_size", 4), num_classes=10,
        encoder=encoder_config(model_options.get("variant", "tiny"), **shape),
    )
    lr = float(model_options.get("lr", 1e-3))
    matrices = [p for n, p in model.named_parameters() if is_encoder_matrix(n, p)]
    rest = [p for n, p in model.named_parameters() if not is_encoder_matrix(n, p)]
    if optimizer == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, fused=fused)
    if optimizer == "muon":
        return model, MuonWithAdamW(matrices, rest, lr=lr, fused=fused)
    return model, TorchMuonWithAdamW(matrices, rest, lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/cifar10_cpu.yaml"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model_options = yaml.safe_load(args.config.read_text()).get("model", {})
    images, labels = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    choices = {"adamw": ("adamw", False), "adamw (fused AdamW)": ("adamw", True),
               "muon": ("muon", False), "muon (fused AdamW)": ("muon", True)}
    if hasattr(torch.optim, "Muon"):
        choices["torch.optim.Muon"] = ("torch.optim.Muon", False)
    runs = {label: build(model_options, *choice) for label, choice in choices.items()}

    def step(name: str) -> None:
        model, optimizer = runs[name]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for name in runs:  # warm-up: allocations and optimiser state
        step(name)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    baseline = statistics.median(times["adamw"])
    print(f"{args.config}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats of {args.steps} steps")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"{name:>19}: {median:7.1f} ms/step   {median / baseline:5.2f} x AdamW's")


if __name__ == "__main__":
    main()
