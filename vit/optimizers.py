"""Muon for the encoder's weight matrices and AdamW for the rest, stepped as one optimiser.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks") replaces
each matrix's momentum update by its nearest semi-orthogonal matrix (Newton-Schulz
iterations); it suits the hidden layers only, so embeddings, positions, the CLS token, norms,
biases and the head stay with AdamW.

``torch.optim.Muon`` always runs the iterations in bfloat16, one matrix at a time. CPUs without
bfloat16 units multiply bfloat16 several times slower than fp32: on the AMD 2-core CPU of
``benchmarks/RESULTS.md`` a training step of ``configs/cifar10_cpu.yaml``'s model took 7.6 times
as long as with AdamW (``python -m benchmarks.optimizer_step``). ``Muon`` here is the same
algorithm with the iterations in bfloat16 only where the hardware has bf16 units (a GPU, a
CPU with AMX or AVX512-BF16) and fp32 elsewhere, and with the matrices of one shape
orthogonalised as one stack: 1.20 times AdamW's step on that AMD CPU (fp32, before the
stacking), 1.22 on an Intel Xeon with AMX, where torch's takes 1.35.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from vit.hardware import has_bf16_units

# Coefficients of the quintic iteration, tuned by Jordan et al. to converge in 5 steps.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it fast, else fp32."""
    return torch.bfloat16 if has_bf16_units(device) else torch.float32


def orthogonalise(
    matrices: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``U S' V^T`` for each ``matrix = U S V^T`` of an (A, B) matrix or a (G, A, B) stack,
    with every singular value in S' near 1 (roughly 0.5 to 1.5): Newton-Schulz iterations in
    ``dtype`` (default ``newton_schulz_dtype``). A stack runs as one batched product per step."""
    x = matrices.to(dtype or newton_schulz_dtype(matrices.device))
    single = x.ndim == 2
    if single:
        x = x.unsqueeze(0)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if not wide:
        x = x.mT
    return (x[0] if single else x).to(matrices.dtype)


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter of a ``TokenClassifier``, by its name, is decayed: the weight
    matrices and convolution kernels, not norms, biases, positions or the CLS token."""
    return param.ndim >= 2 and name not in ("pos_embed", "cls_token")


def is_encoder_matrix(name: str, param: torch.Tensor) -> bool:
    """Whether a parameter of a ``TokenClassifier``, by its name, is a weight matrix inside the
    encoder blocks: the hidden layers that ``--model.optimizer muon`` gives to Muon."""
    return name.startswith("blocks.") and param.ndim == 2


def run_closure(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimiser's ``closure`` (forward and backward), run with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and decoupled weight decay, for 2-D parameters.

    The update of an (A, B) matrix is scaled by ``0.2 * sqrt(max(A, B))`` to match the size of
    an AdamW update (Liu et al. 2025, "Muon is Scalable for LLM Training"; torch's
    ``adjust_lr_fn="match_rms_adamw"``), so it takes the learning rate and weight decay tuned
    for AdamW.

    Args:
        params: Parameters or param groups; every parameter must be a matrix.
        lr: Learning rate.
        weight_decay: Decoupled weight decay, as in AdamW.
        momentum: Momentum coefficient.
        ns_steps: Newton-Schulz iterations.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(
                        f"Muon updates matrices only, got a parameter of shape {tuple(param.shape)}: "
                        "give it to AdamW instead."
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(momentum).add_(param.grad)
                update = param.grad.add(buffer, alpha=momentum)  # Nesterov
                same_shape[param.shape, param.device, param.dtype].append((param, update))
            # Matrices of one shape (the same layer of every block) are orthogonalised as one
            # stack: a few large products instead of many small ones, faster on the CPU
            # (python -m benchmarks.optimizer_step, benchmarks/RESULTS.md).
            for (shape, _, _), pairs in same_shape.items():
                params = [param for param, _ in pairs]
                directions = orthogonalise(torch.stack([update for _, update in pairs]), group["ns_steps"])
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                scale = 0.2 * math.sqrt(max(shape))
                torch._foreach_add_(params, list(directions.unbind(0)), alpha=-lr * scale)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """``Muon`` over ``muon_groups`` and ``torch.optim.AdamW`` over ``adamw_groups``.

    The param groups of both are this optimiser's ``param_groups`` (the same dicts), so a
    scheduler that sets ``lr`` on every group drives both, and Lightning's single optimiser,
    scheduler and checkpoints treat them as one.

    Args:
        muon_groups: Param groups (or parameters) of 2-D weight matrices.
        adamw_groups: Param groups (or parameters) of everything else.
        lr: Learning rate of both.
        betas: AdamW's moment coefficients.
        momentum: Muon's momentum.
        fused: AdamW's single-kernel update (``torch.optim.AdamW``'s ``fused``).
    """

    def __init__(
        self,
        muon_groups: list[dict[str, Any]] | list[torch.Tensor],
        adamw_groups: list[dict[str, Any]] | list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.95,
        fused: bool = False,
    ) -> None:
        self.muon = Muon(muon_groups, lr=lr, momentum=momentum)
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, fused=fused)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward) once, then update with both optimisers."""
        loss = run_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                "this optimiser state was not saved by MuonWithAdamW (it has keys "
                f"{sorted(state_dict)}): resume with the optimiser the checkpoint was trained with."
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
