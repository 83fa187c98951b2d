"""The CPU attention kernel computes softmax(q k^T / sqrt(d)) v and its gradient as torch does,
and the model falls back to torch's kernel wherever this one does not apply."""

from __future__ import annotations

import platform
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import run_benchmark, table_rows
from vit import cpu_attention
from vit.attention import Attention

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="the kernel is built on x86-64 Linux only",
)


def torch_attention(q: torch.Tensor, kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Queries (B, Nq, H * D) over keys and values (B, N, 2 * H * D) -> (B, Nq, H * D), through
    F.scaled_dot_product_attention."""
    b, n, _ = kv.shape
    k, v = (part.transpose(1, 2) for part in kv.view(b, n, 2, heads, -1).unbind(2))
    q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def torch_self_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    width = qkv.shape[-1] // 3
    return torch_attention(qkv[..., :width], qkv[..., width:], heads)


def test_the_kernel_builds_here() -> None:
    assert cpu_attention.extension() is not None


SHAPES = [(4, 65, 4, 32), (3, 65, 12, 16), (2, 17, 3, 8), (2, 1, 2, 64), (1, 130, 2, 24)]


@pytest.mark.parametrize("queries", ["every token (fused q, k, v)", "the first token", "its own"])
@pytest.mark.parametrize(("batch", "tokens", "heads", "head_dim"), SHAPES)
def test_output_and_gradients_as_exact_as_torchs_attention(
    batch: int, tokens: int, heads: int, head_dim: int, queries: str
) -> None:
    """Both kernels against float64: the same function, rounded in a different order."""
    torch.manual_seed(0)
    width = heads * head_dim
    fused = queries.startswith("every")
    q_tokens = {"the first token": 1, "its own": 5}.get(queries, tokens)
    inputs = [3 * torch.randn(batch, tokens, 3 * width)] if fused else [
        3 * torch.randn(batch, q_tokens, width), 3 * torch.randn(batch, tokens, 2 * width)]
    grad_out = torch.randn(batch, q_tokens, width)
    if fused:
        ours, theirs = (lambda qkv: cpu_attention.attention(qkv, heads)), (
            lambda qkv: torch_self_attention(qkv, heads))
    else:
        ours, theirs = (lambda q, kv: cpu_attention.attention_of_queries(q, kv, heads)), (
            lambda q, kv: torch_attention(q, kv, heads))

    def output_and_gradients(function, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        tensors = [t.clone().requires_grad_() for t in tensors]
        out = function(*tensors)
        grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
        return [out.double(), *(g.double() for g in grads)]

    exact = output_and_gradients(theirs, [t.double() for t in inputs])
    mine = output_and_gradients(ours, inputs)
    reference = output_and_gradients(theirs, inputs)
    for our, their, truth in zip(mine, reference, exact):
        our_error = (our - truth).abs().max().item()
        their_error = (their - truth).abs().max().item()
        scale = truth.abs().max().item()
        assert our_error <= 2 * their_error + 1e-6 * scale, (our_error, their_error)
        assert our_error <= 1e-5 * scale + 1e-6


def test_without_gradients_the_kernel_still_attends() -> None:
    qkv, q = torch.randn(2, 65, 3 * 128), torch.randn(2, 1, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            cpu_attention.attention(qkv, 4), torch_self_attention(qkv, 4), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            cpu_attention.attention_of_queries(q, qkv[..., 128:], 4),
            torch_attention(q, qkv[..., 128:], 4), atol=1e-5, rtol=1e-4,
        )


def test_other_python_threads_run_while_the_kernel_computes() -> None:
    """The kernel lets go of Python's interpreter lock: a thread decoding images (vit.classify)
    or feeding batches goes on while another attends, instead of stalling for the whole call."""
    kernel = cpu_attention.extension()  # built and loaded before the clock starts
    qkv = torch.randn(64, 512, 3 * 128)  # one call of about a tenth of a second
    window: list[float] = []

    def attend() -> None:
        window.append(time.perf_counter())
        kernel.fused_forward(qkv, 4, 32**-0.5, False)
        window.append(time.perf_counter())

    thread = threading.Thread(target=attend)
    stamps = []
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    start, end = window
    inside = [start] + [t for t in stamps if start < t < end] + [end]
    longest_stall = max(b - a for a, b in zip(inside, inside[1:]))
    assert longest_stall < (end - start) / 2, (
        f"this thread stood still for {longest_stall * 1e3:.0f} ms of the kernel's "
        f"{(end - start) * 1e3:.0f} ms call"
    )


@pytest.mark.parametrize("cls_only", [False, True])
def test_the_attention_layer_uses_the_kernel_and_matches_torchs(
    cls_only: bool, monkeypatch
) -> None:
    torch.manual_seed(0)
    layer = Attention(64, 4).train()
    x = torch.randn(3, 65, 64, requires_grad=True)
    calls = []
    for name in ("attention", "attention_of_queries"):
        kernel = getattr(cpu_attention, name)

        def recording(*args, kernel=kernel, name=name) -> torch.Tensor:
            calls.append(name)
            return kernel(*args)

        monkeypatch.setattr(cpu_attention, name, recording)
    ours = layer(x, cls_only=cls_only)
    our_grads = torch.autograd.grad(ours.square().sum(), [x, *layer.parameters()])
    assert calls == ["attention_of_queries" if cls_only else "attention"]
    monkeypatch.setattr(cpu_attention, "usable", lambda *args: False)
    theirs = layer(x, cls_only=cls_only)
    their_grads = torch.autograd.grad(theirs.square().sum(), [x, *layer.parameters()])
    assert len(calls) == 1 and ours.shape == (3, 1 if cls_only else 65, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    for mine, reference in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-4)


def test_the_operators_pass_torchs_checks() -> None:
    """Schema, shapes without data (what ``torch.compile`` traces with) and autograd, by
    ``torch.library.opcheck``."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 32, requires_grad=True)
    torch.library.opcheck(torch.ops.vit.attention, (qkv, 4, 0.25, True))
    q, kv = torch.randn(2, 1, 32, requires_grad=True), torch.randn(2, 9, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.vit.attention_of_queries, (q, kv, 4, 0.25, True))


@pytest.mark.parametrize("queries", ["every token (fused q, k, v)", "their own"])
def test_the_kept_weights_take_no_gradient(queries: str) -> None:
    """The operators return the attention weights for their backward only: autograd must not
    hand the backward a zero-filled (B, H, N, N) gradient for them."""
    if queries == "their own":
        q, kv = torch.randn(2, 9, 32), torch.randn(2, 9, 2 * 32, requires_grad=True)
        out, weights = torch.ops.vit.attention_of_queries(q, kv, 4, 0.25, True)
    else:
        kv = torch.randn(2, 9, 3 * 32, requires_grad=True)
        out, weights = torch.ops.vit.attention(kv, 4, 0.25, True)
    assert weights.shape == (2, 4, 9, 9) and not weights.requires_grad and out.requires_grad
    with torch.profiler.profile(record_shapes=True) as profile:
        out.sum().backward()
    filled = [event.input_shapes[0] for event in profile.events()
              if event.name in ("aten::fill_", "aten::zero_") and event.input_shapes]
    assert [2, 4, 9, 9] not in filled
    assert kv.grad is not None and kv.grad.abs().sum() > 0


@pytest.mark.parametrize("cls_only", [False, True])
def test_torch_compile_keeps_the_kernel_and_export_leaves_it_out(cls_only: bool) -> None:
    torch.manual_seed(0)
    layer = Attention(32, 2).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    traced = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        traced.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module.forward

    torch.compile(layer, backend=recording_backend, fullgraph=True)(x, cls_only=cls_only)
    assert f"vit.{'attention_of_queries' if cls_only else 'attention'}.default" in traced

    # forward and backward through AOT autograd, as the default compiler runs them
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    ours = compiled(x, cls_only=cls_only)
    our_grads = torch.autograd.grad(ours.square().sum(), [x, *layer.parameters()])
    eager = layer(x, cls_only=cls_only)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(ours, eager)
    for mine, reference in zip(our_grads, eager_grads):
        torch.testing.assert_close(mine, reference)

    exported = torch.export.export(layer.eval(), (x.detach(),), {"cls_only": cls_only})
    assert not any("vit." in str(node.target) for node in exported.graph.nodes)


def test_mismatched_inputs_are_refused_with_their_shapes() -> None:
    shapes = r"queries \[2, 1, 64\] and keys/values \[2, 9, 100\] do not fit 4 heads"
    with pytest.raises(RuntimeError, match=shapes):
        cpu_attention.attention_of_queries(torch.randn(2, 1, 64), torch.randn(2, 9, 100), 4)
    with pytest.raises(RuntimeError, match=r"keys/values \[2, 0, 128\] do not fit"):
        cpu_attention.attention_of_queries(torch.randn(2, 1, 64), torch.randn(2, 0, 128), 4)


@pytest.mark.parametrize(
    "case", ["padding mask", "attention dropout", "too many tokens", "flop counter"]
)
def test_torchs_kernel_where_this_one_does_not_apply(case: str, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cpu_attention, "attention", lambda *args: calls.append(1))
    layer = Attention(32, 2, attn_drop=0.1 if case == "attention dropout" else 0.0).train()
    tokens = cpu_attention.MAX_TOKENS + 1 if case == "too many tokens" else 9
    x = torch.randn(2, tokens, 32)
    if case == "padding mask":
        out = layer(x, torch.zeros(2, tokens, dtype=torch.bool))
    elif case == "flop counter":
        with FlopCounterMode(display=False) as counter:
            out = layer(x)
        assert counter.get_total_flops() > 4 * 2 * tokens * tokens * 32  # the attention products
    else:
        out = layer(x)
    assert out.shape == (2, tokens, 32) and calls == []


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "0")
    cpu_attention.extension.cache_clear()
    try:
        assert cpu_attention.extension() is None
        assert not cpu_attention.usable(torch.randn(1, 5, 24), 0.0)
    finally:
        monkeypatch.delenv(cpu_attention.ENV_SWITCH)
        cpu_attention.extension.cache_clear()
    assert cpu_attention.extension() is not None


def test_a_failed_build_warns_and_falls_back(monkeypatch) -> None:
    import torch.utils.cpp_extension

    def no_compiler(**kwargs) -> None:
        raise RuntimeError("Error building extension 'vit_cpu_attention'\ng++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_attention.extension.cache_clear()
    try:
        message = (r"could not be built \(RuntimeError: g\+\+: not found\).*"
                   r"scaled_dot_product_attention.*VIT_CPU_ATTENTION=0")
        with pytest.warns(UserWarning, match=message):
            assert cpu_attention.extension() is None
        layer = Attention(32, 2)
        assert layer(torch.randn(2, 9, 32)).shape == (2, 9, 32)
    finally:
        monkeypatch.undo()
        cpu_attention.extension.cache_clear()


def test_pips_ninja_is_put_on_the_path_when_none_is_there(monkeypatch) -> None:
    import ninja

    monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    cpu_attention._put_ninja_on_path()
    path = cpu_attention.os.environ["PATH"].split(cpu_attention.os.pathsep)
    assert path == [ninja.BIN_DIR, "/nowhere"]


def test_the_benchmark_prints_both_kernels_and_their_ratio() -> None:
    done = run_benchmark("attention", "--shapes", "2x9x2x8", "--steps", "1", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout, "2 x")
    assert [row[1] for row in rows] == ["forward", "forward + backward"]
    assert all(float(cell) > 0 for row in rows for cell in row[2:])
