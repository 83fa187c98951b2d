"""An exponential moving average of the weights, validated, tested and saved in their place.

Lightning's ``EMAWeightAveraging`` keeps the average, swaps it in for validation and writes
it as the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``). Its
``on_load_checkpoint`` restores the raw weights whenever the average already exists, which
is also the case when train.py tests the best checkpoint right after fitting, in the same
process: the test would score the raw weights, not the average it was validated on.
``EMA`` restores them only when resuming a fit. And a checkpoint written while the average is
swapped in for validation (a SIGTERM between validation batches stops the fit there) would
store the two the wrong way round: ``EMA`` writes each under its own key.

    python train.py fit --config configs/cifar10_cpu.yaml --trainer.callbacks+=vit.ema.EMA
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from vit.errors import ConfigError


class EMA(EMAWeightAveraging):
    """Exponential moving average of the weights: ``avg = decay * avg + (1 - decay) * w``.

    Args:
        decay: Weight of the old average at each update; ``1 / (1 - decay)`` steps is
            about the span it averages over.
        update_every_n_steps: Optimiser steps between updates.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(
                f"--trainer.callbacks.decay {decay}: the EMA decay must lie between 0 and 1 "
                f"(0.999 averages over about the last 1,000 steps)."
            )
        if update_every_n_steps < 1:
            raise ConfigError(
                f"--trainer.callbacks.update_every_n_steps {update_every_n_steps}: the average "
                f"must be updated every 1 or more optimiser steps (1 updates it at every step)."
            )
        super().__init__(decay=decay, update_every_n_steps=update_every_n_steps)
        self._average_swapped_in = False

    def on_validation_epoch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        self._average_swapped_in = self._average_model is not None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_end(trainer, pl_module)
        self._average_swapped_in = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_swapped_in:  # the model holds the average, the average model the raw
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"], checkpoint["state_dict"]
            )

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Outside fit the model keeps the checkpoint's state_dict: the averaged weights.
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
