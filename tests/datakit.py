"""Tiny inputs for the ingest/validate tests: source trees, defective images, archives, a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import shutil
import stat
import struct
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from components.core.config import Params
from components.core.stage_config import IngestConfig, NearDuplicatesConfig, ValidateConfig
from tests.conftest import COLORS, write_image


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file (and a marker for every folder) under root, by relative path."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return digest


def make_classes(root: Path, classes: dict[str, int], start_seed: int = 0) -> Path:
    """root/<class>/<class>_<i>.jpg for each class and count: distinct, valid 48x40 JPEGs."""
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            write_image(
                root / name / f"{name}_{i:03d}.jpg", color=COLORS[c % len(COLORS)], seed=start_seed + c * 1000 + i
            )
    return root


def ingest_config(source: Path | str, **overrides) -> IngestConfig:
    return IngestConfig(**{"source": str(source), "workers": 1, **overrides})


def ingest_params(source: Path | str, validate: ValidateConfig | None = None, **overrides) -> Params:
    """run_ingest's settings: ingest_config(source, **overrides), and validate's image limits (default: its own)."""
    return Params(ingest=ingest_config(source, **overrides), validate=validate or ValidateConfig())


def validate_config(**overrides) -> ValidateConfig:
    """Tiny-set settings; the backbone-embedding near-duplicate pass is off (its own tests turn it on)."""
    near = NearDuplicatesConfig(embeddings=False)
    return ValidateConfig(**{"min_images_per_class": 5, "near_duplicates": near, **overrides})


# --- defective files ----------------------------------------------------------------------------


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 64), seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    return write_image(path, seed=11, mode="CMYK")


def write_16bit_png(path: Path) -> Path:
    pixels = np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "PNG")
    assert Image.open(path).mode.startswith("I;16")
    return path


def write_alpha_png(path: Path) -> Path:
    return write_image(path, seed=13, fmt="PNG", mode="RGBA")


def write_huge_png(path: Path, side: int) -> Path:
    """A flat (so tiny on disk) image of side x side pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (side, side), 128).save(path, "PNG")
    return path


def _flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "PNG")
    return buffer.getvalue()


def write_ico_with_a_larger_png(path: Path, side: int) -> Path:
    """An ICO whose directory says 16x16 but whose embedded PNG is side x side (a few hundred bytes)."""
    png = _flat_png(side)
    header = struct.pack("<3H", 0, 1, 1)  # reserved, type 1 (icon), one image
    entry = struct.pack("<4B2H2L", 16, 16, 0, 0, 1, 32, len(png), 6 + 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + entry + png)
    return path


def write_icns_with_a_larger_png(path: Path, side: int) -> Path:
    """An ICNS whose one block is the 128x128 PNG type (ic07) but holds a side x side PNG."""
    png = _flat_png(side)
    block = b"ic07" + struct.pack(">L", 8 + len(png)) + png
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"icns" + struct.pack(">L", 8 + len(block)) + block)
    return path


# --- archives -----------------------------------------------------------------------------------


def tar_with(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    """A .tar.gz of (name, bytes) files and raw TarInfo entries (links, odd names)."""
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def zip_with(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def tar_folder(source: Path, path: Path, top: str, extra_top_files: dict[str, bytes] | None = None) -> Path:
    """Archive `source` under a single top folder, like flower_photos.tgz (with its LICENSE.txt)."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source, arcname=top)
        for name, data in (extra_top_files or {}).items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- a local HTTP server ------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@contextmanager
def http_server(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve `directory` on 127.0.0.1 (a free port); yields (base URL, GET paths seen)."""
    seen: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def copy_tree(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


# --- hostile inputs (issue 10): files outside the source, links, special files ------------------

MARKER = b"OUTSIDE-THE-SOURCE-7f3a9c"  # planted in files outside a source: it must never reach data/


def outside_files(root: Path) -> dict[str, Path]:
    """Files outside any source: a passwd-like text file and a valid JPEG, both carrying MARKER."""
    root.mkdir(parents=True, exist_ok=True)
    passwd = root / "passwd"
    passwd.write_bytes(b"root:x:0:0:" + MARKER + b":/root:/bin/sh\n")
    image = write_image(root / "secret.jpg", seed=4711)
    image.write_bytes(image.read_bytes() + MARKER)  # bytes after the JPEG end: still decodes
    return {"passwd": passwd, "image": image}


def files_containing(root: Path, needle: bytes = MARKER) -> list[str]:
    """Files under root (links not followed) whose bytes contain needle."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(path.relative_to(root).as_posix())
    return hits


def tree_snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under root (links not followed): kind and size, to compare before/after."""
    snap = {}
    for here, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(here) / name
            st = path.lstat()
            snap[path.relative_to(root).as_posix()] = (stat.filemode(st.st_mode)[0], st.st_size if name in names else 0)
    return snap


@contextmanager
def redirecting_server(routes: dict[str, str]) -> Iterator[str]:
    """An http server on 127.0.0.1 answering each path in routes with a 302 to the mapped URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            target = routes.get(self.path)
            self.send_response(302 if target else 404)
            if target:
                self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- EXIF orientation ----------------------------------------------------------------------------

UPRIGHT_SIZE = (48, 32)  # wider than tall: orientations 5-8 store it 32x48
# How each orientation's pixels are stored so that applying the orientation shows `upright_picture`:
# the inverse of the transpose a viewer (ImageOps.exif_transpose) applies.
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_picture() -> Image.Image:
    """Grey, with a wide red bar in the top-left corner: each of the 8 orientations moves or turns it."""
    pixels = np.full((UPRIGHT_SIZE[1], UPRIGHT_SIZE[0], 3), 128, dtype=np.uint8)
    pixels[:8, :24] = (230, 20, 20)
    return Image.fromarray(pixels)


def exif_orientation_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def save_encoded(img: Image.Image, path: Path, fmt: str, **extra) -> Path:
    """JPEG at quality 100 without chroma subsampling, PNG/WEBP lossless: the bar's edges stay sharp."""
    options = {"JPEG": {"quality": 100, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **options, **extra)
    return path


def write_oriented_images(root: Path, fmt: str = "JPEG") -> dict[int, Path]:
    """The upright picture saved once per EXIF orientation 1-8, pixels stored turned as a camera would."""
    suffix = {"JPEG": "jpg"}.get(fmt, fmt.lower())
    written = {}
    for orientation, stored_as in STORED_AS.items():
        stored = upright_picture() if stored_as is None else upright_picture().transpose(stored_as)
        path = root / f"orientation_{orientation}.{suffix}"
        written[orientation] = save_encoded(stored, path, fmt, exif=exif_orientation_block(orientation))
    return written


def assert_upright(pixels: np.ndarray, reference: np.ndarray, tolerance: int) -> None:
    """`pixels` show the upright picture: close to the reference, red bar top-left only, wider than tall."""
    assert pixels.shape == reference.shape and pixels.dtype == reference.dtype
    assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= tolerance
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80)
    rows, cols = np.nonzero(red)
    assert rows.max() < pixels.shape[0] // 2 and cols.max() < pixels.shape[1] // 2  # top-left quarter
    assert cols.max() - cols.min() > rows.max() - rows.min()  # lying wide, not turned on its side
