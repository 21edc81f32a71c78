"""Safe image loading and the pixel conversions every source shares.

`load_image` reads a file or bytes into `(3, size, size)` float pixels in [0, 1]. It
never decodes a file it has not vetted: the byte size is checked before reading, the
pixel count from the header before decoding (a decompression bomb is refused from its
header alone, whatever PIL's global `MAX_IMAGE_PIXELS` says), and only common raster
formats are accepted (no EPS, which would run Ghostscript). Resizing center-crops: the
shorter side is scaled to `size` and the middle square kept, so nothing is distorted and
no padding appears that a model could learn to draw.

Every valid raster is accepted and converted: grayscale, CMYK, palettes, 16-bit (scaled to
8 bits, not clipped), transparency (composited onto white). Decisions: an animated image
(GIF, WebP) gives its first frame; an image smaller than `size` is scaled up like any other.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
"""Formats `load_image` accepts, as PIL names them."""

MAX_PIXELS = 8192 * 8192
"""Default limit on width * height read from an image's header."""

MAX_BYTES = 64 * 2**20
"""Default limit on an image file's size in bytes."""


class BadImage(ValueError):
    """An image that is missing, corrupt, of an unsupported format, or too large."""


def pixels_from_array(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], contiguous."""
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255.0)


def array_from_pixels(pixels: torch.Tensor) -> np.ndarray:
    """float (3, H, W) in [0, 1] -> uint8 (H, W, 3), rounded."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected pixels of shape (3, H, W), got {tuple(pixels.shape)}")
    array = pixels.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(array.transpose(1, 2, 0))


def _read(source: str | os.PathLike | bytes, max_bytes: int) -> tuple[bytes, str]:
    """The raw bytes of `source` and a name for messages; refuses missing and oversized files."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), f"image bytes ({len(source)} B)"
        if len(data) > max_bytes:
            raise BadImage(f"{name} exceed max_bytes={max_bytes}; shrink the image or raise max_bytes")
        return data, name
    path = Path(source)
    if path.is_dir():
        raise BadImage(f"{path} is a folder, not an image file; give the path of an image file")
    if not path.is_file():
        raise BadImage(f"image file {path} does not exist; check the path")
    nbytes = path.stat().st_size
    if nbytes > max_bytes:
        raise BadImage(
            f"image file {path} is {nbytes} bytes, over max_bytes={max_bytes}; "
            "shrink the image or raise max_bytes"
        )
    return path.read_bytes(), f"image file {path}"


def load_image(
    source: str | os.PathLike | bytes,
    size: int,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> torch.Tensor:
    """Load a path or encoded bytes as `(3, size, size)` float32 pixels in [0, 1].

    RGB conversion composites any transparency onto white and applies EXIF orientation;
    the image is center-cropped to a square and resized with Lanczos filtering.
    Raises `BadImage` for a missing file, corrupt or truncated data, a format outside
    `FORMATS`, a header claiming more than `max_pixels` pixels, or more than `max_bytes` bytes.
    """
    data, name = _read(source, max_bytes)
    if not data:
        raise BadImage(f"{name} is empty; re-export or remove it")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's warning; its hard error still applies.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except PILImage.DecompressionBombError as e:  # over twice PIL's own limit: refused while reading the header
        found = re.search(r"Image size \((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "a huge size"
        raise BadImage(f"{name} claims {size} in its header, over max_pixels={max_pixels:,} (a decompression "
                       "bomb?); refusing to decode it") from None
    except PILImage.UnidentifiedImageError:
        raise BadImage(
            f"{name} is not an image in a supported format ({', '.join(FORMATS)}); convert it to PNG or JPEG"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"{name} has a corrupt header ({e}); re-encode or remove it") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(
            f"{name} claims {width}x{height} pixels in its header, over max_pixels={max_pixels}; "
            "downscale it or raise max_pixels"
        )
    if width < 1 or height < 1:
        raise BadImage(f"{name} has an empty size {width}x{height}; remove it")
    try:
        if image.format == "JPEG":
            image.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        image = ImageOps.fit(image, (size, size), PILImage.Resampling.LANCZOS)
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        KeyError,
        PILImage.DecompressionBombError,
    ) as e:
        raise BadImage(f"{name} is corrupt or truncated ({e}); re-encode or remove it") from None
    return pixels_from_array(np.asarray(image, dtype=np.uint8))  # (3, size, size)


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    """RGB, with any transparency composited onto a white background; 16-bit values scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit grayscale: PIL's convert would clip at 255
        wide = np.asarray(image, dtype=np.float64)  # (H, W) in [0, 65535]
        image = PILImage.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = PILImage.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PILImage.alpha_composite(white, rgba).convert("RGB")
