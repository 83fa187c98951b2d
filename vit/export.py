"""Export a trained model as a deployment bundle, optionally with an ONNX graph.

    python -m vit.export runs/quickstart/version_0/checkpoints/last.ckpt bundles/quickstart --onnx

The bundle folder holds ``model.safetensors``, ``config.json`` (architecture, class names,
preprocessing) and, for a text model, ``tokenizer.json``; ``vit.classify`` and
``Predictor.load`` read it as they read the checkpoint. ``model.onnx`` (with ``--onnx``,
which needs ``pip install 'vit[onnx]'``) maps what the model's ``forward`` takes to logits
(B, num_classes), with a dynamic batch axis: ``images``, float (B, 3, S, S) normalised with
the config's mean and std; or ``input_ids``, int64 (B, T), [CLS] first, padded with pad_id,
T up to max_length.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from vit.checkpoint import BUNDLE_CONFIG, CheckpointError, SavedModel, load_saved_model, save_bundle

ONNX_FILE = "model.onnx"


def onnx_example(saved: SavedModel) -> tuple[str, torch.Tensor, dict[int, torch.export.Dim]]:
    """The ONNX input's name, an example batch of two, and its dynamic axes."""
    spec = saved.spec
    if spec["modality"] == "image":
        size = spec["image_size"]
        return "images", torch.zeros(2, 3, size, size), {0: torch.export.Dim("batch")}
    length = spec["max_length"]
    ids = torch.full((2, length), spec["pad_id"], dtype=torch.int64)  # the values do not matter
    return "input_ids", ids, {
        0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", min=2, max=length),
    }


def export_onnx(saved: SavedModel, path: str | Path) -> Path:
    """Write ``saved.model`` as one self-contained ONNX file with a dynamic batch axis."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"--onnx needs {' and '.join(missing)}: pip install 'vit[onnx]' "
            f"(or pip install onnx onnxscript onnxruntime)."
        )
    path = Path(path)
    name, example, axes = onnx_example(saved)
    torch.onnx.export(
        saved.model.cpu().eval(), (example,), path, input_names=[name], output_names=["logits"],
        dynamic_shapes=(axes,), external_data=False, verbose=False,
    )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script (``argv`` instead of ``sys.argv[1:]`` when given); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="vit-export",
        description="Write a deployment bundle (model.safetensors, config.json, tokenizer.json "
                    "for text) from a training checkpoint or another bundle.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a bundle folder")
    parser.add_argument("out_dir", help="the bundle folder to write (created when missing)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (needs pip install 'vit[onnx]')")
    args = parser.parse_args(argv)
    try:
        saved = load_saved_model(args.checkpoint)
        source = Path(args.checkpoint).expanduser()
        read_from = source.parent if source.name == BUNDLE_CONFIG else source
        if Path(args.out_dir).expanduser().resolve() == read_from.resolve():
            raise ValueError(f"{args.out_dir}: the bundle to write is the one being read; "
                             f"choose another OUT_DIR.")
        onnx_path = Path(args.out_dir).expanduser() / ONNX_FILE
        stale_onnx = onnx_path.exists()
        onnx_path.unlink(missing_ok=True)  # an earlier export's graph, of other weights
        written = save_bundle(saved, args.out_dir)
        if args.onnx:
            written.append(export_onnx(saved, onnx_path))
        elif stale_onnx:
            print(f"removed {onnx_path}, an earlier export's graph; --onnx writes this model's",
                  file=sys.stderr)
    except (CheckpointError, ValueError, OSError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
