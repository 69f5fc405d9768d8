"""The one guarded image loader: every decode of an image we did not make goes through here.

Ingest and validate (facts about each file), the training and evaluation input pipelines,
serving and batch scoring all share the same limits: a byte cap, a pixel cap checked from the
header before any pixel is decoded, a format allowlist handed to Pillow (so no other decoder
ever sees the bytes), and regular files only. Whatever goes wrong, an untrusted caller sees the
same message (`UnusableImage`, str() = "not a usable image"); the reason is kept in `.reason`
for our own reports (validation's quarantine list, logs).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

GENERIC_MESSAGE = "not a usable image"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Pillow's own bomb check warns or raises at its global MAX_IMAGE_PIXELS; ours runs first, from the header.
Image.MAX_IMAGE_PIXELS = None


class UnusableImage(ValueError):
    """Not a usable image. str() is the same for every cause; `.reason` says which (for trusted reports)."""

    def __init__(self, reason: str) -> None:
        super().__init__(GENERIC_MESSAGE)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """From params' `validate` section (`from_config`); serving gets them stored with the model."""

    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...] | None  # None: any format Pillow knows (ingest inspects; validate judges the format)

    @classmethod
    def from_config(cls, config: object, any_format: bool = False) -> ImageLimits:
        """From a ValidateConfig (max_image_bytes, max_pixels, allowed_formats)."""
        formats = None if any_format else tuple(f.upper() for f in config.allowed_formats)
        return cls(int(config.max_image_bytes), int(config.max_pixels), formats)


@dataclass(frozen=True)
class ImageFacts:
    format: str
    mode: str
    width: int
    height: int


def read_limited(source: str | Path | bytes | bytearray | memoryview | BinaryIO, max_bytes: int) -> bytes:
    """The bytes of a regular file, a buffer or a stream, refusing more than `max_bytes`.

    A path must name a regular file: devices, FIFOs and sockets (/dev/zero, a named pipe) are refused
    without reading, and a file is opened with O_NOFOLLOW|O_NONBLOCK so a swapped-in link or FIFO is too.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, Path)):
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise UnusableImage(f"cannot open: {exc.strerror or type(exc).__name__}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UnusableImage("not a regular file")
            if info.st_size > max_bytes:
                raise UnusableImage(f"{info.st_size} bytes exceeds the cap of {max_bytes}")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(max_bytes + 1)
        finally:
            os.close(fd)
    else:
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnusableImage(f"more than {max_bytes} bytes")
    if not data:
        raise UnusableImage("empty (0 bytes)")
    return data


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open from bytes with only the allowed decoders, and check the pixel count before decoding."""
    try:
        img = Image.open(io.BytesIO(data), formats=list(limits.formats) if limits.formats else None)
    except UnidentifiedImageError:
        allowed = f" among {', '.join(limits.formats)}" if limits.formats else ""
        raise UnusableImage(f"not an image format Pillow identifies{allowed}") from None
    except Exception as exc:
        raise UnusableImage(f"cannot read the header: {exc or type(exc).__name__}") from None
    if img.width * img.height > limits.max_pixels:
        img.close()
        raise UnusableImage(
            f"decompression-bomb guard: {img.width}x{img.height} exceeds max_pixels={limits.max_pixels}"
        )
    return img


def inspect_image(source: str | Path | bytes | BinaryIO, limits: ImageLimits) -> ImageFacts:
    """Format, mode and size after a full decode (truncated files fail here, not at training time)."""
    data = read_limited(source, limits.max_bytes)
    img = _open(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own warnings (EXIF, palette) are not our verdict
            img.load()
        return ImageFacts(img.format or "", img.mode, img.width, img.height)
    except MemoryError:
        raise
    except Exception as exc:  # corrupt files raise many types (OSError, SyntaxError, struct.error, ...)
        raise UnusableImage(f"cannot decode: {exc or type(exc).__name__}") from None
    finally:
        img.close()


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale scaled to 8 bits: Pillow's convert('RGB') would clip it to white instead."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8), "L")


def decode_rgb(
    source: str | Path | bytes | BinaryIO,
    size: int,
    limits: ImageLimits,
    charge: Callable[[int], None] | None = None,
) -> np.ndarray:
    """A (size, size, 3) uint8 RGB array from an image file, buffer or stream, within `limits`.

    `charge`, given, is called with the image's pixel count from its header before any pixel is decoded
    (a served request's decode budget); whatever it raises propagates."""
    data = read_limited(source, limits.max_bytes)
    img = _open(data, limits)
    if charge is not None:
        try:
            charge(img.width * img.height)  # outside the try below: its error is the caller's, not "unusable"
        except BaseException:
            img.close()
            raise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than needed
            rgb = _to_8bit(img).convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except MemoryError:
        raise
    except UnusableImage:
        raise
    except Exception as exc:
        raise UnusableImage(f"cannot decode: {exc or type(exc).__name__}") from None
    finally:
        img.close()
