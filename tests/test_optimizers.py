"""Muon orthogonalises updates as torch's does; MuonWithAdamW steps Muon and AdamW as one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.optimizer_step import build
from conftest import run_benchmark
from vit.optimizers import Muon, MuonWithAdamW, orthogonalise


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def split(model: nn.Sequential) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weight matrices for Muon, biases for AdamW."""
    return [p for p in model.parameters() if p.ndim == 2], [p for p in model.parameters() if p.ndim < 2]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=generator)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_orthogonalise_keeps_the_singular_vectors_and_brings_the_values_near_one(
    shape: tuple[int, int], dtype: torch.dtype, tolerance: float
) -> None:
    torch.manual_seed(0)
    matrix = torch.randn(shape) @ torch.diag(torch.logspace(0, 2, shape[1]))  # condition ~100
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    result = u.T @ orthogonalise(matrix, dtype=dtype) @ vh.T  # diagonal if the vectors are kept
    off_diagonal = result - torch.diag(result.diagonal())
    assert off_diagonal.abs().max() < tolerance
    assert result.diagonal().min() > 0.5 and result.diagonal().max() < 1.5


def test_orthogonalise_of_a_stack_is_each_matrix_orthogonalised() -> None:
    torch.manual_seed(0)
    stack = torch.randn(3, 16, 8)
    for dtype in (torch.float32, torch.bfloat16):
        each = torch.stack([orthogonalise(matrix, dtype=dtype) for matrix in stack])
        torch.testing.assert_close(orthogonalise(stack, dtype=dtype), each)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9 or later")
def test_muon_steps_as_torch_muon_does_up_to_its_bfloat16_rounding() -> None:
    ours, theirs = make_model(), make_model()
    start = [p.detach().clone() for p in split(ours)[0]]
    train(ours, Muon(split(ours)[0], lr=0.01, weight_decay=0.1), steps=2)
    train(theirs, torch.optim.Muon(split(theirs)[0], lr=0.01, weight_decay=0.1,
                                   adjust_lr_fn="match_rms_adamw"), steps=2)
    for before, mine, reference in zip(start, split(ours)[0], split(theirs)[0]):
        moved, expected = mine.detach() - before, reference.detach() - before
        assert (moved - expected).norm() < 0.03 * expected.norm()


def test_muon_refuses_a_vector_naming_its_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(16,\): give it to AdamW"):
        Muon(make_model().parameters())


def test_each_parameter_moves_as_its_own_optimiser_would_move_it() -> None:
    combined, separate = make_model(), make_model()
    matrices, vectors = split(combined)
    train(combined, MuonWithAdamW(matrices, vectors, lr=0.01), steps=3)

    matrices, vectors = split(separate)
    muon = Muon(matrices, lr=0.01)
    adamw = torch.optim.AdamW(vectors, lr=0.01)

    class Both(torch.optim.Optimizer):  # the plain pair, stepped by hand
        def __init__(self) -> None:
            super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})

        def step(self, closure):  # type: ignore[override]
            loss = closure()
            muon.step()
            adamw.step()
            return loss

    train(separate, Both(), steps=3)
    for ours, reference in zip(combined.parameters(), separate.parameters()):
        torch.testing.assert_close(ours, reference)
    assert not torch.equal(combined[0].weight, make_model()[0].weight)  # it did train


def test_a_scheduler_drives_the_learning_rate_of_both() -> None:
    model = make_model()
    optimizer = MuonWithAdamW(*split(model), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    train(model, optimizer, steps=1)
    scheduler.step()
    assert [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups] == [0.05, 0.05]


def test_a_saved_state_resumes_exactly() -> None:
    model = make_model()
    optimizer = MuonWithAdamW(*split(model), lr=0.01)
    train(model, optimizer, steps=2)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, steps=2, seed=2)

    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = MuonWithAdamW(*split(resumed), lr=0.01)
    resumed_optimizer.load_state_dict(saved_state)
    train(resumed, resumed_optimizer, steps=2, seed=2)
    for ours, reference in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(ours, reference)


def test_an_adamw_state_is_refused_with_a_clear_message() -> None:
    model = make_model()
    adamw_state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not saved by MuonWithAdamW"):
        MuonWithAdamW(*split(model), lr=0.01).load_state_dict(adamw_state)


def test_the_step_benchmark_times_each_optimiser_fused_and_not() -> None:
    done = run_benchmark("optimizer_step", "--steps", "1", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    labels = [line.split(":")[0].strip() for line in done.stdout.splitlines() if "ms/step" in line]
    assert labels[:4] == ["adamw", "adamw (fused AdamW)", "muon", "muon (fused AdamW)"]
    assert "1.00 x AdamW's" in done.stdout.splitlines()[1]
    assert build({}, "adamw", fused=True)[1].defaults["fused"]
    assert build({}, "muon", fused=True)[1].adamw.defaults["fused"]
    assert not build({}, "muon")[1].adamw.defaults["fused"]
