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

from components.config import IngestConfig, ValidateConfig
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


def validate_config(**overrides) -> ValidateConfig:
    return ValidateConfig(**{"min_images_per_class": 5, **overrides})


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
