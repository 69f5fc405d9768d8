"""Fuzzing the trust boundary (issue 10): random manifests and random trees of links through the real ingest.

Whatever the table or the tree holds, two things must hold:
  - nothing is written outside the workspace's data/ (and the ingest report beside it);
  - no byte of a file outside the source reaches data/ (the outside files carry MARKER).
Ingest may refuse a whole source (IngestError, e.g. when nothing usable is left); anything else is a bug.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from components.core.contracts import MANIFEST_COLUMNS, read_manifest, write_manifest
from components.core.files import neutralise_formula, read_csv, restore_formula, write_csv
from components.core.paths import IngestPaths
from components.core.stage_config import ValidateConfig
from components.ingest import IngestError, run_ingest
from components.ingestion.archives import ArchiveError, extract_archive
from components.ingestion.layout import WINDOWS_RESERVED_NAMES, BadLabel, clean_label
from tests.conftest import write_image
from tests.datakit import MARKER, files_containing, ingest_params, outside_files, tree_snapshot

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
CLASSES = ["cat", "dog"]
# Text that a CSV, a file system or a label may carry: anything but NUL and lone surrogates.
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
NAME_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/")
FILE_NAME = st.text(NAME_CHARS, min_size=1, max_size=40).filter(
    lambda n: n not in (".", "..") and len(n.encode()) < 200
)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _world(fuzz_root: Path) -> tuple[Path, dict[str, Path], Path]:
    """A fresh base folder: outside files (with MARKER), a source with real images, a workspace."""
    base = Path(tempfile.mkdtemp(dir=fuzz_root))
    outside = outside_files(base / "outside")
    (base / "outside" / "dir").mkdir()
    (base / "outside" / "dir" / "inner.jpg").write_bytes(outside["image"].read_bytes())
    source = base / "src"
    for c, label in enumerate(CLASSES):
        for i in range(3):
            write_image(source / label / f"{label}_{i}.jpg", seed=c * 10 + i)
    return base, outside, source


def _ingest_and_check(base: Path, source: Path | str, **overrides) -> None:
    ws = base / "ws"
    before = {k: v for k, v in tree_snapshot(base).items() if not k.startswith("ws")}
    try:
        limits = ValidateConfig(max_pixels=10_000_000)
        result = run_ingest(ingest_params(source, limits, **overrides), IngestPaths().under(ws))
        event(f"ingested, {'some' if result.refused else 'none'} refused")
    except IngestError:
        event("whole source refused")  # allowed; writing or reading outside it is not
    after = tree_snapshot(base)
    outside_ws = {k: v for k, v in after.items() if not k.startswith("ws")}
    assert outside_ws == before, f"changed outside the workspace: {sorted(set(outside_ws) ^ set(before))}"
    in_ws = {k for k in after if k.startswith("ws/") and not k.startswith(("ws/data", "ws/reports"))}
    assert not in_ws, f"written in the workspace outside data/ and reports/: {sorted(in_ws)}"
    if (ws / "data").exists():
        assert files_containing(ws / "data", MARKER) == []
        assert files_containing(ws / "reports", MARKER) == [] if (ws / "reports").exists() else True


# --- (a) manifests with random labels and paths --------------------------------------------------

PATH_SHAPES = st.one_of(
    st.sampled_from([f"{c}/{c}_{i}.jpg" for c in CLASSES for i in range(3)]),  # good rows
    st.sampled_from(
        [
            "OUTSIDE_PASSWD",
            "OUTSIDE_IMAGE",
            "OUTSIDE_DIR",
            "../outside/passwd",
            "../outside/secret.jpg",
            "cat/../../outside/passwd",
            "./cat/../../outside/dir/inner.jpg",
            "/etc/passwd",
            "/dev/zero",
            "/proc/self/environ",
            "file:///etc/passwd",
            "FILE_URL_OUTSIDE",
            "http://169.254.169.254/latest",
            "https://localhost/x.jpg",
            "https://10.0.0.1/x.jpg",
            "cat",
            ".",
            "..",
            "/",
            "",
            "~/.ssh/id_rsa",
            "C:\\Windows\\win.ini",
            "cat\\..\\..\\outside\\passwd",
        ]
    ),
    ANY_TEXT,
    st.lists(
        st.sampled_from(["..", ".", "cat", "dog", "outside", "passwd", "", "secret.jpg"]), min_size=1, max_size=6
    ).map("/".join),
)
# Labels made of invisible and format characters, separators, formula and Windows-special characters.
FORMAT_TEXT = st.text(
    st.one_of(
        st.sampled_from("\u200b\u200c\u200d\u2060\ufeff\u00ad\u2028\u2029\U000e0041\U000e007f=+-@.: "),
        st.characters(whitelist_categories=("Lu", "Ll", "Cf", "Zs")),
    ),
    max_size=12,
)
LABEL_SHAPES = st.one_of(
    st.sampled_from(CLASSES),
    st.sampled_from(
        [
            "../../escaped",
            "../escaped",
            "ABS_ESCAPE",
            "a/b",
            "..",
            ".",
            "/",
            "C:",
            "C:\\x",
            "\\\\server\\x",
            "ws/data/../../escaped",
            "x" * 300,
            "e\u0301",
            "\u202eevil",
            "tab\there",
            "new\nline",
            # round 3: invisible and format characters, separators, Windows names, case twins, formulas
            "ca\u200bt",
            "ca\u200dt",
            "\ufeffcat",
            "cat\U000e0041",
            "a\u2028b",
            "\u3164",
            "CON",
            "nul",
            "Com1",
            "lpt9.txt",
            "cat.",
            "Cat",
            "CAT",
            "\uff43\uff41\uff54",
            "=cmd()",
            "+1",
            "-1",
            "@x",
            "'=x",
            "<b>x</b>",
        ]
    ),
    FORMAT_TEXT,
    ANY_TEXT,
)


def _resolve(value: str, base: Path, outside: dict[str, Path]) -> str:
    return {
        "OUTSIDE_PASSWD": str(outside["passwd"]),
        "OUTSIDE_IMAGE": str(outside["image"]),
        "OUTSIDE_DIR": str(base / "outside" / "dir"),
        "FILE_URL_OUTSIDE": f"file://{outside['image']}",
        "ABS_ESCAPE": str(base / "escaped"),
    }.get(value, value)


@FUZZ
@given(rows=st.lists(st.tuples(PATH_SHAPES, LABEL_SHAPES), min_size=1, max_size=12), follow=st.booleans())
def test_random_manifests_never_write_or_read_outside(fuzz_root: Path, rows: list[tuple[str, str]], follow: bool):
    base, outside, source = _world(fuzz_root)
    table = source / "labels.csv"
    rows = [("dog/dog_0.jpg", "dog"), *rows]  # one good row, so that most examples get as far as copying
    pd.DataFrame(
        [(_resolve(p, base, outside), _resolve(lab, base, outside)) for p, lab in rows], columns=["path", "label"]
    ).to_csv(table, index=False)
    _ingest_and_check(base, table, follow_links_within_root=follow)
    _check_labels_and_cells(base / "ws" / "data" / "manifest.csv")


def _check_labels_and_cells(manifest: Path) -> None:
    """Every label is a clean class name, no two differ only in case, and no cell reads as a formula."""
    if not manifest.exists():
        return
    labels = set(read_manifest(manifest)["label"])
    assert all(clean_label(label) == label for label in labels)
    assert len({label.casefold() for label in labels}) == len(labels), labels
    raw = pd.read_csv(manifest, dtype=str, keep_default_na=False)  # as a spreadsheet would see it
    cells = [c for column in raw.columns for c in raw[column]]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


# --- (b) folder trees with random links ------------------------------------------------------------

TARGETS = st.sampled_from(
    [
        "inside_file",
        "inside_dir",
        "outside_passwd",
        "outside_image",
        "outside_dir",
        "dangling",
        "loop",
        "etc_passwd",
        "dev_zero",
        "proc_environ",
        "relative_escape",
        "chain_out",
        "chain_in",
        "root_itself",
        "fifo",
    ]
)
LINKS = st.lists(st.tuples(st.sampled_from(CLASSES + ["newclass"]), FILE_NAME, TARGETS), min_size=1, max_size=10)


def _target(kind: str, base: Path, outside: dict[str, Path], source: Path, here: Path) -> str | None:
    return {
        "inside_file": str(source / "cat" / "cat_0.jpg"),
        "inside_dir": str(source / "dog"),
        "outside_passwd": str(outside["passwd"]),
        "outside_image": str(outside["image"]),
        "outside_dir": str(base / "outside" / "dir"),
        "dangling": str(source / "does-not-exist.jpg"),
        "loop": str(here),
        "etc_passwd": "/etc/passwd",
        "dev_zero": "/dev/zero",
        "proc_environ": "/proc/self/environ",
        "relative_escape": os.path.relpath(outside["passwd"], here.parent),
        "chain_out": str(source / "cat" / "hop_out"),
        "chain_in": str(source / "cat" / "hop_in"),
        "root_itself": str(source),
    }.get(kind)


@FUZZ
@given(links=LINKS, follow=st.booleans(), odd_class=st.one_of(st.none(), FILE_NAME))
def test_random_link_trees_never_write_or_read_outside(
    fuzz_root: Path, links: list[tuple[str, str, str]], follow: bool, odd_class: str | None
):
    base, outside, source = _world(fuzz_root)
    (source / "cat" / "hop_out").symlink_to(outside["image"])  # a link to a link that leaves the root
    (source / "cat" / "hop_in").symlink_to(source / "dog" / "dog_0.jpg")
    if odd_class is not None and not (source / odd_class).exists():
        write_image(source / odd_class / "odd.jpg", seed=77)  # a class folder with a random (maybe bad) name
    for folder, name, kind in links:
        here = source / folder / name
        if os.path.lexists(here):
            continue
        here.parent.mkdir(exist_ok=True)
        if kind == "fifo":
            os.mkfifo(here)
        else:
            here.symlink_to(_target(kind, base, outside, source, here))
    _ingest_and_check(base, source, follow_links_within_root=follow)


# --- (c) archives and bucket folders with random member names --------------------------------------

SEGMENT = st.one_of(st.sampled_from(["..", ".", "", "cat", "dog", "C:", "~", "\\..", "..\\.."]), FILE_NAME)
MEMBER_NAME = st.lists(SEGMENT, min_size=1, max_size=5).map("/".join)
MEMBER_KIND = st.sampled_from(["file", "dir", "symlink", "hardlink", "fifo", "chardev"])


@FUZZ
@given(
    members=st.lists(st.tuples(st.one_of(MEMBER_NAME, st.just("/ABS")), MEMBER_KIND), min_size=1, max_size=8),
    fmt=st.sampled_from(["tgz", "zip"]),
)
def test_random_archive_members_never_write_outside(fuzz_root: Path, members: list[tuple[str, str]], fmt: str):
    import io
    import tarfile
    import zipfile

    base, outside, source = _world(fuzz_root)
    image = (source / "cat" / "cat_0.jpg").read_bytes()
    members = [("data/dog/dog_0.jpg", "file"), *members]
    archive = base / f"set.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names are part of the fuzz
            for name, _ in members:
                try:
                    zf.writestr(str(base / "escaped") if name == "/ABS" else name, image)
                except (IndexError, ValueError):
                    pass  # a name zipfile itself will not write (empty)
    else:
        kinds = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
            "fifo": tarfile.FIFOTYPE,
            "chardev": tarfile.CHRTYPE,
        }
        with tarfile.open(archive, "w:gz") as tar:
            for name, kind in members:
                info = tarfile.TarInfo(str(base / "escaped") if name == "/ABS" else name)
                info.type = kinds[kind]
                info.linkname = str(outside["passwd"]) if kind in ("symlink", "hardlink") else ""
                info.size = len(image) if kind == "file" else 0
                tar.addfile(info, io.BytesIO(image) if kind == "file" else None)
    _ingest_and_check(base, archive)


@FUZZ
@given(keys=st.lists(MEMBER_NAME, min_size=1, max_size=8))
def test_random_bucket_keys_never_write_outside(fuzz_root: Path, keys: list[str]):
    import uuid

    import fsspec

    base, _, source = _world(fuzz_root)
    fs, bucket = fsspec.filesystem("memory"), f"/fuzz-{uuid.uuid4().hex}"
    image = (source / "cat" / "cat_0.jpg").read_bytes()
    try:
        for key in ["dog/dog_0.jpg", *keys]:
            try:
                fs.pipe(f"{bucket}/set/{key}", image)
            except (OSError, ValueError):
                pass  # a key the store itself will not hold
        _ingest_and_check(base, f"memory:/{bucket}/set")
    finally:
        for key in [k for k in fs.store if k.startswith(bucket)]:  # fs.rm trips over some odd keys
            del fs.store[key]
        fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if not d.startswith(bucket)]


# --- (d) labels: whatever text a label holds, what comes out is a plain, visible class name ---------

RESERVED = (
    st.sampled_from(sorted(WINDOWS_RESERVED_NAMES))
    .flatmap(
        lambda name: st.tuples(
            st.sampled_from([name, name.lower(), name.title()]), st.sampled_from(["", ".txt", " ", ".jpg"])
        )
    )
    .map("".join)
)
LABEL_TEXT = st.one_of(
    FORMAT_TEXT, RESERVED, ANY_TEXT, st.lists(st.one_of(FORMAT_TEXT, RESERVED), max_size=3).map("".join)
)


@FUZZ
@given(raw=LABEL_TEXT)
def test_random_labels_are_refused_or_plain_visible_names(raw: str):
    import unicodedata

    try:
        label = clean_label(raw)
    except BadLabel:
        event("refused")
        return
    event("kept")
    assert clean_label(label) == label  # already clean labels stay byte-identical
    assert unicodedata.normalize("NFKC", label) == label and label == label.strip() and 0 < len(label) <= 128
    assert all(ch.isprintable() for ch in label), ascii(label)  # no control, format or separator characters
    assert label.split(".")[0].rstrip(" ").upper() not in WINDOWS_RESERVED_NAMES and not label.endswith(".")
    assert not set(label) & set('/\\<>:"|?*')


@FUZZ
@given(
    cells=st.lists(st.one_of(LABEL_TEXT, st.sampled_from(["=1", "'=1", "''+2", "-3", "@a", "'", "\t=x"])), max_size=8)
)
def test_csv_cells_never_start_a_formula_and_read_back_unchanged(fuzz_root: Path, cells: list[str]):
    assert [restore_formula(neutralise_formula(c)) for c in cells] == cells
    assert not [c for c in map(neutralise_formula, cells) if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    path = Path(tempfile.mkdtemp(dir=fuzz_root)) / "cells.csv"
    clean = [c.replace("\r", "") for c in cells]  # the CSV reader folds lone CRs: not ours to fuzz
    write_csv(pd.DataFrame({"label": clean, "n": range(len(clean))}), path)
    back = read_csv(path, dtype={"label": str}, keep_default_na=False)
    assert list(back["label"]) == clean


@FUZZ
@given(
    rows=st.lists(
        st.tuples(ANY_TEXT, ANY_TEXT, st.integers(0, 2**40), st.integers(0, 70_000), st.sampled_from(["", "=1", "-x"])),
        min_size=1,
        max_size=6,
    )
)
def test_the_streamed_manifest_is_the_bytes_pandas_writes(fuzz_root: Path, rows: list[tuple]):
    """write_manifest's row-at-a-time path (ingest, issue 24) against its DataFrame path, on any text."""
    tuples = [
        (path, label, "train", "ab" * 32, n, side, side, "PNG", "RGB", path, error)
        for path, label, n, side, error in rows
    ]
    folder = Path(tempfile.mkdtemp(dir=fuzz_root))
    write_manifest([dict(zip(MANIFEST_COLUMNS, t)) for t in tuples], folder / "frame.csv")
    write_manifest(iter(tuples), folder / "streamed.csv")
    assert (folder / "streamed.csv").read_bytes() == (folder / "frame.csv").read_bytes()


# --- (e) archive member counts and metadata: stopped exactly at the caps --------------------------


def _pax_record_bytes(keyword: str, value: str) -> int:
    """Length of one pax record `"%d %s=%s\n"` (tarfile's own arithmetic: the length counts itself)."""
    size = len(keyword) + len(value.encode()) + 3
    total = previous = 0
    while True:
        total = size + len(str(previous))
        if total == previous:
            return total
        previous = total


@FUZZ
@given(
    members=st.integers(0, 30),
    max_members=st.integers(1, 30),
    fmt=st.sampled_from(["tgz", "zip", "zip understating its count"]),
    comment=st.integers(0, 2000),
    max_metadata=st.integers(1, 40_000),
)
def test_random_member_counts_and_header_bytes_stop_at_the_caps(
    fuzz_root: Path, members: int, max_members: int, fmt: str, comment: int, max_metadata: int
):
    import io
    import struct
    import tarfile
    import zipfile

    base = Path(tempfile.mkdtemp(dir=fuzz_root))
    archive = base / ("set.tgz" if fmt == "tgz" else "set.zip")
    names = [f"data/a/{i:03d}.jpg" for i in range(members)]
    if fmt == "tgz":
        with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.pax_headers = {"comment": "c" * comment} if comment else {}
                tar.addfile(info, io.BytesIO(b""))
        metadata = members * _pax_record_bytes("comment", "c" * comment) if comment else 0
    else:
        with zipfile.ZipFile(archive, "w") as zf:
            for name in names:
                zf.writestr(name, b"")
        metadata = sum(46 + len(name) for name in names)  # zipfile writes no extra fields or comments here
        if fmt.endswith("count"):
            data = bytearray(archive.read_bytes())
            struct.pack_into("<2H", data, data.rfind(b"PK\x05\x06") + 8, 1, 1)
            archive.write_bytes(bytes(data))
    out = base / "out"
    try:
        extract_archive(archive, out, 10**9, max_members, max_metadata)
    except ArchiveError as exc:
        event(f"{fmt}: refused")
        over_count, over_metadata = members > max_members, metadata > max_metadata
        assert over_count or over_metadata, str(exc)
        assert ("member count" in str(exc)) == (over_count and not over_metadata) or over_count and over_metadata
        assert not out.exists() or not any(out.rglob("*.jpg"))  # checked before anything is written
        return
    event(f"{fmt}: extracted")
    assert members <= max_members and metadata <= max_metadata
    assert len(list(out.rglob("*.jpg"))) == members
