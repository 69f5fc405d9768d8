"""The one guarded image loader: every decode of an image we did not make goes through here.

Ingest and validate (facts about each file), the training and evaluation input pipelines,
serving and batch scoring all share the same limits: a byte cap, a pixel cap checked from the
header before any pixel is decoded, a format allowlist handed to Pillow (so no other decoder
ever sees the bytes; ingest too), and regular files only. Images inside images (an ICO's or ICNS's
PNG, larger than the outer header says) meet Pillow's own pixel check, set to ours, before they
are decoded, and the decoded size is checked again. Whatever goes wrong, an untrusted caller sees the
same message (`UnusableImage`, str() = "not a usable image"); the reason is kept in `.reason`
for our own reports (validation's quarantine list, logs).

EXIF orientation (tag 0x0112, 1-8) is applied here, so every consumer sees the image upright as a
phone shows it: the same transposes as Pillow's `ImageOps.exif_transpose`, without its copy of an
untagged image or its rewrite of the (untrusted) EXIF/XMP blocks. An orientation that cannot be
read (malformed EXIF, a value outside 1-8) leaves the image as stored and says so in `ImageFacts.note`
(ingest's report counts them); it does not make the image unusable: its pixels are fine, and serving,
which cannot quarantine, must treat it the same way as training did. Facts report the upright size.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

GENERIC_MESSAGE = "not a usable image"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
DEFAULT_MAX_PIXELS = 80_000_000  # validate.max_pixels' default
# Bump when the same bytes decode to other pixels: caches of what decoded images gave (features,
# perceptual hashes) include it. 2: EXIF orientation applied.
DECODE_VERSION = 2
ORIENTATION_TAG = 0x0112
UNREADABLE_ORIENTATION = "EXIF orientation unreadable: used as stored"
# EXIF orientation -> the transpose that turns the stored pixels upright (as ImageOps.exif_transpose).
UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPS_AXES = (5, 6, 7, 8)
# Ours runs first, from the header. Pillow's own check also guards images inside images (an ICO's or
# ICNS's embedded PNG, whose size the outer header does not tell), so it is kept on, at our cap: each
# decode sets it to its own limit, and its warning is an error while we decode.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# Only to name a refused format in reports: these bytes never reach a decoder that is not allowed.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),
    (b"%PDF", "PDF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
)


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
    formats: tuple[str, ...] | None  # None: any format Pillow knows (images we made ourselves only)

    @classmethod
    def from_config(cls, config: object, any_format: bool = False) -> ImageLimits:
        """From a ValidateConfig (max_image_bytes, max_pixels, allowed_formats)."""
        formats = None if any_format else tuple(f.upper() for f in config.allowed_formats)
        return cls(int(config.max_image_bytes), int(config.max_pixels), formats)


@dataclass(frozen=True)
class ImageFacts:
    format: str
    mode: str
    width: int  # upright: after the EXIF orientation (5-8 swap the stored width and height)
    height: int
    orientation: int = 1  # the EXIF orientation applied (1: none, or unreadable)
    note: str = ""  # why the orientation was not applied ('' when it was, or there was none)


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


def sniff_format(data: bytes) -> str | None:
    """The format named by the first bytes (for messages only; no decoder is involved)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return {b"avif": "AVIF", b"avis": "AVIF"}.get(data[8:12], "HEIF")
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open from bytes with only the allowed decoders, and check the pixel count before decoding.

    Some plugins decode while opening (ICO loads its image in `open`): the guard is on here too.
    """
    try:
        with _guarded(limits):
            img = Image.open(io.BytesIO(data), formats=list(limits.formats) if limits.formats else None)
    except UnusableImage:
        raise
    except UnidentifiedImageError:
        raise UnusableImage(_unidentified(data, limits)) from None
    except Exception as exc:
        raise UnusableImage(f"cannot read the header: {exc or type(exc).__name__}") from None
    _check_pixels(img, limits)
    return img


def _unidentified(data: bytes, limits: ImageLimits) -> str:
    found = sniff_format(data)
    if limits.formats and found and found not in limits.formats:
        return f"format {found} is not in validate.allowed_formats ({', '.join(limits.formats)}): not decoded"
    allowed = f" among {', '.join(limits.formats)}" if limits.formats else ""
    return f"not an image format Pillow identifies{allowed}"


def _check_pixels(img: Image.Image, limits: ImageLimits) -> None:
    if img.width * img.height > limits.max_pixels:
        img.close()
        raise UnusableImage(
            f"decompression-bomb guard: {img.width}x{img.height} exceeds max_pixels={limits.max_pixels}"
        )


@contextlib.contextmanager
def _guarded(limits: ImageLimits) -> Iterator[None]:
    """Pillow's own warnings (EXIF, palette) are not our verdict, but its bomb warning is an error, at
    our cap: it is raised for images inside images (an ICO's PNG) before they are decoded."""
    # Pillow reads its cap from a module global: ours while we decode, the previous one again afterwards, so
    # a small cap (serving's) does not stay behind for the process's other images (its own report pictures).
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise UnusableImage(f"decompression-bomb guard: {exc} (max_pixels={limits.max_pixels})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def inspect_image(source: str | Path | bytes | BinaryIO, limits: ImageLimits) -> ImageFacts:
    """Format, mode and size after a full decode (truncated files fail here, not at training time)."""
    data = read_limited(source, limits.max_bytes)
    img = _open(data, limits)
    try:
        with _guarded(limits):
            img.load()
        _check_pixels(img, limits)  # loading can change the size (ICO, ICNS): the decoded one counts
        orientation, note = exif_orientation(img)
        width, height = (img.height, img.width) if orientation in SWAPS_AXES else (img.width, img.height)
        return ImageFacts(img.format or "", img.mode, width, height, orientation, note)
    except (MemoryError, UnusableImage):
        raise
    except Exception as exc:  # corrupt files raise many types (OSError, SyntaxError, struct.error, ...)
        raise UnusableImage(f"cannot decode: {exc or type(exc).__name__}") from None
    finally:
        img.close()


def exif_orientation(img: Image.Image) -> tuple[int, str]:
    """The EXIF orientation of a loaded image (1 when it has none) and '' , or (1, a note) when unreadable.

    The EXIF block is untrusted: Pillow parses at most one IFD of a block the byte cap already bounds
    (no loop can run away), and any error it raises means "unreadable", not "unusable". Read after
    `load()`: a PNG's eXIf chunk may follow its pixels.
    """
    try:
        value = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF raises many types (SyntaxError, struct.error, ValueError, ...)
        return 1, UNREADABLE_ORIENTATION
    if type(value) is int and 1 <= value <= 8:
        return value, ""
    return 1, UNREADABLE_ORIENTATION


def upright(img: Image.Image, orientation: int) -> Image.Image:
    """`img` transposed as EXIF `orientation` says (the same image when 1)."""
    method = UPRIGHT_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


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
    (a served request's decode budget); whatever it raises propagates. The array is upright (EXIF
    orientation applied before the resize, exactly as `ImageOps.exif_transpose` would: turning the small
    square after it would be cheaper, but Pillow's two-pass resize then rounds a 90-degree turn differently,
    enough to move a flat image's perceptual hash by 18 of 128 bits)."""

    def square(img: Image.Image) -> np.ndarray:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)

    return _decode(source, limits, "RGB", size, square, charge)


def decode_gray(source: str | Path | bytes | BinaryIO, side: int, limits: ImageLimits) -> np.ndarray:
    """An (h, w) uint8 grayscale array, upright, scaled (up or down) so its longest side is `side`, aspect kept.

    For keypoint matching (components/quality/geometric_verify.py): one size for every image, so a
    transform's scale between two images says how much of one the other shows."""

    def fitted(img: Image.Image) -> np.ndarray:
        gray = img.convert("L")
        scale = side / max(gray.size)
        target = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        if gray.size != target:
            gray = gray.resize(target, Image.Resampling.BILINEAR)
        return np.asarray(gray, dtype=np.uint8)

    return _decode(source, limits, "L", side, fitted)


def _decode(
    source: str | Path | bytes | BinaryIO,
    limits: ImageLimits,
    mode: str,
    size: int,
    finish: Callable[[Image.Image], np.ndarray],
    charge: Callable[[int], None] | None = None,
) -> np.ndarray:
    """`finish` of the upright, 8-bit image, decoded within `limits` (JPEG: at reduced scale when much
    larger than `size`); `charge` as in `decode_rgb`."""
    data = read_limited(source, limits.max_bytes)
    img = _open(data, limits)
    if charge is not None:
        try:
            charge(img.width * img.height)  # outside the try below: its error is the caller's, not "unusable"
        except BaseException:
            img.close()
            raise
    try:
        with _guarded(limits):
            img.draft(mode, (size, size))  # JPEG: decode at reduced scale when much larger than needed
            img.load()
            _check_pixels(img, limits)  # loading can change the size (ICO, ICNS)
            orientation, _ = exif_orientation(img)
            return finish(upright(_to_8bit(img), orientation))
    except MemoryError:
        raise
    except UnusableImage:
        raise
    except Exception as exc:
        raise UnusableImage(f"cannot decode: {exc or type(exc).__name__}") from None
    finally:
        img.close()
