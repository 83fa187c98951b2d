"""The LightningCLI that ``train.py`` runs: fit, validate, test and predict from YAML recipes."""

from __future__ import annotations

import importlib.util
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from vit.lit import Classifier


def default_loggers(save_dir: str) -> list[Logger]:
    """CSV logs always, TensorBoard logs beside them when tensorboard is installed."""
    loggers: list[Logger] = [CSVLogger(save_dir, name="")]
    if importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(save_dir, name="", version=loggers[0].version))
    return loggers


class TrainCLI(LightningCLI):
    """LightningCLI with the data module's ``spec`` linked into the model, default loggers
    under ``trainer.default_root_dir``, best/last checkpoints, and a test after ``fit``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            Classifier,
            L.LightningDataModule,
            subclass_mode_data=True,
            trainer_defaults={
                "default_root_dir": "runs",
                "callbacks": [
                    ModelCheckpoint(
                        monitor="val/acc", mode="max", save_last=True,
                        filename="epoch{epoch:03d}-val_acc{val/acc:.4f}",
                        auto_insert_metric_name=False,
                    ),
                    LearningRateMonitor(logging_interval="step"),
                ],
            },
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.spec", "model.data_spec", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=True,
            help="After fit, test the best checkpoint on the test split.",
        )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(trainer_config.get("default_root_dir") or "runs")
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit") and self.trainer.state.status == "finished" \
                and self.datamodule.test_dataloader is not None:
            ckpt = "best" if self.trainer.checkpoint_callback.best_model_path else None
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt)


def main(args: list[str] | None = None) -> TrainCLI:
    """Run the command line (``args`` instead of ``sys.argv`` when given)."""
    return TrainCLI(args=args)
