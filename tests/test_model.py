"""The image model is a real ViT: timm's weights give timm's logits; shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import run_benchmark, table_rows
from vit import cpu_attention, cpu_linear
from vit.attention import Attention
from vit.embed import resample_pos_embed
from vit.model import VARIANTS, EncoderConfig, ImageClassifier, encoder_config

SMALL = EncoderConfig(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


def timm_twin(image_size: int, patch_size: int, num_classes: int, cfg: EncoderConfig) -> VisionTransformer:
    return VisionTransformer(
        img_size=image_size, patch_size=patch_size, num_classes=num_classes,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
    ).eval()


def products_through(library: str, choose_linear_route, monkeypatch) -> None:
    """Route the test's linear layers through oneDNN at any size, or keep them on F.linear."""
    if library == "oneDNN":
        if not cpu_linear.available():
            pytest.skip("oneDNN's linear operator is not available here")
        choose_linear_route("1")
        monkeypatch.setattr(cpu_linear, "MIN_ROWS", 1)
    else:
        choose_linear_route("0")
    assert cpu_linear.usable(torch.randn(4, 8), torch.randn(8, 8)) == (library == "oneDNN")


@pytest.mark.parametrize("library", ["MKL", "oneDNN"])
@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (32, 8), (48, 16)])
def test_timm_weights_give_timm_logits(
    image_size: int, patch_size: int, library: str, choose_linear_route, monkeypatch
) -> None:
    products_through(library, choose_linear_route, monkeypatch)
    theirs = timm_twin(image_size, patch_size, 10, SMALL)
    with torch.no_grad():  # non-trivial values everywhere, not timm's near-zero init
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = ImageClassifier(image_size=image_size, patch_size=patch_size, num_classes=10, encoder=SMALL).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), theirs(images))


@pytest.mark.parametrize("library", ["MKL", "oneDNN"])
def test_training_gradients_match_timm_though_the_last_block_computes_cls_alone(
    library: str, choose_linear_route, monkeypatch
) -> None:
    products_through(library, choose_linear_route, monkeypatch)
    theirs = timm_twin(32, 4, 10, SMALL).train()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=SMALL).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 3])
    for model in (ours, theirs):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert ours.forward_features(images, cls_only=True).shape == (4, 1, SMALL.embed_dim)
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, msg=name)


def test_bf16_on_the_cpu_trains_attention_in_float32_infers_in_bf16_close_to_float32(
    monkeypatch,
) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=SMALL).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 3])
    exact = model(images)
    attention = torch.nn.functional.scaled_dot_product_attention
    kernels = cpu_attention.attention, cpu_attention.attention_of_queries
    query_dtypes, kernel_dtypes = [], []

    def recording_attention(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        query_dtypes.append(q.dtype)
        return attention(q, *args, **kwargs)

    def recording(kernel):
        def recording_kernel(projection: torch.Tensor, *args) -> torch.Tensor:
            kernel_dtypes.append(projection.dtype)
            return kernel(projection, *args)

        return recording_kernel

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_attention)
    monkeypatch.setattr(cpu_attention, "attention", recording(kernels[0]))
    monkeypatch.setattr(cpu_attention, "attention_of_queries", recording(kernels[1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(images)
    torch.nn.functional.cross_entropy(mixed.float(), labels).backward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inferred = model(images)
    as_bf16 = model.to(torch.bfloat16)(images.bfloat16())  # a model cast whole, no autocast
    # Training (autocast, then the bf16 model): this project's kernel, in float32 (it takes the
    # bf16 projections); inference: torch's kernel in bfloat16.
    assert kernel_dtypes == [torch.bfloat16] * SMALL.depth * 2
    assert query_dtypes == [torch.bfloat16] * SMALL.depth
    assert mixed.dtype == inferred.dtype == as_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), exact, atol=0.05, rtol=0.05)
    torch.testing.assert_close(inferred.float(), exact, atol=0.05, rtol=0.05)
    torch.testing.assert_close(as_bf16.float(), exact, atol=0.05, rtol=0.05)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_padding_mask_keeps_padded_keys_out_of_image_model() -> None:
    model = ImageClassifier(image_size=32, patch_size=8, num_classes=5, encoder=SMALL).eval()
    images = torch.randn(2, 3, 32, 32)
    no_mask = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(model(images, no_mask), model(images))


def test_every_parameter_receives_a_gradient() -> None:
    model = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=SMALL)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (32, 2), (64, 8), (96, 16), (28, 7)])
def test_output_and_token_shapes(image_size: int, patch_size: int) -> None:
    model = ImageClassifier(image_size=image_size, patch_size=patch_size, num_classes=7, encoder=SMALL)
    num_patches = (image_size // patch_size) ** 2
    images = torch.randn(3, 3, image_size, image_size)
    assert model.patch_embed(images).shape == (3, num_patches, SMALL.embed_dim)
    assert model.forward_features(images).shape == (3, 1 + num_patches, SMALL.embed_dim)
    assert model(images).shape == (3, 7)


def test_patch_size_that_does_not_divide_image_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"patch_size=5 does not divide image_size=32.*1, 2, 4, 8, 16, 32"):
        ImageClassifier(image_size=32, patch_size=5, num_classes=10, encoder=SMALL)


def test_heads_that_do_not_divide_width_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="num_heads=5 does not divide embed_dim=48"):
        ImageClassifier(image_size=32, patch_size=4, num_classes=10,
                        encoder=EncoderConfig(embed_dim=48, depth=1, num_heads=5, mlp_ratio=2.0))


@pytest.mark.parametrize("shape", [(30, 30), (32, 16)], ids=["not-a-multiple", "not-square"])
def test_wrong_input_size_names_the_sizes(shape: tuple[int, int]) -> None:
    model = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=SMALL)
    message = rf"multiple of patch_size=4 \(built for 32x32\), got {shape[0]}x{shape[1]}"
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, *shape))


def test_smaller_images_use_the_same_parameters_with_resampled_positions() -> None:
    model = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=SMALL).eval()
    small = ImageClassifier(image_size=16, patch_size=4, num_classes=10, encoder=SMALL).eval()
    state = model.state_dict()
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid_size=4)
    small.load_state_dict(state)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), small(images))
    model.train()
    model(images).sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad[0, 1:].abs().sum() > 0


def test_linear_patch_embedding_is_one_linear_map_per_flattened_patch() -> None:
    model = ImageClassifier(image_size=8, patch_size=4, num_classes=2, encoder=SMALL)
    images = torch.randn(2, 3, 8, 8)
    patches = images.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 4, 3 * 4 * 4)  # (B, N, C*P*P)
    proj = model.patch_embed.proj
    expected = patches @ proj.weight.reshape(SMALL.embed_dim, -1).T + proj.bias
    torch.testing.assert_close(model.patch_embed(images), expected)


def test_variants_build_and_overrides_apply() -> None:
    for name in VARIANTS:
        cfg = encoder_config(name)
        assert cfg == VARIANTS[name]
    assert encoder_config("tiny", depth=3).depth == 3
    with pytest.raises(ValueError, match="unknown variant 'huge'.*nano"):
        encoder_config("huge")


def test_resampled_positions_keep_cls_and_match_timm_at_the_new_size() -> None:
    theirs = timm_twin(32, 4, 10, SMALL)
    resampled = resample_pos_embed(theirs.pos_embed.detach(), grid_size=12)
    assert resampled.shape == (1, 1 + 144, SMALL.embed_dim)
    torch.testing.assert_close(resampled[:, :1], theirs.pos_embed[:, :1].detach())


def _self_attention_share(attention: Attention, tokens: torch.Tensor) -> float:
    """Mean attention weight a token gives itself, straight from the q/k weights."""
    q, k, _ = attention.qkv(tokens).chunk(3, dim=-1)
    q, k = (t.unflatten(-1, (attention.num_heads, -1)).transpose(1, 2) for t in (q, k))
    weights = (q @ k.transpose(-1, -2) * attention.head_dim**-0.5).softmax(dim=-1)
    return weights.diagonal(dim1=-2, dim2=-1).mean().item()


def test_mimetic_init_makes_tokens_attend_to_themselves_and_values_cancel() -> None:
    torch.manual_seed(0)
    dim, tokens = 128, 65
    x = torch.nn.functional.layer_norm(torch.randn(2, tokens, dim), (dim,))
    attention = ImageClassifier(
        image_size=32, patch_size=4, num_classes=10, encoder=encoder_config("tiny")
    ).blocks[0].attn
    with torch.no_grad():
        assert _self_attention_share(attention, x) < 2 / tokens  # timm's init: near uniform
        attention.mimetic_init_()
        assert _self_attention_share(attention, x) > 20 / tokens
    value_out = (attention.proj.weight @ attention.qkv.weight[2 * dim:]).detach()  # W_proj W_v
    noise = value_out + 0.4 * torch.eye(dim)  # what is left of 0.4 Z - 0.4 I
    assert noise.diagonal().abs().mean() < 0.05
    assert (noise.norm() / dim**0.5).item() == pytest.approx(0.4, rel=0.1)  # |Z|_F ~ sqrt(dim)
    assert not attention.qkv.bias.any() and not attention.proj.bias.any()


def test_the_throughput_benchmark_prints_both_models_and_the_ceiling() -> None:
    done = run_benchmark("throughput", "--variants", "nano", "--batch-size", "4", "--steps", "1",
                         "--repeats", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(best of 3 measurements in this run" in done.stdout  # before, after train, after infer
    rows = table_rows(done.stdout, "nano")
    assert [row[1] for row in rows] == ["train", "infer"]
    assert all(float(cell) > 0 for row in rows for cell in row[2:6])
