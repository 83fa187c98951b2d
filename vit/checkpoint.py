"""Loading weights safely, fitting a state dict onto a model, and self-describing models.

A training checkpoint (``train.py``'s ``.ckpt``) and a deployment bundle (a folder of
``config.json``, ``model.safetensors`` and, for text, ``tokenizer.json``) both carry what
inference needs: architecture, class names, preprocessing and tokenizer. ``load_saved_model``
reads either into a ``SavedModel``; ``save_bundle`` writes the bundle.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read by safetensors,
everything else by ``torch.load(weights_only=True)``, which refuses code-running pickles.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from vit.embed import resample_pos_embed
from vit.model import ImageClassifier, TokenClassifier, build_model, encoder_config
from vit.tokenizer import TextTokenizer

BUNDLE_CONFIG = "config.json"
BUNDLE_WEIGHTS = "model.safetensors"
BUNDLE_TOKENIZER = "tokenizer.json"
BUNDLE_FORMAT = "vit-classifier"
BUNDLE_VERSION = 1
# What each modality's data spec must hold besides "modality" and "class_names".
SPEC_KEYS = {
    "image": ("image_size", "mean", "std"),
    "text": ("vocab_size", "max_length", "pad_id"),
}


class CheckpointError(ValueError):
    """A weights file is missing, corrupt, unsafe, or does not fit the model."""


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a weights file.")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty.")


def torch_load_safely(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure a ``CheckpointError``.

    Only tensors and plain Python data are rebuilt; a pickle that would import anything else
    (and so could run code) is refused before it runs.
    """
    path = Path(path).expanduser()
    _check_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked:
            raise CheckpointError(
                f"{path}: refused to load, the file asks to import {blocked.group(1)}, which "
                f"could run code; only tensors and plain data are loaded. Only use files you "
                f"trust, and prefer .safetensors."
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable as one).") from None
    except Exception as err:  # a foreign or damaged file can fail in any of torch's readers
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason}).") from None


def _read_weights_file(path: Path) -> Any:
    """The contents of a ``.safetensors`` file, or the object a torch file holds, safely."""
    if path.suffix != ".safetensors":
        return torch_load_safely(path)
    _check_file(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable weights file ({err}).") from None


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` or a Lightning ``.ckpt``.

    A Lightning checkpoint's ``state_dict`` is taken and its ``net.`` prefix removed; a
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (timm, torchvision) is unwrapped.
    """
    path = Path(path).expanduser()
    return _state_dict_in(_read_weights_file(path), path)


def _state_dict_in(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict :func:`load_weights_file` finds in what a weights file holds."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors.")
    prefix = "net."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


_SHAPE_FIELDS = {  # what a tensor tells of the network: its name and which of its sizes
    "embed_dim": ("cls_token", -1), "mlp_hidden": ("blocks.0.mlp.fc1.weight", 0),
    "patch_size": ("patch_embed.proj.weight", -1), "positions": ("pos_embed", 1),
    "vocab_size": ("token_embed.weight", 0), "classes": ("head.weight", 0),
}


def shape_fields(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The shape of the network a state dict holds, as far as its tensors show it."""
    fields = {name: state[key].shape[dim]
              for name, (key, dim) in _SHAPE_FIELDS.items() if key in state}
    blocks = [int(key.split(".")[1]) for key in state
              if key.startswith("blocks.") and key.split(".")[1].isdigit()]
    if blocks:
        fields["depth"] = max(blocks) + 1
    return fields


def shape_difference(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> tuple[str, str]:
    """The fields of :func:`shape_fields` in which two state dicts differ (all of them where
    none does), as text for each: ("depth 3", "depth 2")."""
    theirs, ours = shape_fields(state), shape_fields(own)
    names = [n for n in (*_SHAPE_FIELDS, "depth") if theirs.get(n) != ours.get(n)] or list(ours)

    def text(fields: dict[str, int]) -> str:
        return ", ".join(f"{n} {fields[n]}" for n in names if n in fields) or "none of those"

    return text(theirs), text(ours)


def _listed(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def tensor_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str | None:
    """How ``state`` differs from the state dict ``own`` of a model it is to load into: the
    tensors of another shape, missing or left over, counted with a few named; None if it fits."""
    shaped = [f"{k} {tuple(v.shape)} against {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state))
    surplus = sorted(set(state) - set(own))
    problems = [f"{len(shaped)} of another shape ({_listed(shaped)})" if shaped else "",
                f"{len(missing)} missing ({_listed(missing)})" if missing else "",
                f"{len(surplus)} the model lacks ({_listed(surplus)})" if surplus else ""]
    found = "; ".join(problem for problem in problems if problem)
    return f"of its tensors, {found}" if found else None


def fit_state_dict(
    state: dict[str, torch.Tensor], model: TokenClassifier, source: str | Path = "the weights file"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt ``state`` to ``model``: resample image positions, drop a head of another size.

    Returns the adapted state dict and the names of the model's parameters it leaves at
    their initial values (the head, when the number of classes differs). Raises a
    ``CheckpointError`` naming ``source`` when any other tensor is missing, left over (a deeper
    model's blocks) or of another shape.
    """
    state = dict(state)
    own = model.state_dict()
    if isinstance(model, ImageClassifier) and "pos_embed" in state:
        grid = model.patch_embed.grid_size
        if state["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid)
    fresh = []
    for key in ("head.weight", "head.bias"):
        if key in state and state[key].shape != own[key].shape:
            del state[key]
            fresh.append(key)
    kept = {k: v for k, v in own.items() if k not in fresh}
    mismatch = tensor_mismatch(state, kept)
    if mismatch:
        theirs, ours = shape_difference(state, kept)
        vocabulary = " (the vocabulary: --data.vocab_size, or --data.tokenizer_file with the " \
            "tokenizer they were trained with)" if "vocab_size" in theirs else ""
        raise CheckpointError(
            f"{source} does not fit this model: {mismatch}. The weights have {theirs}; the "
            f"model has {ours}. Set --model.variant, --model.embed_dim, --model.depth, "
            f"--model.num_heads, --model.mlp_ratio and --model.patch_size to the weights' "
            f"shape{vocabulary}."
        )
    return state, fresh


def _stored_tokenizer(path: Path, contents: Any) -> tuple[str, Path | None] | None:
    """The tokenizer JSON that text weights read from ``path`` (``contents``) were trained
    with, and the file that holds it (None when it lives inside a checkpoint whose run folder
    lacks tokenizer.json): a training checkpoint carries it, a bundle's ``model.safetensors``
    has it beside it. None when neither does (image weights, or a bare weights file)."""
    if isinstance(contents, dict) and isinstance(contents.get("tokenizer"), str):
        run_file = path.parent.parent / BUNDLE_TOKENIZER  # RUN/checkpoints/x.ckpt
        return contents["tokenizer"], run_file if run_file.is_file() else None
    beside = path.parent / BUNDLE_TOKENIZER
    if path.suffix == ".safetensors" and beside.is_file():
        try:
            return beside.read_text(encoding="utf-8"), beside
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{beside}: not readable as UTF-8 text ({err}).") from None
    return None


def _check_same_vocabulary(path: Path, contents: Any, tokenizer: TextTokenizer) -> None:
    """Refuse text weights whose token ids name other tokens than ``tokenizer``'s do: their
    token embeddings would be read under the wrong ids (a vocabulary of the same size loads
    without complaint)."""
    stored = _stored_tokenizer(path, contents)
    if stored is None:
        return
    tokenizer_json, file = stored
    try:
        theirs = TextTokenizer.from_json(tokenizer_json).vocabulary()
    except ValueError as err:
        raise CheckpointError(f"{path}: the stored tokenizer is unreadable: {err}") from None
    ours = tokenizer.vocabulary()
    if theirs == ours:
        return
    agree = sum(ours.get(token) == index for token, index in theirs.items())
    where = f"--data.tokenizer_file {file}" if file is not None else \
        "--data.tokenizer_file with the tokenizer.json of the run that wrote them"
    raise CheckpointError(
        f"--model.init_from {path}: these weights were trained with another tokenizer ({agree} "
        f"of their {len(theirs)} token ids name the same token in this run's {len(ours)}), so "
        f"their token embeddings would be read under the wrong ids. Train on their tokenizer: "
        f"{where}."
    )


def load_into(
    model: TokenClassifier, path: str | Path, tokenizer: TextTokenizer | None = None
) -> list[str]:
    """Load a weights file into ``model`` (fitting it first); returns the re-initialised keys.

    With ``tokenizer`` (a text model's), weights trained with a tokenizer whose ids name other
    tokens are refused.
    """
    path = Path(path).expanduser()
    contents = _read_weights_file(path)
    if tokenizer is not None:
        _check_same_vocabulary(path, contents, tokenizer)
    state, fresh = fit_state_dict(_state_dict_in(contents, path), model, source=path)
    model.load_state_dict(state, strict=False)
    return fresh


@dataclass
class SavedModel:
    """A trained classifier together with everything needed to feed it and read its output."""

    model: TokenClassifier  # in eval mode, on the CPU
    spec: dict[str, Any]  # the data module's spec: modality, class names, preprocessing
    architecture: dict[str, Any]  # build_model's keyword arguments, every field resolved
    tokenizer: TextTokenizer | None  # the text tokenizer; None for image models

    def config(self) -> dict[str, Any]:
        """The bundle's ``config.json``: architecture, class names and preprocessing."""
        preprocessing = {k: v for k, v in self.spec.items() if k not in ("modality", "class_names")}
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "modality": self.spec["modality"],
            "class_names": list(self.spec["class_names"]),
            "architecture": dict(self.architecture),
            "preprocessing": preprocessing,
        }


def _checked_spec(spec: Any, source: Path) -> dict[str, Any]:
    if not isinstance(spec, dict) or spec.get("modality") not in SPEC_KEYS:
        raise CheckpointError(
            f"{source}: no model description with a known modality (image or text) inside; "
            f"pass a checkpoint written by train.py or a bundle written by vit.export."
        )
    needed = ("class_names", *SPEC_KEYS[spec["modality"]])
    missing = [key for key in needed if key not in spec]
    if missing or not spec["class_names"]:
        raise CheckpointError(
            f"{source}: the model description lacks {', '.join(missing) or 'class names'}; "
            f"retrain with this version of train.py or export the bundle again."
        )
    return spec


def _build(
    spec: dict[str, Any], architecture: dict[str, Any], state: dict[str, torch.Tensor],
    tokenizer_json: str | None, source: Path,
) -> SavedModel:
    tokenizer = None
    if spec["modality"] == "text":
        if tokenizer_json is None:
            raise CheckpointError(
                f"{source}: a text model without its tokenizer; retrain with this version of "
                f"train.py, or export it from the training checkpoint again."
            )
        try:
            tokenizer = TextTokenizer.from_json(tokenizer_json)
        except ValueError as err:
            raise CheckpointError(f"{source}: the stored tokenizer is unreadable: {err}") from None
    try:
        model = build_model(spec, **architecture)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{source}: cannot rebuild the model it describes "
            f"({str(err).splitlines()[0]}); export the bundle again or retrain."
        ) from None
    return SavedModel(model.eval(), spec, architecture, tokenizer)


def _read_lightning_checkpoint(path: Path) -> SavedModel:
    checkpoint = torch_load_safely(path)
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (no hyper_parameters and "
            f"state_dict); pass a .ckpt written by train.py or a bundle written by vit.export."
        )
    spec = _checked_spec(hparams.get("data_spec"), path)
    try:
        encoder = encoder_config(
            hparams.get("variant", "tiny"),
            **{k: hparams.get(k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio")},
        )
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    architecture = {
        "variant": hparams.get("variant", "tiny"), **asdict(encoder),
        "patch_size": hparams.get("patch_size", 4),
        "flip_average": hparams.get("flip_average", False),
    }
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return _build(spec, architecture, state, checkpoint.get("tokenizer"), path)


def _read_bundle(folder: Path) -> SavedModel:
    config_path = folder / BUNDLE_CONFIG
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: a folder without {BUNDLE_CONFIG}; pass a bundle written by vit.export."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: not readable JSON ({err}).") from None
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{config_path}: not a {BUNDLE_FORMAT} bundle config.")
    if config.get("format_version") != BUNDLE_VERSION:
        raise CheckpointError(
            f"{config_path}: bundle format version {config.get('format_version')!r}, this "
            f"version of vit reads {BUNDLE_VERSION}; export the bundle again."
        )
    malformed = [k for k in ("architecture", "preprocessing") if not isinstance(config.get(k), dict)]
    if malformed:
        raise CheckpointError(
            f"{config_path}: {' and '.join(malformed)} missing or not a JSON object; export "
            f"the bundle again."
        )
    spec = _checked_spec(
        {"modality": config.get("modality"), "class_names": config.get("class_names"),
         **config["preprocessing"]},
        config_path,
    )
    weights = folder / BUNDLE_WEIGHTS
    _check_file(weights)
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({err}).") from None
    tokenizer_path = folder / BUNDLE_TOKENIZER
    try:
        tokenizer_json = tokenizer_path.read_text(encoding="utf-8") if tokenizer_path.is_file() \
            else None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{tokenizer_path}: not readable as UTF-8 text ({err}).") from None
    return _build(spec, config["architecture"], state, tokenizer_json, folder)


def load_saved_model(path: str | Path) -> SavedModel:
    """Read a training checkpoint (``.ckpt``) or an exported bundle folder, safely.

    Raises:
        CheckpointError: the path is missing, corrupt, unsafe, or not a model of this project.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_bundle(path)
    if path.name == BUNDLE_CONFIG:
        return _read_bundle(path.parent)
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: bare weights, without class names or preprocessing; pass the bundle "
            f"folder that holds it (written by vit.export) or the training checkpoint."
        )
    return _read_lightning_checkpoint(path)


def save_bundle(saved: SavedModel, out_dir: str | Path) -> list[Path]:
    """Write ``saved`` as a deployment bundle into ``out_dir``; returns the files written."""
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path, weights = out_dir / BUNDLE_CONFIG, out_dir / BUNDLE_WEIGHTS
    state = {k: v.detach().contiguous() for k, v in saved.model.state_dict().items()}
    # Written by Python, not by save_file, whose files are readable by their owner only: a
    # service that runs as another user reads the bundle, as it reads config.json.
    weights.write_bytes(save(state, metadata={"format": BUNDLE_FORMAT}))
    config_path.write_text(json.dumps(saved.config(), indent=2) + "\n", encoding="utf-8")
    written = [config_path, weights]
    if saved.tokenizer is not None:
        saved.tokenizer.save(out_dir / BUNDLE_TOKENIZER)
        written.append(out_dir / BUNDLE_TOKENIZER)
    else:
        (out_dir / BUNDLE_TOKENIZER).unlink(missing_ok=True)  # an earlier text bundle's
    return written
