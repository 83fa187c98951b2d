"""Loading weights safely, and fitting a state dict from elsewhere onto a model.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read by safetensors,
everything else by ``torch.load(weights_only=True)``, which refuses code-running pickles.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vit.embed import resample_pos_embed
from vit.model import ImageClassifier, TokenClassifier


class CheckpointError(ValueError):
    """A weights file is missing, corrupt, unsafe, or does not fit the model."""


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``/``.pt``/``.bin`` or a Lightning ``.ckpt``.

    A Lightning checkpoint's ``state_dict`` is taken and its ``net.`` prefix removed; a
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (timm, torchvision) is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty.")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load, the file holds objects other than tensors and plain "
            f"data ({str(err).splitlines()[0]}). Only load files you trust, and prefer .safetensors."
        ) from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable weights file ({err}).") from None
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


def fit_state_dict(
    state: dict[str, torch.Tensor], model: TokenClassifier
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt ``state`` to ``model``: resample image positions, drop a head of another size.

    Returns the adapted state dict and the names of the model's parameters it leaves at
    their initial values (the head, when the number of classes differs).
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
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state) - set(fresh))
    if mismatched or missing:
        details = "; ".join(mismatched + ([f"missing: {', '.join(missing[:8])}"] if missing else []))
        raise CheckpointError(
            f"the weights do not fit this model ({details}). Choose the variant, patch size "
            f"and embed_dim the weights were trained with."
        )
    return {k: v for k, v in state.items() if k in own}, fresh


def load_into(model: TokenClassifier, path: str | Path) -> list[str]:
    """Load a weights file into ``model`` (fitting it first); returns the re-initialised keys."""
    state, fresh = fit_state_dict(load_weights_file(path), model)
    model.load_state_dict(state, strict=False)
    return fresh
