"""Linear layers through oneDNN compute x W^T + b and its gradients as F.linear does, and fall
back to F.linear wherever oneDNN's operator does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_benchmark, table_rows
from vit import cpu_linear
from vit.attention import Attention
from vit.encoder import Block
from vit.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not cpu_linear.available(), reason="needs an x86-64 CPU and a torch built with oneDNN"
)


def output_and_gradients(
    function, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    grad_out: torch.Tensor,
) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = function(*leaves, *([None] if bias is None else []))
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.double(), *(g.double() for g in grads)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 65, 48), (130, 32), (3, 1, 24)])
def test_output_and_gradients_as_exact_as_torchs_linear(shape: tuple[int, ...], bias: bool) -> None:
    """Both against float64: the same function, rounded in a different order."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    weight, b = torch.randn(40, shape[-1]), torch.randn(40) if bias else None
    grad_out = torch.randn(*shape[:-1], 40)
    exact = output_and_gradients(F.linear, x.double(), weight.double(),
                                 None if b is None else b.double(), grad_out)
    ours = output_and_gradients(cpu_linear.onednn_linear, x, weight, b, grad_out)
    theirs = output_and_gradients(F.linear, x, weight, b, grad_out)
    assert len(ours) == (4 if bias else 3)
    for our, their, truth in zip(ours, theirs, exact):
        assert our.shape == truth.shape
        our_error = (our - truth).abs().max().item()
        their_error = (their - truth).abs().max().item()
        scale = truth.abs().max().item()
        assert our_error <= 2 * their_error + 1e-6 * scale, (our_error, their_error)


def test_a_strided_input_and_only_some_gradients() -> None:
    """The CLS-only block feeds the first token's slice, and frozen weights need no gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 9, 16, requires_grad=True)
    weight, bias = torch.randn(8, 16), torch.randn(8, requires_grad=True)
    out = cpu_linear.onednn_linear(x[:, :1], weight, bias)
    grad_x, grad_bias = torch.autograd.grad(out.square().sum(), [x, bias])
    expected = F.linear(x[:, :1], weight, bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        grad_x, torch.autograd.grad(expected.square().sum(), x)[0], atol=1e-5, rtol=1e-5
    )
    assert grad_x[:, 1:].abs().max() == 0 and grad_bias.shape == (8,)


def test_blocks_run_their_four_products_through_onednn(choose_linear_route, monkeypatch) -> None:
    choose_linear_route("1")
    calls = []
    product = cpu_linear._onednn_product

    def recording(x, weight, bias):
        calls.append(tuple(weight.shape))
        return product(x, weight, bias)

    monkeypatch.setattr(cpu_linear, "_onednn_product", recording)
    monkeypatch.setattr(cpu_linear, "MIN_ROWS", 18)
    block = Block(32, 2, mlp_ratio=2.0)
    block(torch.randn(2, 9, 32)).sum().backward()
    forward = [(96, 32), (32, 32), (64, 32), (32, 64)]  # q/k/v, projection, MLP in and out
    assert calls[:4] == forward
    assert sorted(calls[4:]) == sorted((w[1], w[0]) for w in forward)  # the inputs' gradients


@pytest.mark.parametrize(
    "case", ["too few rows", "autocast", "float64", "flop counter", "switched off"]
)
def test_torchs_linear_where_onednn_does_not_apply(
    case: str, choose_linear_route, monkeypatch
) -> None:
    choose_linear_route("1")
    calls = []
    monkeypatch.setattr(cpu_linear, "onednn_linear", lambda *args: calls.append(1))
    if case != "too few rows":
        monkeypatch.setattr(cpu_linear, "MIN_ROWS", 18)  # every other case would use oneDNN
    layer = Attention(32, 2)
    x = torch.randn(2, 9, 32)
    if case == "too few rows":
        assert not cpu_linear.usable(x, layer.qkv.weight)
        out = layer(x)
        assert cpu_linear.usable(torch.randn(cpu_linear.MIN_ROWS, 32), layer.qkv.weight)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
    elif case == "float64":
        out = layer.double()(x.double())
    elif case == "flop counter":
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
        assert counter.get_total_flops() >= 2 * 2 * 9 * 32 * (96 + 32)  # q/k/v and projection
    else:
        choose_linear_route("0")
        out = layer(x)
    assert out.shape == (2, 9, 32) and calls == []


@pytest.mark.parametrize("choice,through_onednn", [("", False), ("0", False), ("1", True)])
def test_onednn_is_a_choice_off_by_default(
    choice: str, through_onednn: bool, choose_linear_route
) -> None:
    """oneDNN measured faster than MKL on one AMD EPYC host, slower on another and on a Xeon."""
    choose_linear_route(choice)
    assert cpu_linear.enabled() is through_onednn
    rows = torch.randn(cpu_linear.MIN_ROWS, 8)
    assert cpu_linear.usable(rows, torch.randn(4, 8)) is through_onednn


def test_an_unknown_switch_value_names_the_choices(choose_linear_route) -> None:
    choose_linear_route("yes")
    with pytest.raises(ConfigError, match=r"VIT_CPU_LINEAR='yes'.*set it to 1.*0.*unset"):
        Attention(32, 2)(torch.randn(2, 9, 32))


def test_the_benchmark_prints_both_paths_and_their_ratio() -> None:
    done = run_benchmark("linear", "--shapes", "40x8x12", "--steps", "1", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout, "40 x")
    assert [row[1] for row in rows] == ["forward", "forward + backward"]
    assert all(float(cell) > 0 for row in rows for cell in row[2:5])
    assert all(row[5] == "MKL" for row in rows)  # 40 rows: the model keeps F.linear
    refused = run_benchmark("linear", "--shapes", "40x8")
    assert refused.returncode == 2 and "give a shape as ROWSxINxOUT" in refused.stderr
