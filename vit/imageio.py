"""Reading image files into uint8 RGB arrays of one size, with clear errors for bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


class ImageDecodeError(ValueError):
    """An image file could not be read; the message names the file and the reason."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of the image extensions this project reads."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` (bicubic) and cut the centred ``size`` x ``size`` square."""
    if image.size == (size, size):
        return image
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (greyscale, palette, RGBA, CMYK, 16-bit) -> 8-bit RGB; alpha is laid on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0)
        image = Image.fromarray((array * scale).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode one image file into a (size, size, 3) uint8 RGB array.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, or too large
            to decode safely (a decompression bomb).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                rgb = to_rgb(image)
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{path}: is a folder, not an image file") from None
    except UnidentifiedImageError:
        reason = "empty file" if path.stat().st_size == 0 else "not an image PIL can read"
        raise ImageDecodeError(f"{path}: {reason}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"{path}: refused, too many pixels ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{path}: cannot decode ({err})") from None
    return np.asarray(resize_and_center_crop(rgb, size), dtype=np.uint8)


def load_image_or_reason(path: str | Path, size: int) -> np.ndarray | str:
    """``load_image``, or the reason it failed as text (for decoding processes to hand back)."""
    try:
        return load_image(path, size)
    except ImageDecodeError as err:
        return str(err)
