"""``train.py predict``'s output: one CSV row per item of the predicted split.

``predictions.csv`` lands in the run's log folder: the item's index in the split (the order of
the files of an image folder, of the rows of a text file), its labelled class, the predicted
class and that prediction's probability. Under DDP each process writes the items it predicted to
``predictions_rank<N>.csv``. A summary line says where the file is and how many predictions
matched the labels.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Write ``Classifier.predict_step``'s outputs as CSV when prediction ends."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        # One loader: ``predictions`` lists its batches, ``batch_indices`` holds them per loader.
        if not predictions:
            return
        preds = torch.cat([batch["preds"] for batch in predictions]).tolist()
        labels = torch.cat([batch["labels"] for batch in predictions]).tolist()
        probability = torch.cat(
            [batch["probs"].gather(1, batch["preds"][:, None])[:, 0] for batch in predictions]
        ).tolist()
        indices = [i for batch in (batch_indices[0] if batch_indices else []) for i in batch]
        if len(indices) != len(preds):  # the loader's indices were not tracked
            indices = list(range(len(preds)))
        names = pl_module.class_names
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ("predictions.csv" if trainer.world_size == 1
                         else f"predictions_rank{trainer.global_rank}.csv")
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["index", "label", "predicted", "probability"])
            for index, label, pred, p in sorted(zip(indices, labels, preds, probability)):
                writer.writerow([index, names[label], names[pred], f"{p:.4f}"])
        correct = sum(label == pred for label, pred in zip(labels, preds))
        print(f"wrote {len(preds)} predictions to {path}; {correct} ({correct / len(preds):.1%}) "
              f"match their labels.")
