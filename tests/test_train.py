"""Training end to end through the CLI on the bundled sample, and starting from timm weights."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from benchmarks import training_loop
from conftest import table_rows
from vit.checkpoint import CheckpointError, load_weights_file
from vit.cli import main, run
from vit.data import TEST_ORDER_SEED
from vit.errors import ConfigError
from vit.lit import Classifier
from vit.prediction_writer import PredictionWriter
from vit.model import ImageClassifier, encoder_config

REPO = Path(__file__).resolve().parents[1]
TINY_FIT = [
    "--config", str(REPO / "configs" / "quickstart.yaml"),
    "--model.variant", "nano",
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "4",
    "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2",
    "--trainer.enable_progress_bar", "false",
]


def fit(tmp_path: Path, *extra: str):
    return main(["fit", *TINY_FIT, "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])


def test_fit_a_few_steps_writes_checkpoints_logs_config_and_tests(tmp_path: Path) -> None:
    cli = fit(tmp_path)
    trainer = cli.trainer
    assert trainer.global_step == 4
    run = Path(trainer.log_dir)
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("val/acc") for r in rows) and any(r.get("test/acc") for r in rows)
    assert all(float(r["time/fit_minutes"]) > 0 for r in rows if r.get("val/acc"))
    assert "test/acc" in trainer.callback_metrics

    # the checkpoint describes its data: no config is needed to rebuild the model
    model = Classifier.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.class_names[0] == "airplane" and model.hparams.data_spec["image_size"] == 32
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.net.head.weight, state["state_dict"]["net.head.weight"])


def test_the_test_after_fit_scores_the_best_or_the_last_weights_as_asked(tmp_path: Path) -> None:
    best = fit(tmp_path / "best", "--trainer.max_epochs", "2")
    assert Path(best.trainer.ckpt_path).name.startswith("epoch")
    last = fit(tmp_path / "last", "--trainer.max_epochs", "2", "--test_weights", "last")
    assert last.trainer.ckpt_path is None  # the weights in memory, at the last step
    state = torch.load(Path(last.trainer.log_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)
    assert state["global_step"] == 8 and "test/acc" in last.trainer.callback_metrics
    for name, saved in state["state_dict"].items():
        torch.testing.assert_close(last.model.state_dict()[name], saved, rtol=0, atol=0)
    # a fit that --trainer.max_steps ends inside its first epoch, before any last.ckpt
    cut = fit(tmp_path / "cut", "--trainer.max_steps", "3", "--test_weights", "last")
    assert cut.trainer.global_step == 3 and "test/acc" in cut.trainer.callback_metrics


def test_a_fit_without_validation_says_which_weights_it_tests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        cli = fit(tmp_path, "--trainer.limit_val_batches", "0")
    assert "test/acc" in cli.trainer.callback_metrics
    assert "no validation ran, so there is no best checkpoint" in caplog.text


def test_a_fit_resumed_at_an_epochs_end_logs_no_accuracy_for_that_epoch(tmp_path: Path) -> None:
    # validation at the epoch's last step writes last.ckpt; the resumed fit ends that epoch first
    first = fit(tmp_path, "--trainer.val_check_interval", "0.5", "--test_after_fit", "false")
    resumed = fit(tmp_path, "--trainer.val_check_interval", "0.5", "--test_after_fit", "false",
                  "--trainer.max_epochs", "2",
                  "--ckpt_path", str(Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"))
    rows = list(csv.DictReader(open(Path(resumed.trainer.log_dir) / "metrics.csv")))
    assert [row["epoch"] for row in rows if row.get("train/acc")] == ["1"]

def test_last_checkpoint_is_of_the_step_a_fit_stops_at_with_raw_weights_apart(tmp_path: Path) -> None:
    # validations (and their saves) at steps 2 and 4; --trainer.max_steps stops the fit at 3
    cli = fit(tmp_path, "--trainer.max_steps", "3", "--trainer.val_check_interval", "0.5",
              "--trainer.callbacks+=vit.ema.EMA", "--trainer.callbacks.decay", "0.5",
              "--test_after_fit", "false")
    last = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["global_step"] == 3
    average = last["state_dict"]["net.head.weight"]
    raw = last["current_model_state"]["net.head.weight"]
    assert not torch.equal(average, raw)  # saved before EMA copies its average into the model


@pytest.mark.parametrize("workers", ["0", "2"])  # augmented on the device, or partly in workers
def test_fit_with_every_augmentation_learns_from_label_mixtures(tmp_path: Path, workers: str) -> None:
    cli = fit(tmp_path, "--data.init_args.auto_augment", "true", "--data.init_args.random_erasing",
              "0.25", "--data.init_args.mixup_alpha", "0.8", "--data.init_args.cutmix_alpha", "1.0",
              "--data.init_args.num_workers", workers)
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert cli.trainer.global_step == 4 and losses and all(0 < loss < 10 for loss in losses)
    assert any(r.get("train/acc") for r in rows) and "test/acc" in cli.trainer.callback_metrics


def test_fit_with_a_low_resolution_phase_then_full_size(tmp_path: Path) -> None:
    cli = fit(tmp_path, "--data.init_args.low_res_size", "16", "--data.init_args.low_res_fraction", "0.5")
    assert cli.trainer.global_step == 4 and "test/acc" in cli.trainer.callback_metrics


def test_fit_with_muon_gives_the_encoder_matrices_to_muon_and_the_rest_to_adamw(tmp_path: Path) -> None:
    cli = fit(tmp_path, "--model.optimizer", "muon")
    assert cli.trainer.global_step == 4 and "test/acc" in cli.trainer.callback_metrics
    optimizer = cli.trainer.optimizers[0]
    names = {id(p): name for name, p in cli.model.net.named_parameters()}
    for_muon = {names[id(p)] for group in optimizer.muon.param_groups for p in group["params"]}
    for_adamw = {names[id(p)] for group in optimizer.adamw.param_groups for p in group["params"]}
    assert for_muon == {n for n, p in cli.model.net.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert for_muon.isdisjoint(for_adamw) and for_muon | for_adamw == set(names.values())
    assert "patch_embed.proj.weight" in for_adamw and "head.weight" in for_adamw


def test_fit_in_bf16_mixed_precision_and_a_warning_where_the_cpu_emulates_bf16(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("vit.cli.has_bf16_units", lambda device: False)
    with pytest.warns(UserWarning, match="no bfloat16 units.*--trainer.precision 32-true"):
        cli = fit(tmp_path, "--trainer.precision", "bf16-mixed", "--model.optimizer", "muon")
    assert cli.trainer.global_step == 4 and "test/acc" in cli.trainer.callback_metrics
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # bf16 in compute only


@pytest.mark.parametrize(
    ("extra", "fused"),
    [((), True), (("--trainer.gradient_clip_val", "1.0"), True),
     (("--trainer.gradient_clip_val", "1.0", "--trainer.precision", "bf16-mixed"), False)],
)
def test_adamw_is_fused_unless_lightning_clips_gradients_in_mixed_precision(
    tmp_path: Path, monkeypatch, extra: tuple[str, ...], fused: bool
) -> None:
    monkeypatch.setattr("vit.cli.has_bf16_units", lambda device: True)
    cli = fit(tmp_path, *extra, "--test_after_fit", "false")
    assert cli.trainer.global_step == 4
    assert cli.trainer.optimizers[0].defaults["fused"] is fused


def test_resuming_keeps_the_optimiser_and_another_one_is_refused(tmp_path: Path, image_spec: dict) -> None:
    cli = fit(tmp_path, "--model.optimizer", "muon", "--test_after_fit", "false")
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = fit(tmp_path, "--ckpt_path", str(last), "--trainer.max_epochs", "2", "--test_after_fit", "false")
    assert resumed.trainer.global_step == 8  # the CLI takes the model's options from the checkpoint
    assert type(resumed.trainer.optimizers[0]).__name__ == "MuonWithAdamW"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    with pytest.raises(ConfigError, match="trained with --model.optimizer muon, this run asks for adamw"):
        Classifier("nano", data_spec=dict(image_spec)).on_load_checkpoint(checkpoint)


def test_a_config_file_that_is_not_yaml_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "recipe.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n")
    for args in (["--config", str(bad)], [f"--config={bad}"], ["-c", str(bad)]):
        assert run(["fit", *args]) == 1
        assert capsys.readouterr().err == (
            f"error: --config {bad} is not valid YAML: line 3, column 1: expected ',' or ']', "
            f"but got '<stream end>'.\n"
        )
    dated = tmp_path / "dated.yaml"  # PyYAML would build a date and fail; the parser reads text
    dated.write_text("trainer:\n  default_root_dir: 2024-02-30\n")
    with pytest.raises(SystemExit) as printed:
        main(["fit", *TINY_FIT, "--config", str(dated), "--print_config"])
    assert printed.value.code == 0 and "default_root_dir: '2024-02-30'" in capsys.readouterr().out


def test_predict_writes_one_row_per_test_item_in_the_splits_order(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    checkpoint = Path(fit(tmp_path).trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = main(["predict", *TINY_FIT, "--trainer.default_root_dir", str(tmp_path / "predict"),
                "--ckpt_path", str(checkpoint)])
    path = Path(cli.trainer.log_dir) / "predictions.csv"
    rows = list(csv.DictReader(path.open()))
    names = cli.datamodule.class_names
    labels = cli.datamodule.splits["test"].labels.tolist()
    assert [int(r["index"]) for r in rows] == list(range(len(labels))) == list(range(200))
    assert [r["label"] for r in rows] == [names[label] for label in labels]
    assert all(Path(r["input"]).parent.name == r["label"] for r in rows)  # test/<class>/<file>
    assert len({r["input"] for r in rows}) == 200
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert f"wrote 200 predictions to {path}; {correct} (" in capsys.readouterr().out
    batches = cli.trainer.predict(cli.model, datamodule=cli.datamodule)  # the same weights
    order = torch.randperm(200, generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
    probs = torch.empty(len(order), len(names))
    probs[order] = torch.cat([batch["probs"] for batch in batches])  # back in the split's order
    assert [r["predicted"] for r in rows] == [names[i] for i in probs.argmax(dim=1).tolist()]
    torch.testing.assert_close(torch.tensor([float(r["probability"]) for r in rows]),
                               probs.max(dim=1).values, atol=1e-6, rtol=0)
    limited = main(["predict", *TINY_FIT, "--trainer.default_root_dir", str(tmp_path / "limited"),
                    "--ckpt_path", str(checkpoint), "--trainer.limit_predict_batches", "2"])
    rows = list(csv.DictReader((Path(limited.trainer.log_dir) / "predictions.csv").open()))
    indices = [int(r["index"]) for r in rows]
    assert len(rows) == 128 and indices == sorted(indices)  # two batches of the quickstart's 64
    assert len({r["label"] for r in rows}) == len(names)  # every class, not the first folder


def test_prediction_files_follow_the_split_order_per_loader_and_process(tmp_path: Path) -> None:
    def batch(labels: list[int], preds: list[int]) -> dict[str, torch.Tensor]:
        probs = torch.nn.functional.one_hot(torch.tensor(preds), 3).float() * 0.5 + 1 / 6
        return {"probs": probs, "preds": torch.tensor(preds), "labels": torch.tensor(labels)}

    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              world_size=2, global_rank=1)
    module = SimpleNamespace(class_names=["a", "b", "c"])
    loaders = [[batch([2, 0], [2, 1]), batch([1], [1])], [batch([0], [0])]]
    indices = [[[7, 3], [5]], [[0]]]  # a distributed sampler's share, out of order
    PredictionWriter().write_on_epoch_end(trainer, module, loaders, indices)
    first = list(csv.reader((tmp_path / "predictions_loader0_rank1.csv").open()))
    assert first == [["index", "label", "predicted", "probability"],
                     ["3", "a", "b", "0.666667"], ["5", "b", "b", "0.666667"],
                     ["7", "c", "c", "0.666667"]]
    assert (tmp_path / "predictions_loader1_rank1.csv").is_file()


def test_without_a_validation_split_the_message_offers_training_without_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run(["fit", *TINY_FIT, "--trainer.default_root_dir", str(tmp_path / "runs"),
                "--data.init_args.val_fraction", "0"]) == 1
    err = capsys.readouterr().err
    assert "or pass --trainer.limit_val_batches 0 to train without validation" in err
    cli = fit(tmp_path, "--data.init_args.val_fraction", "0", "--trainer.limit_val_batches", "0")
    assert cli.trainer.global_step == 4 and "test/acc" in cli.trainer.callback_metrics


def test_low_resolution_size_must_be_a_multiple_of_the_patch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data.low_res_size 18 is not a multiple of --model.patch_size 4"):
        fit(tmp_path, "--data.init_args.low_res_size", "18")


def test_compiled_model_computes_the_same_and_saves_the_same_keys(image_spec: dict) -> None:
    eager = Classifier("nano", data_spec=dict(image_spec)).eval()
    compiled = Classifier("nano", data_spec=dict(image_spec), compile=True).eval()
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-5)


def test_compile_takes_a_mode_to_torch_compile(
    image_spec: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes = []

    def recording_compile(function, *, mode: str | None = None, **kwargs):
        modes.append(mode)
        return function

    monkeypatch.setattr(torch, "compile", recording_compile)
    for compile in ("reduce-overhead", True, False):
        Classifier("nano", data_spec=dict(image_spec), compile=compile)
    assert modes == ["reduce-overhead", "default"]


def test_a_compiled_model_trains_at_a_second_image_size() -> None:
    """After a first size, the compiled shapes turn symbolic; the positions resampled for the
    lower-resolution phase still train, and as in eager mode."""
    torch.manual_seed(0)
    eager = ImageClassifier(image_size=32, patch_size=4, num_classes=10, encoder=encoder_config("nano"))
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, backend="aot_eager")  # AOT autograd's tracing, as inductor's
    with torch.no_grad():
        run(torch.randn(2, 3, 32, 32))  # validation at full size first, as Lightning's check does
    for size in (24, 16):
        images = torch.randn(2, 3, size, size)
        run(images).square().mean().backward()
        eager(images).square().mean().backward()
    torch.testing.assert_close(compiled.pos_embed.grad, eager.pos_embed.grad)


def test_init_from_timm_safetensors_at_another_image_size(tmp_path: Path) -> None:
    timm_model = VisionTransformer(img_size=16, patch_size=4, num_classes=100, embed_dim=64,
                                   depth=2, num_heads=2, mlp_ratio=2.0)
    path = tmp_path / "timm_vit.safetensors"
    save_file(timm_model.state_dict(), path)
    cli = main(["fit", *TINY_FIT, "--trainer.default_root_dir", str(tmp_path / "runs"),
                "--model.init_from", str(path), "--trainer.limit_train_batches", "0",
                "--trainer.limit_val_batches", "0", "--test_after_fit", "false"])
    net = cli.model.net  # 32x32 images: 8x8 grid resampled from timm's 4x4; 10-class head fresh
    assert net.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(net.blocks[1].mlp.fc2.weight, timm_model.blocks[1].mlp.fc2.weight)
    torch.testing.assert_close(net.cls_token, timm_model.cls_token)


def test_weights_of_another_shape_are_refused_clearly(tmp_path: Path) -> None:
    timm_model = VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=1, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save({"model": timm_model.state_dict()}, path)
    assert "cls_token" in load_weights_file(path)
    with pytest.raises(CheckpointError, match=r"other.pth does not fit this model.*patch_embed.proj.weight"):
        fit(tmp_path, "--model.init_from", str(path))
    deeper = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=3,
                               num_heads=2, mlp_ratio=2.0)  # nano's shape with a third block
    save_file(deeper.state_dict(), tmp_path / "deeper.safetensors")
    message = (r"deeper.safetensors does not fit this model: of its tensors, 12 the model lacks "
               r"\(blocks.2.attn.proj.bias, .* and 9 more\). The weights have depth 3; the model "
               r"has depth 2. Set --model.variant")
    with pytest.raises(CheckpointError, match=message):
        fit(tmp_path, "--model.init_from", str(tmp_path / "deeper.safetensors"))


def test_a_checkpoint_of_another_shape_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cli = fit(tmp_path / "nano")
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    code = run(["test", "--config", str(REPO / "configs" / "sst2_cpu.yaml"),  # a text recipe
                "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path / "text")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert ("error: the checkpoint's image model does not fit the text model this configuration "
            "builds: of its tensors, 3 of another shape (pos_embed (1, 65, 64) against (1, 64, 64), "
            "head.weight (10, 64) against (2, 64), head.bias (10,) against (2,)); 1 missing "
            "(token_embed.weight); 2 the model lacks (patch_embed.proj.bias, "
            "patch_embed.proj.weight). The checkpoint has patch_size 4, positions 65, classes 10; "
            "this configuration positions 64, vocab_size") in err


@pytest.mark.parametrize("content", [b"", b"\x00garbage"])
def test_corrupt_weights_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        load_weights_file(path)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_parses(recipe: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints, then exits
        main(["fit", "--config", str(REPO / "configs" / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_attention_init_option_reaches_every_block(image_spec: dict) -> None:
    torch.manual_seed(0)
    timm_init = Classifier("nano", data_spec=dict(image_spec))
    mimetic = Classifier("nano", data_spec=dict(image_spec), attention_init="mimetic")
    for plain, imitated in zip(timm_init.net.blocks, mimetic.net.blocks):
        dim = plain.attn.proj.in_features
        for block, expected in ((plain, 0.0), (imitated, -0.4)):  # W_proj W_v ~ -0.4 I
            product = (block.attn.proj.weight @ block.attn.qkv.weight[2 * dim:]).detach()
            assert product.diagonal().mean().item() == pytest.approx(expected, abs=0.05)


def test_sincos_positions_make_neighbouring_patches_alike(image_spec: dict) -> None:
    model = Classifier("nano", data_spec=dict(image_spec), position_init="sincos")
    grid = model.net.patch_embed.grid_size
    positions = model.net.pos_embed[0, 1:].detach().unflatten(0, (grid, grid))  # (g, g, D)
    centre = positions[grid // 2, grid // 2]
    similarity = (positions @ centre) / centre.norm() ** 2  # 1 at the centre itself
    assert similarity[grid // 2, grid // 2] == pytest.approx(1.0)
    assert similarity[grid // 2, grid // 2 + 1] > similarity[grid // 2, grid // 2 + 3] > similarity[0, 0]
    assert model.net.pos_embed.requires_grad  # a starting point, still learned


def test_sincos_positions_need_a_width_divisible_by_4(image_spec: dict) -> None:
    with pytest.raises(ConfigError, match="divisible by 4, got --model.embed_dim 66"):
        Classifier("nano", data_spec=dict(image_spec), position_init="sincos", embed_dim=66, num_heads=2)


def test_training_loop_benchmark_times_a_recipes_loop_against_bare_steps(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "trace.json"
    training_loop.main([
        "--batches", "2", "--epochs", "2", "--profile", "2", "--trace", str(trace),
        "--config", "configs/quickstart.yaml", "--model.variant", "nano",
    ])
    out = capsys.readouterr().out
    epochs = table_rows(out, "")[1:]  # the epochs, after the header
    assert [row[0] for row in epochs] == ["0", "1"]  # the profiled epoch is not timed
    for _, steps, loop_ms, bare_ms, ratio in epochs:
        assert steps == "2" and float(loop_ms) > 0 and float(bare_ms) > 0
        assert float(ratio) == pytest.approx(float(loop_ms) / float(bare_ms), abs=0.02)
    assert "loop / bare steps, median of epochs 1-1:" in out
    assert "host time of 2 training steps by operator" in out and "aten::" in out
    assert trace.stat().st_size > 0

    for options, message in [
        (["--batches", "2", "--profile", "3"], "--profile 3: at most --batches (2) steps"),
        (["--trace", "t.json"], "--trace needs --profile N"),
        (["--profile", "1", "--trace", str(tmp_path / "no" / "t.json")], "its folder does not exist"),
    ]:
        with pytest.raises(SystemExit) as refused:  # before anything is built
            training_loop.main([*options, "--config", "configs/quickstart.yaml"])
        assert refused.value.code == 2 and message in capsys.readouterr().err
