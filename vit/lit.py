"""The Lightning system around a plain token classifier: loss, metrics, optimiser, schedule."""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from vit.checkpoint import CheckpointError, load_into, shape_difference, tensor_mismatch
from vit.errors import ConfigError, divisors_text
from vit.loss_watch import NonFiniteLossWatch
from vit.model import build_model, encoder_config
from vit.optimizers import MuonWithAdamW, is_encoder_matrix, takes_weight_decay
from vit.progress import find_timer, run_progress
from vit.tokenizer import TextTokenizer


def fuses_adamw(trainer: L.Trainer, device: torch.device) -> bool:
    """Whether AdamW takes torch's fused update: one kernel for every parameter, on a GPU and on
    a CPU, where the default updates one parameter at a time and a step of the CPU recipe's model
    at batch 32 takes about 5 % longer (``python -m benchmarks.optimizer_step``).

    Not where the trainer clips gradients in mixed precision: Lightning refuses to clip for an
    optimiser that unscales its own gradients, as the fused AdamW does.
    """
    mixed_precision = str(trainer.precision).endswith("-mixed")  # "16-mixed", "bf16-mixed"
    return device.type in ("cpu", "cuda") and not (trainer.gradient_clip_val and mixed_precision)


def check_model_options(
    data_spec: dict[str, Any], variant: str, patch_size: int, flip_average: bool = False,
    position_init: str = "trunc_normal", **shape: int | float | None,
) -> None:
    """Raise a ``ConfigError`` naming the option when ``--model`` options cannot fit the data."""
    try:
        encoder = encoder_config(variant, **shape)
    except ValueError as err:
        raise ConfigError(f"--model.variant: {err}") from None
    sizes = {"embed_dim": encoder.embed_dim, "depth": encoder.depth,
             "num_heads": encoder.num_heads, "patch_size": patch_size}
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"--model.{name} must be at least 1, got {value}.")
    if encoder.mlp_ratio <= 0:
        raise ConfigError(f"--model.mlp_ratio must be above 0, got {encoder.mlp_ratio}.")
    if encoder.embed_dim % encoder.num_heads:
        raise ConfigError(
            f"--model.num_heads {encoder.num_heads} does not divide the token width "
            f"--model.embed_dim {encoder.embed_dim} (variant {variant!r}): choose num_heads among "
            f"{divisors_text(encoder.embed_dim)}, or another --model.embed_dim."
        )
    if flip_average and data_spec.get("modality") != "image":
        raise ConfigError(
            "--model.flip_average mirrors images: turn it off for "
            f"{data_spec.get('modality')} data."
        )
    if position_init == "sincos" and data_spec.get("modality") != "image":
        raise ConfigError(
            "--model.position_init sincos lays positions on a 2-D patch grid: use trunc_normal "
            f"for {data_spec.get('modality')} data."
        )
    if position_init == "sincos" and encoder.embed_dim % 4:
        raise ConfigError(
            f"--model.position_init sincos needs a token width divisible by 4, got --model.embed_dim "
            f"{encoder.embed_dim}: use trunc_normal or another width."
        )
    size = data_spec.get("image_size")
    if data_spec.get("modality") == "image" and size % patch_size:
        raise ConfigError(
            f"--model.patch_size {patch_size} does not divide --data.image_size {size}: choose a "
            f"patch size among {divisors_text(size)}, or another --data.image_size."
        )


_SHARE = (lambda value: 0 <= value < 1, "in [0, 1)")
_TRAINING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda value: value > 0, "above 0"),
    "weight_decay": (lambda value: value >= 0, "at least 0"),
    "min_lr_ratio": (lambda value: 0 <= value <= 1, "in [0, 1]"),
    "warmup_fraction": _SHARE, "label_smoothing": _SHARE, "drop_rate": _SHARE,
    "attn_drop_rate": _SHARE, "drop_path_rate": _SHARE,
}
"""Each ``--model`` training option's test and the range it states."""


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
"""``torch.compile``'s modes, which ``--model.compile`` also takes."""


def check_training_options(**options: float) -> None:
    """Raise a ``ConfigError`` naming the ``--model`` option whose value is out of its range."""
    for name, value in options.items():
        inside, expected = _TRAINING_RANGES[name]
        if not inside(value):
            raise ConfigError(f"--model.{name} must be {expected}, got {value}.")


class Classifier(L.LightningModule):
    """Trains any ``TokenClassifier``: cross-entropy, AdamW, warmup then cosine decay.

    Args:
        variant: Named encoder size (``vit.model.VARIANTS``).
        embed_dim: Overrides the variant's token width.
        depth: Overrides the variant's number of blocks.
        num_heads: Overrides the variant's attention heads.
        mlp_ratio: Overrides the variant's MLP width ratio.
        patch_size: Side of the square image patches (image data only).
        drop_rate: Dropout on embeddings and inside blocks.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic-depth rate of the last block.
        lr: Peak learning rate, reached at the end of warmup.
        weight_decay: AdamW decay, applied to weight matrices only (not to norms, biases,
            positional embeddings or the CLS token).
        betas: AdamW's moment coefficients.
        optimizer: ``"adamw"`` for every parameter, or ``"muon"``: Muon for the weight
            matrices inside the encoder blocks and AdamW for the rest (``MuonWithAdamW``),
            with the same learning rate, weight decay and schedule.
        warmup_fraction: Share of the run spent warming up linearly from 0. The run's length
            is its optimiser steps, or its ``--trainer.max_time`` when that ends it first.
        min_lr_ratio: Learning rate at the end of the cosine, as a share of ``lr``.
        label_smoothing: Label smoothing of the cross-entropy.
        flip_average: Evaluate (validate, test, predict, classify) on the mean logits of each
            image and its mirror image; image data only.
        attention_init: ``"timm"`` (truncated normal, std 0.02) or ``"mimetic"``: every
            attention layer starts as trained ViTs' attention looks (``Attention.mimetic_init_``),
            which speeds up learning from scratch on small data.
        position_init: ``"trunc_normal"`` (std 0.02) or ``"sincos"``: the patch positions start
            as 2-D sine-cosine embeddings (still learned); image data only.
        compile: Compile the network with ``torch.compile`` before fitting (the first steps
            of each input shape are slow while it compiles; state-dict keys stay unchanged):
            ``true`` in torch's default mode, or the name of a mode (``COMPILE_MODES``):
            ``"reduce-overhead"`` replays each step as a CUDA graph on a GPU (one launch in
            place of hundreds, for steps bound by kernel launches), ``"max-autotune"`` also
            times alternative kernels while compiling.
        init_from: A weights file (timm ViT ``.safetensors``/``.pth`` or a checkpoint of
            this project) to start fitting from; positions are resampled to this image size
            and a head of another class count is re-initialised.
        data_spec: What the model needs to know of its data; linked from ``data.spec``.
    """

    def __init__(
        self,
        variant: str = "tiny",
        *,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        patch_size: int = 4,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: Literal["adamw", "muon"] = "adamw",
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        flip_average: bool = False,
        attention_init: Literal["timm", "mimetic"] = "timm",
        position_init: Literal["trunc_normal", "sincos"] = "trunc_normal",
        compile: bool | CompileMode = False,
        init_from: str | None = None,
        data_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if data_spec is None:
            raise ValueError("Classifier needs data_spec: pass a data module's .spec.")
        # The tokenizer travels in the checkpoint and as tokenizer.json, not in hparams.yaml.
        # Taken out in place: under the CLI, save_hyperparameters reads the linked dict itself,
        # whose tokenizer JSON the CLI may already have parsed into a dict.
        tokenizer = data_spec.pop("tokenizer", None)
        self.tokenizer_json: str | None = \
            json.dumps(tokenizer, ensure_ascii=False) if isinstance(tokenizer, dict) else tokenizer
        self.save_hyperparameters()
        check_model_options(
            data_spec, variant, patch_size, flip_average, position_init,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        check_training_options(
            lr=lr, weight_decay=weight_decay, warmup_fraction=warmup_fraction,
            min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
        )
        self.net = build_model(
            data_spec, variant=variant, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, patch_size=patch_size, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            flip_average=flip_average,
        )
        if attention_init == "mimetic":
            for block in self.net.blocks:
                block.attn.mimetic_init_()
        if position_init == "sincos":
            self.net.sincos_positions_()
        if compile:  # in place: no ``_orig_mod.`` prefix in the saved keys
            self.net.compile(mode="default" if compile is True else compile)
        # Without torchmetrics' input checks, which read a GPU's result (``torch.unique`` of the
        # predictions and of the targets) and so made the host wait twice a step; the loss has
        # already checked the labels.
        accuracy = functools.partial(
            MulticlassAccuracy, self.net.num_classes, average="micro", validate_args=False
        )
        self.train_acc, self.val_acc, self.test_acc = accuracy(), accuracy(), accuracy()
        self._initialised_from_file = False
        self._fit_started = time.monotonic()
        self._loss_watch = NonFiniteLossWatch()

    @property
    def class_names(self) -> list[str]:
        return self.hparams.data_spec["class_names"]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def on_fit_start(self) -> None:
        self._fit_started = time.monotonic()
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.tokenizer_json is not None and self.trainer.is_global_zero and log_dir:
            path = Path(log_dir) / "tokenizer.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.tokenizer_json, encoding="utf-8")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step % self.trainer.log_every_n_steps == 0:  # as often as the loggers read
            self._loss_watch.raise_if_seen()

    def on_validation_start(self) -> None:
        self._loss_watch.raise_if_seen()

    def on_train_end(self) -> None:
        self._loss_watch.raise_if_seen()

    # Each accuracy is logged once, when its epoch or validation ends: logged in every step,
    # Lightning's log moved the metric to its device again each time (0.35 ms a step on a
    # 2-core CPU, benchmarks/RESULTS.md).
    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train", self.train_acc)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test", self.test_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val", self.val_acc)
        # Accuracy against wall time: each validation row of the logs carries the minutes
        # since this process began fitting.
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.log("time/fit_minutes", (time.monotonic() - self._fit_started) / 60)

    def _log_accuracy(self, stage: str, metric: MulticlassAccuracy) -> None:
        """Log ``metric`` over the batches since its last log; nothing where there were none (the
        end of an epoch whose batches all ran before the checkpoint a fit resumed from)."""
        if metric.update_count:
            self.log(f"{stage}/acc", metric, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._loss_watch.raise_if_seen()  # never a checkpoint of weights past a non-finite loss
        if self.tokenizer_json is not None:
            checkpoint["tokenizer"] = self.tokenizer_json

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_fits(checkpoint)
        self.tokenizer_json = checkpoint.get("tokenizer", self.tokenizer_json)
        trained_with = checkpoint.get("hyper_parameters", {}).get("optimizer", "adamw")
        if checkpoint.get("optimizer_states") and trained_with != self.hparams.optimizer:
            raise ConfigError(
                f"the checkpoint was trained with --model.optimizer {trained_with}, this run asks "
                f"for {self.hparams.optimizer}: resume with --model.optimizer {trained_with}, or "
                "start a new run from its weights with --model.init_from."
            )

    def _check_fits(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, before Lightning loads it, a checkpoint whose network has other tensors."""
        saved = {key.removeprefix("net."): value for key, value in
                 checkpoint.get("state_dict", {}).items() if key.startswith("net.")}
        own = self.net.state_dict()
        mismatch = tensor_mismatch(saved, own)
        if mismatch is None:
            return
        saved_modality = checkpoint.get("hyper_parameters", {}).get("data_spec", {}).get("modality")
        theirs, ours = shape_difference(saved, own)
        raise CheckpointError(
            f"the checkpoint's {saved_modality or 'unknown'} model does not fit the "
            f"{self.hparams.data_spec['modality']} model this configuration builds: {mismatch}. "
            f"The checkpoint has {theirs}; this configuration {ours}. Use the configuration and "
            f"data it was trained with (config.yaml in its run folder), or start a new run from "
            f"its weights with --model.init_from."
        )

    def setup(self, stage: str) -> None:
        low_res_size = getattr(self.trainer.datamodule, "low_res_size", 0)
        patch_size = self.hparams.patch_size
        if low_res_size and low_res_size % patch_size:
            raise ConfigError(
                f"--data.low_res_size {low_res_size} is not a multiple of --model.patch_size "
                f"{patch_size}: choose a multiple such as {max(1, low_res_size // patch_size) * patch_size}."
            )
        # Runs before a resumed checkpoint is restored, so init_from never overwrites it.
        if stage == "fit" and self.hparams.init_from and not self._initialised_from_file:
            tokenizer = None if self.tokenizer_json is None else \
                TextTokenizer.from_json(self.tokenizer_json)
            fresh = load_into(self.net, self.hparams.init_from, tokenizer)
            self._initialised_from_file = True
            note = f", re-initialised {', '.join(fresh)}" if fresh else ""
            print(f"initialised from {self.hparams.init_from}{note}")

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy):
        inputs, labels = batch
        logits = self.net(inputs)
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        if stage == "train":
            self._loss_watch.note(loss, self.global_step)
        # mixup/CutMix targets are label mixtures: accuracy counts the larger share. Only
        # update: the epoch's accuracy is logged, never a batch's, which ``metric(...)`` computes.
        metric.update(logits.argmax(dim=-1), labels.argmax(dim=-1) if labels.ndim == 2 else labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=len(labels), sync_dist=not on_step)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        inputs, labels = batch
        probs = self.net(inputs).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1), "labels": labels}

    def configure_optimizers(self) -> dict[str, Any]:
        use_muon = self.hparams.optimizer == "muon"
        matrices, decay, keep = [], [], []
        for name, param in self.net.named_parameters():
            if not param.requires_grad:
                continue
            if not takes_weight_decay(name, param):
                keep.append(param)
            elif use_muon and is_encoder_matrix(name, param):
                matrices.append(param)
            else:
                decay.append(param)
        wd = self.hparams.weight_decay
        adamw_groups = [{"params": decay, "weight_decay": wd}, {"params": keep, "weight_decay": 0.0}]
        fused = fuses_adamw(self.trainer, self.device)
        if use_muon:
            optimizer = MuonWithAdamW(
                [{"params": matrices, "weight_decay": wd}], adamw_groups,
                lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=fused,
            )
        else:
            optimizer = torch.optim.AdamW(
                adamw_groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=fused
            )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        timer = find_timer(self.trainer)
        warmup, floor = self.hparams.warmup_fraction, self.hparams.min_lr_ratio

        def lr_factor(step: int) -> float:
            progress = run_progress(step, total, timer)
            if warmup > 0 and progress < warmup:
                return max(progress, 1 / total) / warmup
            progress = min(1.0, (progress - warmup) / (1 - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
