"""Surviving interruptions: atomic checkpoints, a checkpoint on SIGTERM, exact resumes.

- ``AtomicCheckpointIO`` writes each checkpoint to a temporary file in its own folder, syncs it
  to disk and renames it over the old one (``os.replace``, atomic on POSIX): a kill in the middle
  of a save leaves the previous checkpoint whole. Lightning's own writer stages the file in the
  system's temporary folder and moves it, which is a copy when that is another file system.
- ``LastCheckpoint`` writes ``last.ckpt`` at every epoch end (one that ``--trainer.max_steps``
  cuts short included), however often validation runs, and after every validation.
- ``CheckpointOnSIGTERM``: on SIGTERM (what cluster schedulers send before they kill) Lightning
  stops after the current batch; this callback then writes ``last.ckpt`` (or keeps the one an
  epoch end wrote at the same step), and the process exits with status 0.
- ``RandomState`` carries the torch random generators (dropout, stochastic depth) through
  checkpoints; the image data module carries its own position (``vit.data``), so a resumed run
  draws the same batches, augmentations and dropout masks as an uninterrupted one. The text
  data module draws each epoch's order from its seed and the epoch (``vit.text_data``): a text
  run resumed mid-epoch draws that epoch's order again from its start.
- ``find_last_checkpoint`` resolves ``--ckpt_path last`` across the ``version_N`` folders of a
  root directory, skipping files that cannot be read.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vit.checkpoint import CheckpointError, torch_load_safely


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file beside the target, ``fsync``, then ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) or storage_options is not None:  # remote storage: fsspec's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        try:
            with os.fdopen(fd, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` at the end of every epoch, also where validation runs more or less often.

    Where validation does not run once an epoch (``--trainer.val_check_interval`` below 1, as in
    ``configs/cifar10_cpu.yaml``, or ``--trainer.check_val_every_n_epoch`` above 1),
    ``ModelCheckpoint`` saves at validation ends only: a fit that ``--trainer.max_steps`` stopped
    between two validations left ``last.ckpt`` behind the weights it ended with. This one also
    saves at every epoch end, the cut-short last epoch's included, unless it saved at that step
    already. Lightning ends the epoch before ``vit.ema.EMA`` copies its average into the model,
    so the file keeps both, as every other checkpoint does.
    """

    def __init__(self) -> None:
        super().__init__(filename="last", enable_version_counter=False, every_n_epochs=1)

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's, under which checkpoints written before this class hold its state
        own = super().state_key
        return ModelCheckpoint.__qualname__ + own.removeprefix(type(self).__qualname__)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class CheckpointOnSIGTERM(Callback):
    """Write ``last.ckpt`` beside the other checkpoints when SIGTERM stops a fit.

    Where Lightning stops the fit only after an epoch end has written ``last.ckpt`` at this step
    (a SIGTERM during the last batch of the epoch's validation, or while the epoch end saves),
    that file is kept rather than written again: the same weights, and seconds of the grace
    period before the scheduler's kill.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING \
                or checkpoint is None or checkpoint.dirpath is None:
            return
        name = f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        path = Path(checkpoint.dirpath) / name
        if saved_at_this_step(trainer, path):
            rank_zero_info(
                f"SIGTERM: {path} already holds step {trainer.global_step}; "
                "resume with --ckpt_path last."
            )
            return
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last."
        )


def saved_at_this_step(trainer: L.Trainer, path: Path) -> bool:
    """Whether one of the trainer's ``ModelCheckpoint`` callbacks last wrote ``path``, and did so
    at the current global step (the same on every process, so all of them agree)."""
    return any(
        callback._last_global_step_saved == trainer.global_step
        and callback._last_checkpoint_saved
        and Path(callback._last_checkpoint_saved) == path
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint)
    )


class RandomState(Callback):
    """Keep the torch random generators (CPU and CUDA) in checkpoints; restore them on resume."""

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def check_checkpoint(path: str | Path) -> None:
    """Raise a ``CheckpointError`` naming ``path`` unless it is a readable training checkpoint."""
    checkpoint = torch_load_safely(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no state_dict); pass a .ckpt written by train.py."
        )


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest readable ``last*.ckpt`` in any ``checkpoints/`` folder under ``root``.

    Unreadable files (truncated, corrupt) are skipped with a warning that names them; ``None``
    when there is none.
    """
    candidates = sorted(
        Path(root).expanduser().glob("**/checkpoints/last*.ckpt"),
        key=lambda p: p.stat().st_mtime_ns, reverse=True,
    )
    for path in candidates:
        try:
            check_checkpoint(path)
        except CheckpointError as err:
            rank_zero_warn(f"skipping a checkpoint that cannot be resumed from: {err}")
            continue
        return path
    return None
