"""Safe image loading: every image the project reads goes through :func:`load_image`."""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats decoded by Pillow's own code. Formats that hand the file to an outside
# program (EPS and PostScript go through Ghostscript) are never opened. (JPEG covers MPO.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
# Pillow's own threshold for a decompression bomb (about 89 megapixels): an 8000x6000
# photograph passes, a small file declaring 30000x30000 pixels does not.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# The suffix a stored copy gets, chosen from the decoded format, never from a client's name.
SUFFIX_FOR_FORMAT = {
    "JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif",
    "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
}

log = logging.getLogger(__name__)
ImageSource = str | os.PathLike | bytes | BinaryIO | Image.Image


class ImageLoadError(ValueError):
    """A file that is not a usable image; the message names the file and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """A decoded RGB image with the bytes it came from (``None`` for an in-memory image)."""

    image: Image.Image
    data: bytes | None
    format: str
    name: str

    @property
    def suffix(self) -> str:
        return SUFFIX_FOR_FORMAT.get(self.format, ".png")


def scan_images(folder: str | os.PathLike, recursive: bool = True) -> Iterator[str]:
    """Relative paths (``a/b.jpg``) of the image files under ``folder``.

    Hidden names and folders are skipped, and symlinked folders are not followed (as in
    ``os.walk``). Plain string work on ``os.scandir`` entries: listing 100,000 images costs
    a fraction of a second, not one ``Path`` object per file.
    """
    pending = [(os.fspath(folder), "")]
    while pending:
        current, prefix = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        continue
                    if is_dir:
                        if recursive and not entry.is_symlink():
                            pending.append((entry.path, f"{prefix}{name}/"))
                    elif os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                        yield prefix + name
        except OSError as exc:
            log.warning("cannot list %s (%s)", current, exc)


def read_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Read and decode an image, keeping its original bytes.

    Parameters
    ----------
    source : path, bytes, binary file or PIL image
    name : the name used in error messages (defaults to the file name)
    max_pixels : images declaring more pixels than this are refused before decoding

    Raises
    ------
    ImageLoadError
        For an empty, unreadable, truncated, unsupported or oversized file.
    """
    if isinstance(source, Image.Image):
        label = name or "image"
        _check_pixels(source.size, label, max_pixels)
        return LoadedImage(to_rgb(source, label), None, source.format or "PNG", label)
    if isinstance(source, (str, os.PathLike)):
        label = name or Path(source).name
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageLoadError(label, "file not found") from None
        except IsADirectoryError:
            raise ImageLoadError(label, "is a folder, not a file") from None
        except OSError as exc:
            raise ImageLoadError(label, f"cannot be read ({exc.strerror or exc})") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "image"
        data = bytes(source)
    else:
        label = name or Path(getattr(source, "name", "image")).name
        data = source.read()
    image, image_format = _decode(data, label, max_pixels)
    return LoadedImage(image, data, image_format, label)


def load_image(source: ImageSource, *, name: str | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image into an RGB PIL image (see :func:`read_image`)."""
    return read_image(source, name=name, max_pixels=max_pixels).image


def _decode(data: bytes, name: str, max_pixels: int) -> tuple[Image.Image, str]:
    """Decode bytes into an RGB image (first frame, EXIF orientation applied, alpha on white)
    and name its format."""
    if not data:
        raise ImageLoadError(name, "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_pixels(image.size, name, max_pixels)
            image.seek(0)  # the first frame of an animated GIF or WebP
            image.load()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(
            name, "not a recognised image (supported: JPEG, PNG, GIF, WebP, BMP, TIFF)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageLoadError(name, f"the image data is damaged or truncated ({exc})") from None
    return to_rgb(image, name), image.format or "PNG"


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Return an upright 8-bit RGB copy of ``image``."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(image)), "L").convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image.copy() if image.readonly else image


def _to_uint8(values: np.ndarray) -> np.ndarray:
    # 16-bit and 32-bit greyscale: Pillow's convert("L") clips at 255 instead of
    # scaling, which turns most 16-bit photos white.
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    top = values.max(initial=0.0)
    if top <= 1.0 and is_float:
        scale = 255.0
    elif top <= 255:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0 if top <= 65535 else 255.0 / top
    return np.clip(values * scale, 0, 255).round().astype(np.uint8)


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(name, f"has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageLoadError(
            name, f"refused: it declares {width}x{height} = {width * height:,} pixels, "
                  f"more than the limit of {max_pixels:,} (a possible decompression bomb)")
