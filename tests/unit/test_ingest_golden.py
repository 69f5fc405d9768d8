"""Ingest's outputs, byte for byte, on a small generated source: the manifest CSV, the report JSON and the data
version must not change when how ingest holds them in memory does (issue 24).

The expected files in tests/unit/golden/ were written by the code before the issue-24 rewrite (rows as a list of
dicts, a pandas frame for the CSV, the facts cache as one JSON): `python tests/unit/test_ingest_golden.py` with
that code on PYTHONPATH writes them again. The images are hand-made BMPs (bytes fixed by this file, not by an
encoder's version); the source holds what a manifest row can say: duplicates within and across classes, a
formula-like label, an NFKC label, commas and quotes in names, a nested file, truncated, empty, text and hidden
files, a top-level file that is ignored, and (as a table) given splits with test carved from train and a missing
file. Paths and seconds are replaced by placeholders before comparing.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
import tempfile
from pathlib import Path

from components.core.paths import IngestPaths
from components.ingest import run_ingest
from tests.datakit import ingest_params

GOLDEN = Path(__file__).parent / "golden"
OUTPUTS = ("folder_manifest.csv", "folder_report.json", "table_manifest.csv", "table_report.json")


def bmp(seed: str, width: int = 32, height: int = 32) -> bytes:
    """A 24-bit BMP whose pixels are a hash stream of `seed`: the same bytes on every machine."""
    row = (width * 3 + 3) & ~3
    pixels = hashlib.shake_256(seed.encode()).digest(width * 3 * height)
    body = b"".join(pixels[y * width * 3 : (y + 1) * width * 3].ljust(row, b"\0") for y in range(height))
    header = b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(body), 2835, 2835, 0, 0)
    return header + info + body


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_folder_source(root: Path) -> Path:
    for label, n in (("alpha", 40), ("beta", 25), ("=sum", 8), ("\uff43\uff41\uff54", 5), ("gamma", 3)):
        for i in range(n):
            _write(root / label / f"{label[:1]}_{i:03d}.bmp", bmp(f"{label}/{i}"))
    _write(root / "alpha" / "a_001 copy.bmp", bmp("alpha/1"))  # identical within a class
    _write(root / "gamma" / "dup.bmp", bmp("alpha/0"))  # identical across classes
    _write(root / "beta" / 'b,"q" 1.bmp', bmp("quoted"))
    _write(root / "beta" / "sub" / "deep.bmp", bmp("deep"))
    _write(root / "gamma" / "cut.bmp", bmp("cut")[:100])
    _write(root / "gamma" / "empty.bmp", b"")
    _write(root / "gamma" / "notes.txt", b"not an image\n")
    _write(root / "gamma" / ".DS_Store", b"\0\0\0\1Bud1")
    _write(root / "LICENSE.txt", b"top-level file: ignored\n")
    return root


def make_table_source(root: Path) -> Path:
    lines = ["path,label,split"]
    for i in range(30):
        label = "ants" if i % 2 else "bees"
        _write(root / "img" / f"{label}_{i:02d}.bmp", bmp(f"table/{i}"))
        lines.append(f"img/{label}_{i:02d}.bmp,{label},{'val' if i % 7 == 0 else 'train'}")
    lines.append("img/missing.bmp,ants,train")
    _write(root / "list.csv", ("\n".join(lines) + "\n").encode())
    return root / "list.csv"


def normalised(text: str, tmp: Path) -> str:
    """Outputs with the run's folder and its seconds replaced by placeholders."""
    return re.sub(r'"seconds": [0-9.e-]+', '"seconds": 0', text.replace(str(tmp), "<tmp>"))


def ingest_outputs(tmp: Path, source: Path, workspace: str) -> tuple[str, str, str]:
    """(manifest, report, data version) of one ingest run, normalised."""
    result = run_ingest(ingest_params(source, workers=2), IngestPaths().under(tmp / workspace))
    manifest = normalised(result.manifest_path.read_text(encoding="utf-8"), tmp)
    return manifest, normalised(result.report_path.read_text(encoding="utf-8"), tmp), result.data_version


def golden_outputs(tmp: Path) -> dict[str, str]:
    folder = ingest_outputs(tmp, make_folder_source(tmp / "src"), "ws")
    table = ingest_outputs(tmp, make_table_source(tmp / "tbl"), "ws_table")
    return dict(zip(OUTPUTS, (*folder[:2], *table[:2])))


def test_manifest_report_and_data_version_are_byte_identical_to_the_frozen_outputs(tmp_path: Path):
    outputs = golden_outputs(tmp_path)
    for name, text in outputs.items():
        assert text == (GOLDEN / name).read_text(encoding="utf-8"), name
    rerun = ingest_outputs(tmp_path, tmp_path / "src", "ws")  # every file's facts now come from the cache
    assert rerun[0] == outputs["folder_manifest.csv"]
    first, again = json.loads(outputs["folder_report.json"]), json.loads(rerun[1])
    assert again.pop("cache") == {"computed": 0, "reused": first.pop("cache")["computed"]}
    assert (again.pop("workers"), first.pop("workers")) == (0, 2)
    assert again == first


if __name__ == "__main__":  # write the expected outputs with the code on PYTHONPATH
    with tempfile.TemporaryDirectory() as folder:
        GOLDEN.mkdir(exist_ok=True)
        for name, text in golden_outputs(Path(folder).resolve()).items():
            (GOLDEN / name).write_text(text, encoding="utf-8")
            print(f"wrote {GOLDEN / name}", file=sys.stderr)
