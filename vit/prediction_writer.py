"""``train.py predict``'s output: one CSV row per item of the predicted split.

``predictions.csv`` lands in the predict run's own log folder (a new ``version_N``; the root
folder itself under ``--trainer.logger false``): the item's index in the split (the order of the
files of an image folder, of the usable rows of a text file), the item itself where the data
module names it (``predict_item_names``: an image file's path, a text), its labelled class, the
predicted class and that prediction's probability. Under DDP each process writes the items it
predicted to ``predictions_rank<N>.csv``; with several predict loaders each gets its own file. A
summary line says where a file is and how many predictions matched the labels.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn


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
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # every process must ask
        # One loader: ``predictions`` lists its batches; several: one such list per loader.
        per_loader = [predictions] if len(batch_indices) <= 1 else predictions
        for loader, batches in enumerate(per_loader):
            if not batches:
                continue
            name = "predictions" + (f"_loader{loader}" if len(per_loader) > 1 else "") + (
                f"_rank{trainer.global_rank}" if trainer.world_size > 1 else "")
            indices = [i for batch in batch_indices[loader] for i in batch] if batch_indices else []
            write_predictions(folder / f"{name}.csv", batches, indices, pl_module.class_names,
                              trainer.world_size, predict_item_names(trainer))


def predict_item_names(trainer: L.Trainer) -> list[str] | None:
    """What the data module calls the items its predict loader serves, in the split's order;
    None where it does not say (CIFAR-10's batches hold no file names)."""
    names = getattr(getattr(trainer, "datamodule", None), "predict_item_names", None)
    return names() if callable(names) else None


def write_predictions(
    path: Path,
    batches: Sequence[dict[str, torch.Tensor]],
    indices: list[int],
    class_names: list[str],
    world_size: int,
    item_names: list[str] | None = None,
) -> None:
    """Write one loader's batches of ``probs``/``preds``/``labels`` to ``path``, sorted by the
    items' indices in the split (with each item's name from ``item_names`` where they are
    known), and print how many predictions match their labels."""
    preds = torch.cat([batch["preds"] for batch in batches]).tolist()
    labels = torch.cat([batch["labels"] for batch in batches]).tolist()
    probability = torch.cat(
        [batch["probs"].gather(1, batch["preds"][:, None])[:, 0] for batch in batches]
    ).tolist()
    if len(indices) != len(preds):  # the loader's order was not tracked
        if world_size > 1:
            rank_zero_warn(f"{path.name}: the items' indices in the split are unknown; the rows "
                           f"are numbered within this process only.")
        indices, item_names = list(range(len(preds))), None
    if item_names is not None and max(indices, default=0) >= len(item_names):
        item_names = None
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["index", *(["input"] if item_names else []), "label", "predicted",
                         "probability"])
        for index, label, pred, p in sorted(zip(indices, labels, preds, probability)):
            writer.writerow([index, *([item_names[index]] if item_names else []),
                             class_names[label], class_names[pred], f"{p:.6f}"])
    correct = sum(label == pred for label, pred in zip(labels, preds))
    print(f"wrote {len(preds)} predictions to {path}; {correct} ({correct / len(preds):.1%}) "
          f"match their labels.")
