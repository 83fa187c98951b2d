"""A watch on the training loss that notes a non-finite value without waiting for the device.

Testing ``torch.isfinite(loss)`` in Python after every step makes the host wait for a GPU to
finish that step's forward before it can queue more work: one stall a step. The watch keeps, on
the loss's device, the first step whose loss was not finite and that loss; the training loop
reads them where it waits for the device anyway (every ``log_every_n_steps``, before writing a
checkpoint, before validating, at the end of fitting), so a run still stops with the step named
and writes no checkpoint after it.
"""

from __future__ import annotations

import torch


class NonFiniteLossWatch:
    """Notes the first non-finite training loss on its device; raises once asked to look."""

    def __init__(self) -> None:
        self._first_step: torch.Tensor | None = None  # -1 while every loss was finite
        self._loss: torch.Tensor | None = None

    def note(self, loss: torch.Tensor, step: int) -> None:
        """Keep ``step`` and ``loss`` if the loss is not finite and none was before (no wait)."""
        loss = loss.detach()
        if self._loss is None or self._loss.device != loss.device or self._loss.dtype != loss.dtype:
            self._first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._loss = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = (self._first_step < 0) & ~torch.isfinite(loss)
        self._first_step = torch.where(first, step, self._first_step)
        self._loss = torch.where(first, loss, self._loss)

    def raise_if_seen(self) -> None:
        """Raise ``FloatingPointError`` naming the step if a noted loss was not finite."""
        if self._first_step is None:
            return
        step = int(self._first_step)
        if step >= 0:
            raise FloatingPointError(
                f"non-finite training loss ({float(self._loss)}) at step {step}: lower "
                f"--model.lr or raise the warmup; the last good checkpoint is kept."
            )
