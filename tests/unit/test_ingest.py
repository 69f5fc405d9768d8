"""Ingest: every kind of source lands in data/raw with a manifest; the source is never touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from components import ingest
from components.core.contracts import MANIFEST_COLUMNS
from components.core.paths import IngestPaths
from components.core.stage_config import SplitFractions, ValidateConfig
from components.ingest import IngestError, run_ingest
from components.ingestion.manifest_rows import assign_split
from tests.conftest import write_image
from tests.datakit import (
    STORED_AS,
    UPRIGHT_SIZE,
    assert_upright,
    http_server,
    ingest_params,
    make_classes,
    save_encoded,
    tar_folder,
    tar_with,
    tree_digest,
    upright_picture,
    write_huge_png,
    write_icns_with_a_larger_png,
    write_ico_with_a_larger_png,
    write_oriented_images,
    write_truncated_jpeg,
    zip_with,
)

LIMITS = ValidateConfig(max_pixels=10_000_000)
LOCAL_HTTP = {"allow_http": True, "allow_private_hosts": True}  # the test server is plain http on 127.0.0.1


def _run(tmp_path: Path, source: Path | str, name: str = "ws", **overrides) -> ingest.IngestResult:
    ws = tmp_path / name
    return run_ingest(ingest_params(source, LIMITS, **overrides), IngestPaths().under(ws))


def _manifest(result: ingest.IngestResult) -> pd.DataFrame:
    return pd.read_csv(result.manifest_path, keep_default_na=False, dtype={"sha256": str})


def _split_of(result: ingest.IngestResult) -> dict[str, str]:
    frame = _manifest(result)
    rel = [Path(p).relative_to(result.raw_dir).as_posix() for p in frame["path"]]
    return dict(zip(rel, frame["split"]))


# --- folders -----------------------------------------------------------------------------------


def test_folder_is_copied_with_its_layout_and_source_is_untouched(tiny_folder: Path, tmp_path: Path):
    before = tree_digest(tiny_folder)
    result = _run(tmp_path, tiny_folder)
    assert tree_digest(tiny_folder) == before
    frame = _manifest(result)
    assert list(frame.columns) == MANIFEST_COLUMNS
    assert frame["path"].tolist() == sorted(frame["path"])
    assert set(frame["label"]) == {"alpha", "beta"} and len(frame) == 48
    for row in frame.itertuples():
        copied = Path(row.path)
        rel = copied.relative_to(result.raw_dir).as_posix()
        assert rel == f"{row.label}/{copied.name}"
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == row.sha256 == before[rel]
        assert (row.format, row.mode, row.width, row.height, row.error) == ("JPEG", "RGB", 48, 40, "")
        assert row.source == str(tiny_folder / rel)
    report = ingest.files.read_json(result.report_path)
    assert report["files"] == 48 and report["data_version"] == result.data_version
    assert sum(sum(c.values()) for c in report["counts"].values()) == 48
    assert report["class_folders"] == {"alpha": 24, "beta": 24}


def test_relative_source_resolves_against_working_directory(tiny_folder: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    result = run_ingest(ingest_params(tiny_folder.name, LIMITS), IngestPaths())
    frame = _manifest(result)
    assert frame["path"].str.startswith("data/raw/").all()  # relative to the workspace root
    assert result.files == 48


def test_rerun_on_unchanged_source_recomputes_nothing(tiny_folder: Path, tmp_path: Path, monkeypatch):
    first = _run(tmp_path, tiny_folder)
    assert (first.computed, first.cached) == (48, 0)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a file was hashed/decoded again")

    monkeypatch.setattr("components.ingestion.file_facts.inspect_file", must_not_run)
    second = _run(tmp_path, tiny_folder)
    assert (second.computed, second.cached) == (0, 48)
    assert second.data_version == first.data_version
    assert _manifest(second).equals(_manifest(first))
    assert not (first.raw_dir / ingest.CACHE_DIRNAME).exists()  # the cache lives beside raw_dir, not in it
    monkeypatch.undo()

    changed = tiny_folder / "alpha" / "alpha_000.jpg"
    write_image(changed, seed=999)
    third = _run(tmp_path, tiny_folder)
    assert (third.computed, third.cached) == (1, 47)
    assert third.data_version != first.data_version


def test_many_files_are_inspected_by_a_process_pool(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 40, "b": 40})
    result = _run(tmp_path, source, workers=2)
    assert result.workers == 2 and result.computed == 80
    assert set(_manifest(result)["error"]) == {""}


def test_added_images_never_move_existing_split(tmp_path: Path):
    """The hash split alone (the val top-up, which can move a few between train and val: test_val_topup.py)."""
    source = make_classes(tmp_path / "src", {"a": 30, "b": 30})
    before = _split_of(_run(tmp_path, source, min_val_per_class=0))
    make_classes(tmp_path / "more", {"a": 30, "b": 30, "c": 20}, start_seed=50_000)
    for f in (tmp_path / "more").rglob("*.jpg"):
        target = source / f.relative_to(tmp_path / "more")
        target.parent.mkdir(exist_ok=True)
        shutil.copy(f, target.with_name("new_" + target.name))
    after = _split_of(_run(tmp_path, source, min_val_per_class=0))
    assert len(after) == 140
    assert {rel: after[rel] for rel in before} == before


def test_byte_identical_images_share_a_split(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 20, "b": 20})
    for i in range(20):  # each a-image copied under a new name, and into b
        shutil.copy(source / "a" / f"a_{i:03d}.jpg", source / "a" / f"copy_{i:03d}.jpg")
        shutil.copy(source / "a" / f"a_{i:03d}.jpg", source / "b" / f"from_a_{i:03d}.jpg")
    frame = _manifest(_run(tmp_path, source))
    assert (frame.groupby("sha256")["split"].nunique() == 1).all()
    assert frame.groupby("sha256").size().max() == 3


def test_split_fractions_follow_params():
    fractions = SplitFractions(train=0.7, val=0.2, test=0.1)
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    counts = pd.Series([assign_split(s, 7, fractions) for s in shas]).value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.7, abs=0.03)
    assert counts["val"] == pytest.approx(0.2, abs=0.03)
    assert counts["test"] == pytest.approx(0.1, abs=0.03)
    other_seed = [assign_split(s, 8, fractions) for s in shas]
    assert other_seed != [assign_split(s, 7, fractions) for s in shas]


def test_given_train_val_split_is_kept_and_test_is_carved_from_train(tmp_path: Path):
    source = tmp_path / "src"
    make_classes(source / "train", {"ants": 40, "bees": 40})
    make_classes(source / "val", {"ants": 6, "bees": 6}, start_seed=70_000)
    result = _run(tmp_path, source, min_val_per_class=0)  # the top-up: the next test
    frame = _manifest(result)
    from_val = frame["path"].str.contains("/val/")
    assert set(frame.loc[from_val, "split"]) == {"val"}
    assert set(frame.loc[~from_val, "split"]) == {"train", "test"}
    assert frame["path"].str.contains("/raw/train/ants/").any()  # layout preserved
    assert any("carved from train" in note for note in result.notes)
    report = ingest.files.read_json(result.report_path)
    assert report["layout"] == "split_folders" and report["notes"] == result.notes
    assert report["class_folders"]["val/bees"] == 6


def test_a_small_given_val_is_topped_up_from_train_and_the_report_says_so(tmp_path: Path):
    source = tmp_path / "src"
    make_classes(source / "train", {"ants": 20, "bees": 20})
    make_classes(source / "val", {"ants": 2, "bees": 2}, start_seed=70_000)
    make_classes(source / "test", {"ants": 2, "bees": 2}, start_seed=80_000)
    before = tree_digest(source)
    result = _run(tmp_path, source)
    assert tree_digest(source) == before  # only the manifest's split column changes
    frame = _manifest(result)
    folder = frame["path"].str.extract(r"/raw/(train|val|test)/")[0]
    assert (frame.loc[folder != "train", "split"] == folder[folder != "train"]).all()  # given val and test kept
    from_train = frame.loc[folder == "train"].groupby("label")["split"].value_counts().unstack(fill_value=0)
    assert from_train["val"].to_dict() == result.moved_to_val == {"ants": 6, "bees": 6}  # 30% of 20
    report = ingest.files.read_json(result.report_path)
    assert report["moved_to_val"] == {"ants": 6, "bees": 6} and report["counts"]["val"] == {"ants": 8, "bees": 8}
    assert "val topped up from train" in report["notes"][-1] and "ants 6 (val had 2)" in report["notes"][-1]


def test_hidden_non_image_and_empty_folders_are_reported_not_dropped(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    (source / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (source / "b" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (source / "b" / "notes.txt").write_text("not a picture")
    (source / "empty").mkdir()
    (source / "README.md").write_text("top-level file: not in any class")
    result = _run(tmp_path, source)
    errors = dict(zip(_manifest(result)["path"].map(lambda p: Path(p).name), _manifest(result)["error"]))
    assert "hidden" in errors[".DS_Store"] and "hidden" in errors["Thumbs.db"]
    assert "not an image" in errors["notes.txt"]
    assert "README.md" not in errors
    report = ingest.files.read_json(result.report_path)
    assert report["class_folders"] == {"a": 3, "b": 4, "empty": 0}
    assert report["ignored"] == ["README.md"]


def test_unreadable_files_get_a_reason(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 2})
    write_truncated_jpeg(source / "a" / "truncated.jpg")
    (source / "a" / "zero.jpg").write_bytes(b"")
    (source / "a" / "text.jpg").write_text("hello, I am not a JPEG")
    write_huge_png(source / "a" / "bomb.png", side=300)  # 90,000 px: over twice the limit below
    write_huge_png(source / "a" / "big.png", side=120)  # 14,400 px: between the limit and twice it
    ws = tmp_path / "ws"
    paths = IngestPaths(raw_dir=ws / "raw", manifest=ws / "m.csv", report=ws / "r.json")
    result = run_ingest(ingest_params(source, ValidateConfig(max_pixels=10_000)), paths)
    frame = _manifest(result).set_index(_manifest(result)["path"].map(lambda p: Path(p).name))
    assert "truncated" in frame.loc["truncated.jpg", "error"]
    assert frame.loc["truncated.jpg", "format"] == ""
    assert "empty file" in frame.loc["zero.jpg", "error"]
    assert "not an image" in frame.loc["text.jpg", "error"]
    assert "decompression-bomb" in frame.loc["bomb.png", "error"]
    assert "decompression-bomb" in frame.loc["big.png", "error"]
    assert frame.loc["a_000.jpg", "error"] == ""
    assert result.unreadable == 5 and result.images == 2


# --- tables ------------------------------------------------------------------------------------


def test_csv_manifest_resolves_relative_paths_and_keeps_given_splits(tmp_path: Path):
    data = make_classes(tmp_path / "bucket" / "images", {"cat": 4, "dog": 4})
    outside = write_image(tmp_path / "elsewhere" / "cat_extra.jpg", seed=4242)
    rows = [(f"images/cat/cat_{i:03d}.jpg", "cat", "train" if i < 3 else "val") for i in range(4)]
    rows += [(f"images/dog/dog_{i:03d}.jpg", "dog", "") for i in range(4)]
    rows += [(str(outside), "cat", "test"), ("images/cat/missing.jpg", "cat", "train")]
    table = tmp_path / "bucket" / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(table, index=False)
    before = tree_digest(tmp_path / "bucket")
    result = _run(tmp_path, table, allowed_roots=[str(outside.parent)])
    assert tree_digest(tmp_path / "bucket") == before
    frame = _manifest(result).set_index("source")
    assert frame.loc[str(data / "cat" / "cat_000.jpg"), "path"].endswith("raw/images/cat/cat_000.jpg")
    assert frame.loc[str(data / "cat" / "cat_003.jpg"), "split"] == "val"
    assert frame.loc[str(outside), "path"].endswith("raw/cat/cat_extra.jpg")
    assert frame.loc[str(outside), "split"] == "test"
    assert set(frame.loc[[str(data / "dog" / f"dog_{i:03d}.jpg") for i in range(4)], "split"]) <= {
        "train",
        "val",
        "test",
    }
    assert "not found" in frame.loc[str(data / "cat" / "missing.jpg"), "error"]


def test_parquet_manifest_is_read(tmp_path: Path):
    make_classes(tmp_path / "src", {"a": 3, "b": 3})
    rows = [(f"{c}/{c}_{i:03d}.jpg", c) for c in "ab" for i in range(3)]
    table = tmp_path / "src" / "labels.parquet"
    pd.DataFrame(rows, columns=["path", "label"]).to_parquet(table)
    result = _run(tmp_path, table)
    assert result.files == 6 and result.unreadable == 0


def test_table_without_label_column_is_a_readable_error(tmp_path: Path):
    table = tmp_path / "bad.csv"
    table.write_text("file_name,class_id\nx.jpg,1\n")
    with pytest.raises(IngestError, match="'label' column"):
        _run(tmp_path, table)


# --- archives ----------------------------------------------------------------------------------


def test_tgz_with_single_top_folder_and_license_like_flower_photos(tiny_folder: Path, tmp_path: Path):
    archive = tar_folder(tiny_folder, tmp_path / "flower_photos.tgz", "flower_photos", {"LICENSE.txt": b"CC-BY"})
    before = archive.read_bytes()
    result = _run(tmp_path, archive)
    assert archive.read_bytes() == before
    frame = _manifest(result)
    assert set(frame["label"]) == {"alpha", "beta"} and len(frame) == 48 and set(frame["error"]) == {""}
    assert frame["source"].str.startswith(f"{archive}!flower_photos/").all()
    assert ingest.files.read_json(result.report_path)["ignored"] == ["LICENSE.txt"]
    assert (result.raw_dir / "alpha" / "alpha_000.jpg").is_file()


def test_rerun_on_same_archive_recomputes_nothing(tiny_folder: Path, tmp_path: Path):
    archive = tar_folder(tiny_folder, tmp_path / "data.tar.gz", "data")
    assert _run(tmp_path, archive).computed == 48
    again = _run(tmp_path, archive)
    assert (again.computed, again.cached) == (0, 48)


def test_zip_archive_with_split_folders(tmp_path: Path):
    source = tmp_path / "src"
    make_classes(source / "train", {"ants": 5, "bees": 5})
    make_classes(source / "val", {"ants": 2, "bees": 2}, start_seed=9000)
    members = [
        (f"hymenoptera_data/{p.relative_to(source).as_posix()}", p.read_bytes()) for p in sorted(source.rglob("*.jpg"))
    ]
    result = _run(tmp_path, zip_with(tmp_path / "h.zip", members))
    frame = _manifest(result)
    assert len(frame) == 14
    assert set(frame.loc[frame["path"].str.contains("/val/"), "split"]) == {"val"}


@pytest.mark.parametrize(
    "member, message",
    [
        (("../evil.jpg", b"x"), "outside"),
        (("/tmp/evil_abs.jpg", b"x"), "absolute|outside"),
    ],
)
def test_tar_members_escaping_the_target_are_refused(tmp_path: Path, member, message):
    archive = tar_with(tmp_path / "bad.tgz", [("data/a/ok.jpg", b"fine"), member])
    with pytest.raises(IngestError, match=message):
        _run(tmp_path, archive)
    assert not (tmp_path / "ws" / "data" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()
    assert not (tmp_path / "ws" / "data" / "raw").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_refused(tmp_path: Path, kind: bytes):
    link = tarfile.TarInfo("data/a/link.jpg")
    link.type, link.linkname = kind, "/etc/passwd"
    archive = tar_with(tmp_path / "bad.tgz", [("data/a/ok.jpg", b"fine"), link])
    with pytest.raises(IngestError, match="link"):
        _run(tmp_path, archive)


@pytest.mark.parametrize("name", ["../evil.jpg", "/abs/evil.jpg", "a\\..\\..\\evil.jpg", "C:/evil.jpg"])
def test_zip_members_escaping_the_target_are_refused(tmp_path: Path, name: str):
    archive = zip_with(tmp_path / "bad.zip", [("a/ok.jpg", b"fine"), (name, b"x")])
    with pytest.raises(IngestError, match="unsafe member"):
        _run(tmp_path, archive)
    assert not (tmp_path / "ws" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()


@pytest.mark.parametrize("make", [tar_with, zip_with])
def test_archive_bombs_are_stopped_by_size_and_count_limits(tmp_path: Path, make):
    big = make(tmp_path / f"big.{'tgz' if make is tar_with else 'zip'}", [("d/a/zeros.jpg", b"\0" * 1_000_000)])
    with pytest.raises(IngestError, match="max_bytes"):
        _run(tmp_path, big, max_bytes=100_000)
    many = make(tmp_path / f"many.{'tgz' if make is tar_with else 'zip'}", [(f"d/a/{i}.jpg", b"x") for i in range(50)])
    with pytest.raises(IngestError, match="max_files"):
        _run(tmp_path, many, max_files=20)


# --- remote sources (all on this machine) ------------------------------------------------------


def test_http_archive_is_downloaded_once_and_ingested(tiny_folder: Path, tmp_path: Path):
    served = tmp_path / "served"
    served.mkdir()
    tar_folder(tiny_folder, served / "flower_photos.tgz", "flower_photos", {"LICENSE.txt": b"CC-BY"})
    with http_server(served) as (base, requests):
        url = f"{base}/flower_photos.tgz"
        first = _run(tmp_path, url, **LOCAL_HTTP)
        second = _run(tmp_path, url, **LOCAL_HTTP)
    assert first.files == second.files == 48
    assert second.computed == 0 and second.data_version == first.data_version
    assert requests.count("/flower_photos.tgz") == 1  # the second run reused the download
    assert _manifest(first)["source"].str.startswith(f"{url}!flower_photos/").all()


def test_csv_over_http_resolves_paths_against_its_url(tmp_path: Path):
    served = make_classes(tmp_path / "served", {"a": 3, "b": 3})
    rows = [(f"{c}/{c}_{i:03d}.jpg", c, ["train", "val", "test"][i]) for c in "ab" for i in range(3)]
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(served / "labels.csv", index=False)
    with http_server(served) as (base, _):
        result = _run(tmp_path, f"{base}/labels.csv", **LOCAL_HTTP)
    frame = _manifest(result)
    assert frame["source"].tolist() == sorted(f"{base}/{p}" for p, _, _ in rows)
    assert set(frame["error"]) == {""}
    assert dict(zip(frame["source"], frame["split"])) == {f"{base}/{p}": split for p, _, split in rows}
    assert (result.raw_dir / "a" / "a_000.jpg").read_bytes() == (served / "a" / "a_000.jpg").read_bytes()


def test_http_source_that_does_not_exist_is_a_readable_error(tmp_path: Path):
    with http_server(tmp_path) as (base, _):
        with pytest.raises(IngestError, match="missing.tgz"):
            _run(tmp_path, f"{base}/missing.tgz", **LOCAL_HTTP)


def test_bucket_folder_through_fsspec(tiny_folder: Path, tmp_path: Path):
    fs = fsspec.filesystem("memory")
    for f in tiny_folder.rglob("*.jpg"):
        fs.pipe(f"/bucket/photos/{f.relative_to(tiny_folder).as_posix()}", f.read_bytes())
    try:
        result = _run(tmp_path, "memory://bucket/photos")
        again = _run(tmp_path, "memory://bucket/photos")
    finally:
        fs.rm("/bucket", recursive=True)
    frame = _manifest(result)
    assert len(frame) == 48 and set(frame["label"]) == {"alpha", "beta"} and set(frame["error"]) == {""}
    assert frame["source"].str.startswith("memory://bucket/photos/").all()
    assert again.computed == 0


# --- safety and the command line ---------------------------------------------------------------


def test_failed_run_leaves_previous_outputs_intact(tiny_folder: Path, tmp_path: Path, monkeypatch):
    good = _run(tmp_path, tiny_folder)
    raw_before, manifest_before = tree_digest(good.raw_dir), good.manifest_path.read_bytes()
    write_image(tiny_folder / "alpha" / "alpha_new.jpg", seed=31337)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped mid-way

    monkeypatch.setattr(ingest, "inspect_entries", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tiny_folder)
    assert tree_digest(good.raw_dir) == raw_before
    assert good.manifest_path.read_bytes() == manifest_before
    leftovers = [p.name for p in good.raw_dir.parent.iterdir() if p.name.startswith(".raw.") or "tmp" in p.name]
    assert leftovers == []


def test_raw_dir_inside_the_source_is_refused(tiny_folder: Path):
    before = tree_digest(tiny_folder)
    paths = IngestPaths(
        raw_dir=tiny_folder / "raw", manifest=tiny_folder.parent / "m.csv", report=tiny_folder.parent / "r.json"
    )
    with pytest.raises(IngestError, match="overlap"):
        run_ingest(ingest_params(tiny_folder, LIMITS), paths)
    assert tree_digest(tiny_folder) == before


def _params(path: Path, source: str) -> Path:
    path.write_text(f"ingest:\n  source: {source}\n  workers: 1\n")
    return path


def test_cli_writes_manifest_and_report(tiny_folder: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path / "params.yaml", str(tiny_folder))
    code = ingest.main(
        [
            "--params",
            str(params),
            "--raw-dir",
            "data/raw",
            "--manifest",
            "data/manifest.csv",
            "--report",
            "reports/ingest.json",
        ]
    )
    assert code == 0
    assert "48 files" in capsys.readouterr().out
    assert len(pd.read_csv("data/manifest.csv")) == 48 and Path("reports/ingest.json").is_file()


def test_cli_path_flags_and_defaults_come_from_the_paths_table():
    args = ingest.build_parser().parse_args(["--manifest", "elsewhere/m.csv"])
    assert IngestPaths.from_args(args) == IngestPaths(manifest=Path("elsewhere/m.csv"))
    assert IngestPaths.from_args(ingest.build_parser().parse_args([])) == IngestPaths()


def test_cli_reports_a_missing_source_without_traceback(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params = _params(tmp_path / "params.yaml", "no/such/folder")
    code = ingest.main(["--params", str(params), "--raw-dir", "data/raw", "--manifest", "m.csv", "--report", "r.json"])
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and "Traceback" not in err
    assert not os.path.exists("m.csv")


def test_cli_rejects_unknown_ingest_key(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  sorce: x\n")
    assert ingest.main(["--params", str(params)]) == 2
    assert "did you mean 'ingest.source'" in capsys.readouterr().err


# --- the facts cache (issue 10 item 7) ---------------------------------------------------------


@pytest.mark.parametrize("how", ["replaced", "rewritten_in_place"])
def test_a_swapped_file_with_the_same_size_and_mtime_is_inspected_again(tmp_path: Path, how: str):
    source = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    target = source / "a" / "a_000.jpg"
    first = _run(tmp_path, source)
    before = target.stat()
    swapped = b"\0" * before.st_size  # same size, not an image
    if how == "replaced":
        (tmp_path / "swap").write_bytes(swapped)
        os.replace(tmp_path / "swap", target)
    else:
        with open(target, "r+b") as fh:
            fh.write(swapped)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = _run(tmp_path, source)
    row = _manifest(second).set_index(_manifest(second)["path"].map(lambda p: Path(p).name)).loc["a_000.jpg"]
    assert row["sha256"] == hashlib.sha256(swapped).hexdigest()
    assert row["error"] != ""
    assert second.computed == 1 and second.data_version != first.data_version


def test_an_old_json_cache_or_a_damaged_one_only_costs_a_recompute(tmp_path: Path):
    """The cache is SQLite since issue 24: a files.json as main wrote it (here with false facts that main would
    trust) is not read, and goes; a damaged cache or other image limits mean a recompute, never a crash."""
    import PIL

    from components.ingestion.confine import file_version
    from components.ingestion.images import ImageLimits

    source = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    cache_dir = tmp_path / "ws" / "data" / ingest.CACHE_DIRNAME
    cache_dir.mkdir(parents=True)
    limits = ImageLimits.from_config(LIMITS)
    signature = {"pillow": PIL.__version__, "max_pixels": limits.max_pixels, "max_image_bytes": limits.max_bytes}
    signature |= {"formats": list(limits.formats or ()), "schema": 4}
    lie = {"sha256": "0" * 64, "bytes": 1, "format": "PNG", "mode": "L", "width": 1, "height": 1, "error": ""}
    old = {
        str(p): {"size": p.stat().st_size, "version": file_version(p.stat()), "facts": lie}
        for p in source.rglob("*.jpg")
    }
    (cache_dir / "files.json").write_text(json.dumps({"signature": signature, "files": old}))
    first = _run(tmp_path, source)
    assert (first.computed, first.cached) == (6, 0) and set(_manifest(first)["format"]) == {"JPEG"}
    assert not (cache_dir / "files.json").exists() and (cache_dir / "facts.sqlite").is_file()
    (cache_dir / "facts.sqlite").write_bytes(b"not a database, " * 200)
    second = _run(tmp_path, source)
    assert (second.computed, second.cached) == (6, 0) and second.data_version == first.data_version
    third = _run(tmp_path, source, max_val_share_per_class=0.5)  # not an image limit: the cache holds
    assert (third.computed, third.cached) == (0, 6)
    other_limits = ingest_params(source, ValidateConfig(max_pixels=9_000_000))
    fourth = run_ingest(other_limits, IngestPaths().under(tmp_path / "ws"))
    assert (fourth.computed, fourth.cached) == (6, 0)
    # Rows of the right signature but the wrong shapes (a hand-edited or foreign cache): inspected again.
    import sqlite3

    with sqlite3.connect(cache_dir / "facts.sqlite") as db:
        db.execute("UPDATE files SET sha256 = 'not bytes', width = 'wide' WHERE rowid % 2 = 0")
        db.execute("UPDATE files SET sha256 = X'00' WHERE rowid % 2 = 1")
    fifth = run_ingest(other_limits, IngestPaths().under(tmp_path / "ws"))
    assert (fifth.computed, fifth.cached) == (6, 0) and fifth.data_version == first.data_version


# --- round 3, item 3: images inside images, formats never decoded, Pillow's cap kept on ------------


@pytest.mark.parametrize("writer", [write_ico_with_a_larger_png, write_icns_with_a_larger_png])
@pytest.mark.parametrize("side", [1200, 3000])  # 1-2x the cap (Pillow only warns) and over 2x (it raises)
def test_an_icon_whose_embedded_png_is_larger_than_its_header_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer, side: int
):
    from PIL import PngImagePlugin

    from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb, inspect_image

    decoded = []
    load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    icon = writer(tmp_path / "icon", side)  # says 16x16 or 128x128; holds side x side
    limits = ImageLimits(max_bytes=10**7, max_pixels=1_000_000, formats=("ICO", "ICNS", "PNG"))
    for decode in (lambda: inspect_image(icon, limits), lambda: decode_rgb(icon, 64, limits)):
        with pytest.raises(UnusableImage) as caught:
            decode()
        assert "decompression-bomb" in caught.value.reason and str(caught.value) == "not a usable image"
    assert decoded == []  # the embedded PNG was never decoded (the old code decoded it, then refused)


def test_ingest_decodes_only_the_allowed_formats_and_keeps_pillows_cap_on(tmp_path: Path):
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    source = make_classes(tmp_path / "src", {"a": 3})
    write_ico_with_a_larger_png(source / "a" / "icon.ico", 3000)
    write_image(source / "a" / "anim.gif", fmt="GIF", seed=4)
    result = _run(tmp_path, source)
    rows = _manifest(result).set_index(_manifest(result)["path"].map(lambda p: Path(p).name))
    for name, fmt in (("icon.ico", "ICO"), ("anim.gif", "GIF")):
        assert (
            rows.loc[name, "error"]
            == f"format {fmt} is not in validate.allowed_formats (JPEG, PNG, BMP, WEBP): not decoded"
        )
        assert rows.loc[name, "width"] == 0 and rows.loc[name, "sha256"]  # hashed, never decoded
    assert result.images == 3
    assert before is not None and Image.MAX_IMAGE_PIXELS == before  # never None; each decode applies its own cap


def test_a_small_decode_cap_does_not_stay_behind_for_the_process(tmp_path: Path) -> None:
    """Pillow's cap is a module global: a served request's small cap must not refuse the process's own pictures."""
    from PIL import Image

    from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb

    before = Image.MAX_IMAGE_PIXELS
    small = write_image(tmp_path / "small.png", size=(40, 40), fmt="PNG").read_bytes()
    large = write_image(tmp_path / "large.png", size=(200, 200), fmt="PNG").read_bytes()
    tiny_cap = ImageLimits(10_000_000, 2_000, ("PNG",))
    decode_rgb(small, 8, tiny_cap)
    with pytest.raises(UnusableImage):
        decode_rgb(large, 8, tiny_cap)
    assert Image.MAX_IMAGE_PIXELS == before
    Image.open(tmp_path / "large.png").load()  # what tracking.log_picture does with a report picture


# --- EXIF orientation: the loader returns what a phone shows ------------------------------------------

TOLERANCE = {"JPEG": 8, "PNG": 0, "WEBP": 0}  # JPEG's loss; lossless formats decode exactly upright


def _oriented_limits():
    from components.ingestion.images import ImageLimits

    return ImageLimits(max_bytes=10**6, max_pixels=10**5, formats=("JPEG", "PNG", "WEBP"))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_every_exif_orientation_is_decoded_upright_and_its_facts_give_the_upright_size(tmp_path: Path, fmt: str):
    from PIL import Image, ImageOps

    from components.ingestion.images import decode_rgb, inspect_image

    limits = _oriented_limits()
    reference = decode_rgb(save_encoded(upright_picture(), tmp_path / f"plain.{fmt}", fmt), 32, limits)
    for orientation, path in write_oriented_images(tmp_path, fmt).items():
        pixels = decode_rgb(path, 32, limits)
        assert_upright(pixels, reference, TOLERANCE[fmt])
        with Image.open(path) as stored:  # what Pillow's own exif_transpose makes of the same file
            viewer = np.asarray(ImageOps.exif_transpose(stored).convert("RGB").resize((32, 32), Image.BILINEAR))
        np.testing.assert_array_equal(pixels, viewer)
        facts = inspect_image(path, limits)
        assert (facts.width, facts.height, facts.orientation, facts.note) == (*UPRIGHT_SIZE, orientation, "")


def test_the_pixel_cap_counts_a_turned_image_the_same(tmp_path: Path):
    """Orientations 5-8 swap width and height, never the pixel count the cap and a request's budget see."""
    from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb

    turned = write_oriented_images(tmp_path, "PNG")[6]
    charged = []
    decode_rgb(turned, 16, ImageLimits(10**6, 48 * 32, ("PNG",)), charge=charged.append)
    assert charged == [48 * 32]
    with pytest.raises(UnusableImage):
        decode_rgb(turned, 16, ImageLimits(10**6, 48 * 32 - 1, ("PNG",)))


def _jpeg_with_exif(payload: bytes) -> bytes:
    """A small JPEG carrying `payload` as its APP1 EXIF segment, exactly as given (not re-encoded by Pillow)."""
    buffer = io.BytesIO()
    upright_picture().transpose(STORED_AS[6]).save(buffer, "JPEG", quality=100, subsampling=0)
    data = buffer.getvalue()
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def _tiff_block(entries: list[tuple[int, int, int, bytes]], count: int | None = None, first_ifd: int = 8) -> bytes:
    body = (
        b"Exif\0\0II" + struct.pack("<HI", 42, first_ifd) + struct.pack("<H", len(entries) if count is None else count)
    )
    for tag, kind, number, value in entries:
        body += struct.pack("<HHI", tag, kind, number) + value
    return body + b"\0\0\0\0"


MALFORMED_EXIF = {
    # name: (EXIF payload, whether an orientation tag is present but unusable: noted)
    "not a TIFF header": (b"Exif\0\0" + b"garbage!" * 8, False),
    "first IFD past the end": (_tiff_block([], first_ifd=10**6), False),
    "65535 entries claimed": (_tiff_block([], count=65535), False),
    "value larger than the block": (_tiff_block([(0x0112, 3, 0x7FFFFFFF, struct.pack("<I", 8))]), False),
    "orientation 9": (_tiff_block([(0x0112, 3, 1, struct.pack("<HH", 9, 0))]), True),
    "orientation 0": (_tiff_block([(0x0112, 3, 1, struct.pack("<HH", 0, 0))]), True),
    "orientation as text": (_tiff_block([(0x0112, 2, 4, b"six\0")]), True),
    "orientation as a fraction": (_tiff_block([(0x0112, 5, 1, struct.pack("<I", 8))]), True),
}


@pytest.mark.parametrize("case", MALFORMED_EXIF)
def test_a_malformed_exif_block_leaves_the_image_as_stored_and_usable(case: str):
    """Untrusted EXIF never makes an image unusable nor hangs the loader: it is used as stored (here: on its side)."""
    from components.ingestion.images import UNREADABLE_ORIENTATION, decode_rgb, inspect_image

    payload, noted = MALFORMED_EXIF[case]
    data = _jpeg_with_exif(payload)
    as_stored = _jpeg_with_exif(b"")[:2] + _jpeg_with_exif(b"")[6:]  # the same JPEG without an EXIF segment
    limits = _oriented_limits()
    facts = inspect_image(data, limits)
    assert (facts.width, facts.height, facts.orientation) == (32, 48, 1)  # stored size: nothing applied
    assert facts.note == (UNREADABLE_ORIENTATION if noted else "")
    assert np.array_equal(decode_rgb(data, 16, limits), decode_rgb(as_stored, 16, limits))


def test_an_exif_parser_error_is_a_note_that_reveals_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from PIL import Image

    from components.ingestion.images import UNREADABLE_ORIENTATION, decode_rgb, inspect_image

    def explode(self):
        raise SyntaxError(f"bad IFD at {tmp_path}")  # whatever Pillow says stays out of the note

    path = write_oriented_images(tmp_path, "PNG")[6]
    limits = _oriented_limits()
    monkeypatch.setattr(Image.Image, "getexif", explode)
    facts = inspect_image(path, limits)
    assert (facts.width, facts.height, facts.note) == (32, 48, UNREADABLE_ORIENTATION)
    assert str(tmp_path) not in facts.note
    assert decode_rgb(path, 16, limits).shape == (16, 16, 3)


def test_ingest_records_upright_sizes_hashes_the_file_and_notes_an_unreadable_orientation(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 3})
    turned = write_oriented_images(tmp_path / "oriented", "JPEG")[6]
    shutil.copy(turned, source / "a" / "phone.jpg")
    (source / "a" / "odd.jpg").write_bytes(_jpeg_with_exif(MALFORMED_EXIF["orientation 9"][0]))
    result = _run(tmp_path, source)
    rows = _manifest(result).set_index(_manifest(result)["path"].map(lambda p: Path(p).name))
    assert (rows.loc["phone.jpg", "width"], rows.loc["phone.jpg", "height"]) == UPRIGHT_SIZE
    assert rows.loc["phone.jpg", "sha256"] == hashlib.sha256(turned.read_bytes()).hexdigest()  # the bytes, as given
    assert (rows.loc["odd.jpg", "width"], rows.loc["odd.jpg", "error"]) == (32, "")  # usable, as stored
    assert [n for n in result.notes if "EXIF" in n] == [
        "1 image(s) with an unreadable EXIF orientation are used as stored, perhaps on their side "
        "(e.g. a/odd.jpg): rewrite them upright, or fix their orientation tag"
    ]


def test_perceptual_hashes_see_the_upright_image(tmp_path: Path):
    """Near-duplicate search hashes what the loader returns: a turned copy of a photo is the same photo."""
    from components.quality.perceptual_hashes import perceptual_hash

    limits = _oriented_limits()
    hashes = {o: perceptual_hash(p, limits) for o, p in write_oriented_images(tmp_path, "PNG").items()}
    sideways = perceptual_hash(
        save_encoded(upright_picture().transpose(STORED_AS[6]), tmp_path / "s.png", "PNG"), limits
    )
    assert all(np.array_equal(h, hashes[1]) for h in hashes.values())
    assert np.count_nonzero(sideways != hashes[1]) > 4  # the hash does tell a turned picture apart


# --- memory (issue 24) -------------------------------------------------------------------------


def test_copy_calls_in_flight_stay_bounded_and_in_order():
    from concurrent.futures import ThreadPoolExecutor

    from components.ingestion.source_copy import bounded_map

    counts = {"submitted": 0, "taken": 0, "most": 0}

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            counts["submitted"] += 1
            counts["most"] = max(counts["most"], counts["submitted"] - counts["taken"])
            return super().submit(fn, *args, **kwargs)

    with Counting(max_workers=4) as pool:
        for i, doubled in enumerate(bounded_map(pool, lambda x: 2 * x, range(300), 8)):
            assert doubled == 2 * i
            counts["taken"] += 1
        assert counts["submitted"] == 300 and counts["most"] <= 8

        def fails_at_5(x: int) -> int:
            if x == 5:
                raise OSError("boom")
            return x

        with pytest.raises(OSError, match="boom"):
            list(bounded_map(pool, fails_at_5, range(50), 4))


def test_a_listing_keeps_a_few_fields_per_file_not_its_stat_result(tmp_path: Path):
    """What walk_tree keeps per file, held for the whole ingest: it was a Path and an os.stat_result (~900 B)."""
    import tracemalloc

    from components.ingestion import confine
    from tests.datakit import ingest_config

    root = tmp_path / "src"
    for i in range(300):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i}.png").write_bytes(b"x")
    raw = tmp_path / "raw"
    ctx = confine.Context(ingest_config(root), raw, tmp_path / "staging", tmp_path / "dl", raw)
    tracemalloc.start()
    try:
        found, _, _ = confine.walk_tree(root, ctx, follow_links=False)
        kept = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, confine.__file__)])
    finally:
        tracemalloc.stop()
    per_file = sum(stat.size for stat in kept.statistics("filename")) / 300
    assert per_file < 400, per_file  # FoundFile and its path string: ~200 B
    assert len(found) == 300 and found["c1/1.png"].size == 1


def test_ingest_holds_a_few_hundred_bytes_per_file_while_it_writes_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """When the manifest is written, everything ingest keeps of every file is alive: the listing entry, its facts and
    split columns grow the traced memory by ~0.5 KB a file. Before issue 24 (a dict per file for the facts, another
    for its manifest row) it was ~1.9 KB, and writing the CSV through a frame of every row added more."""
    import pathlib
    import tracemalloc

    from tests.unit.test_ingest_golden import bmp

    # pathlib interns every name it parses: the interpreter's table of interned strings grows (by megabytes) at
    # moments that depend on what ran before in this process, not on ingest. Its allocations are left out.
    intern_lines = [i for i, line in enumerate(Path(pathlib.__file__).read_text().splitlines(), 1) if "intern(" in line]
    noise = [tracemalloc.Filter(False, pathlib.__file__, lineno=i) for i in intern_lines]
    held: list[int] = []
    write_manifest = ingest.write_manifest

    def measured(*args, **kwargs):
        snapshot = tracemalloc.take_snapshot().filter_traces(noise)
        held.append(sum(stat.size for stat in snapshot.statistics("filename")))
        return write_manifest(*args, **kwargs)

    monkeypatch.setattr(ingest, "write_manifest", measured)

    def traced(n: int) -> int:
        source = tmp_path / f"src{n}"
        for i in range(n):
            (source / f"class_{i % 4}").mkdir(parents=True, exist_ok=True)
            (source / f"class_{i % 4}" / f"image_{i:05d}.bmp").write_bytes(bmp(f"{n}/{i}", 4, 4))
        tracemalloc.start()
        try:
            _run(tmp_path, source, name=f"ws{n}")
        finally:
            tracemalloc.stop()
        return held[-1]

    traced(60)  # imports and caches filled once, outside the measure
    small = traced(61)
    per_file = (traced(400) - small) / 339
    assert per_file < 800, per_file
