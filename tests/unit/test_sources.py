"""Sources are confined (issue 10, items 1, 2, 5): labels are names, links and special files stay out,
table rows stay in their root, URLs reach only allowed hosts, every kind is capped, credentials refused.

Each test drives the real ingest (run_ingest) and checks what landed in the workspace and the report.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.config import ParamsError, load_params
from components.core.paths import IngestPaths
from components.core.stage_config import IngestConfig, ValidateConfig
from components.ingest import IngestError, main, run_ingest
from components.ingestion.layout import clean_label
from tests.conftest import write_image
from tests.datakit import (
    files_containing,
    http_server,
    ingest_params,
    make_classes,
    outside_files,
    redirecting_server,
    tar_folder,
    tree_snapshot,
)

LIMITS = ValidateConfig(max_pixels=10_000_000)


def _run(tmp_path: Path, source: Path | str, **overrides):
    ws = tmp_path / "ws"
    result = run_ingest(ingest_params(source, LIMITS, **overrides), IngestPaths().under(ws))
    return result, json.loads(result.report_path.read_text())


def _refused(report: dict) -> dict[str, str]:
    return {Path(r["name"]).name if "row " not in r["name"] else r["name"]: r["reason"] for r in report["refused"]}


def _table(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(path, index=False)
    return path


# --- 1. labels are class names, never paths -------------------------------------------------------

BAD_LABELS = [
    "../../escaped",
    "ABSOLUTE",
    "a/b",
    "..\\..\\escaped",
    "C:escaped",
    "..",
    ".hidden",
    "bell\x07",
    "x" * 200,
    "rtl\u202eevil",
    # round 3, item 12: invisible and format characters, separators, Windows names, markup
    "ca\u200bt",  # zero-width space: looks like "cat"
    "ca\u200dt",  # zero-width joiner
    "\ufeffcat",  # byte-order mark
    "cat\U000e0041\U000e007f",  # tag characters
    "a\u2028b",  # line separator
    "a\u2029b",  # paragraph separator
    "\u3164",  # Hangul filler: a letter drawn as nothing
    "CON",
    "nul",
    "COM1",
    "lpt\u00b9",  # LPT1 once NFKC-normalised
    "nul.txt",
    "cat.",
    "<img src=x onerror=alert(1)>",  # markup (no '/', which was refused already)
    "cat:dog",  # an NTFS alternate data stream
    "\uff0e\uff0e",  # fullwidth '..': '..' once NFKC-normalised
]


@pytest.mark.parametrize("label", BAD_LABELS)
def test_a_table_label_that_is_a_path_is_refused_and_writes_nothing_outside_raw(tmp_path: Path, label: str):
    label = str(tmp_path / "escaped_abs") if label == "ABSOLUTE" else label  # an absolute path, kept inside tmp_path
    images = make_classes(tmp_path / "src" / "images", {"cat": 3})
    extra = write_image(tmp_path / "extra" / "img.jpg", seed=99)  # named <label>/<basename> by the old code
    rows = [(f"images/cat/cat_{i:03d}.jpg", "cat") for i in range(3)] + [(str(extra), label)]
    table = _table(tmp_path / "src" / "labels.csv", rows)
    outside_before = tree_snapshot(tmp_path)
    result, report = _run(tmp_path, table, allowed_roots=[str(extra.parent)])
    after = tree_snapshot(tmp_path)
    new = {
        p
        for p in set(after) - set(outside_before)
        if p not in ("ws", "ws/data", "ws/reports") and not p.startswith(("ws/data/", "ws/reports/"))
    }
    assert not new, f"written outside data/: {sorted(new)}"
    assert result.files == 3 and report["refused_count"] == 1
    assert "label" in report["refused"][0]["reason"]
    assert sorted(images.rglob("*.jpg"))  # the source is untouched


def test_labels_are_unicode_normalised_so_one_class_is_one_folder(tmp_path: Path):
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    make_classes(tmp_path / "src" / "images", {"a": 4})
    rows = [(f"images/a/a_{i:03d}.jpg", decomposed if i % 2 else composed) for i in range(4)]
    result, _ = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    frame = pd.read_csv(result.manifest_path, keep_default_na=False)
    assert set(frame["label"]) == {composed}


def test_labels_are_nfkc_normalised_and_clean_labels_stay_byte_identical(tmp_path: Path):
    clean = ["daisy", "sunflowers", "ants", "Golden Retriever", "caf\u00e9", "\u65e5\u672c", "bee's", "\u2764\ufe0f"]
    assert [clean_label(label) for label in clean] == clean  # data versions of existing sets do not move
    make_classes(tmp_path / "src" / "images", {"a": 4})
    rows = [(f"images/a/a_{i:03d}.jpg", "\uff43\uff41\uff54" if i % 2 else "cat") for i in range(4)]  # fullwidth
    result, _ = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert set(pd.read_csv(result.manifest_path, keep_default_na=False)["label"]) == {"cat"}


def test_class_folders_that_differ_only_in_case_are_refused_but_the_first(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"Cat": 3, "dog": 3})
    for i in range(2):
        write_image(source / "cat" / f"lower_{i}.jpg", seed=40 + i)
        write_image(source / "c\uff21t" / f"upper_{i}.jpg", seed=50 + i)  # fullwidth A: "cAt" once normalised
    result, report = _run(tmp_path, source)
    frame = pd.read_csv(result.manifest_path, keep_default_na=False)
    assert set(frame["label"]) == {"Cat", "dog"} and result.files == 6
    assert report["class_folders"] == {"Cat": 3, "dog": 3}
    refused = _refused(report)
    assert set(refused) == {"lower_0.jpg", "lower_1.jpg", "upper_0.jpg", "upper_1.jpg"}
    assert all("differs only in case from the class 'Cat'" in r for r in refused.values())


def test_table_labels_that_differ_only_in_case_are_refused_but_the_first(tmp_path: Path):
    make_classes(tmp_path / "src" / "images", {"a": 4})
    rows = [(f"images/a/a_{i:03d}.jpg", ["Dog", "dog", "dOG", "Dog"][i]) for i in range(4)]
    result, report = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert set(pd.read_csv(result.manifest_path, keep_default_na=False)["label"]) == {"Dog"}
    assert report["refused_count"] == 2 and all("only in case" in r["reason"] for r in report["refused"])


def test_formula_labels_are_neutralised_in_the_manifest_and_read_back_as_they_were(tmp_path: Path):
    from components.core.contracts import read_manifest

    formulas = ["=SUM(1,2)", "+1", "-2", "@SUM(A1)", "'=quoted"]
    make_classes(tmp_path / "src" / "images", {"a": len(formulas)})
    rows = [(f"images/a/a_{i:03d}.jpg", label) for i, label in enumerate(formulas)]
    result, report = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert report["refused_count"] == 0
    raw = pd.read_csv(result.manifest_path, dtype=str, keep_default_na=False)  # what a spreadsheet sees
    assert sorted(raw["label"]) == sorted("'" + f for f in formulas)
    assert sorted(read_manifest(result.manifest_path)["label"]) == sorted(formulas)


def test_a_nul_byte_in_a_manifest_row_is_one_refused_row(tmp_path: Path, monkeypatch, capsys):
    make_classes(tmp_path / "src" / "images", {"a": 3})
    rows = [(f"images/a/a_{i:03d}.jpg", "a") for i in range(3)] + [
        ("images/a/x\0y.jpg", "a"),
        ("images/a/a_000.jpg", "a\0b"),
    ]
    table = _table(tmp_path / "src" / "labels.csv", rows)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: {table}\n  workers: 1\n")
    assert main(["--params", "params.yaml"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert report["files"] == 3 and report["refused_count"] == 2
    assert {r["reason"] for r in report["refused"]} == {
        "a NUL character in the path",
        "label contains control or unassigned characters",
    }


def test_names_with_newlines_and_ansi_escapes_are_escaped_on_the_terminal(tmp_path: Path, monkeypatch, capsys):
    source = tmp_path / "src"
    write_image(source / "evil\x1b[2J\nFAKE LINE" / "x\x1b]0;title\x07\u2028.jpg", seed=3)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"ingest:\n  source: {source}\n  workers: 1\n")
    assert main(["--params", "params.yaml"]) == 2  # nothing usable: the refusals are listed
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u2028" not in err and "\nFAKE LINE" not in err
    assert "evil\\x1b[2J\\nFAKE LINE" in err  # escaped, still recognisable


def test_a_hard_link_to_a_file_outside_the_source_is_refused_unless_allowed(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 3})
    secret = write_image(tmp_path / "outside" / "secret.jpg", seed=99)
    os.link(secret, source / "a" / "linked.jpg")
    table = _table(source / "labels.csv", [(f"a/a_{i:03d}.jpg", "a") for i in range(3)] + [("a/linked.jpg", "a")])
    for src in (source, table):
        result, report = _run(tmp_path, src)
        assert result.files == 3, src
        assert [r["reason"] for r in report["refused"]] == [
            "a hard link (the file has 2 names, possibly outside the source): not read "
            "(ingest.allow_hard_links is false)"
        ]
        result, report = _run(tmp_path, src, allow_hard_links=True)
        assert result.files == 4 and report["refused_count"] == 0


def test_a_class_folder_with_an_unusable_name_is_refused_by_name(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"good": 3})
    write_image(source / "bad\x01name" / "x.jpg", seed=5)
    result, report = _run(tmp_path, source)
    assert result.files == 3
    assert report["refused"] == [
        {
            "name": str(source / "bad\x01name" / "x.jpg"),
            "reason": "class folder 'bad\\x01name' is not a usable label: label contains "
            "control or unassigned characters",
        }
    ]


# --- 2. only regular files inside the root are read -------------------------------------------------


def test_a_symlink_out_of_a_folder_source_is_refused_and_its_bytes_never_copied(tmp_path: Path):
    outside = outside_files(tmp_path / "outside")
    source = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    (source / "a" / "escape.jpg").symlink_to(outside["passwd"])
    (source / "b" / "looks_fine.jpg").symlink_to(outside["image"])  # a real image: it would decode
    (source / "b" / "zero.jpg").symlink_to("/dev/zero")
    (source / "b" / "environ.jpg").symlink_to("/proc/self/environ")
    (source / "b" / "probe.jpg").symlink_to(tmp_path / "outside" / "no-such-file")  # the same answer as a real one
    result, report = _run(tmp_path, source)
    assert files_containing(tmp_path / "ws") == []
    refused = _refused(report)
    for name in ("escape.jpg", "looks_fine.jpg", "zero.jpg", "environ.jpg", "probe.jpg"):
        assert refused[name] == "symbolic link pointing outside the source root"
    assert result.files == 6 and report["refused_count"] == 5


def test_links_inside_the_root_are_followed_only_when_allowed_and_the_report_says_so(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 3, "b": 3})
    (source / "b" / "also_a0.jpg").symlink_to(source / "a" / "a_000.jpg")
    (source / "b" / "dangling.jpg").symlink_to(source / "nowhere.jpg")
    (source / "b" / "loop.jpg").symlink_to(source / "b" / "loop.jpg")
    (source / "linked_class").symlink_to(source / "a", target_is_directory=True)
    result, report = _run(tmp_path, source)
    assert (
        result.files == 7
        and (result.raw_dir / "b" / "also_a0.jpg").read_bytes() == (source / "a" / "a_000.jpg").read_bytes()
    )
    assert any("followed 1 symbolic link" in n for n in report["notes"])
    refused = _refused(report)
    assert refused["dangling.jpg"] == refused["loop.jpg"] == "broken or looping symbolic link"
    assert refused["linked_class"] == "symbolic link to a folder: not followed"

    result, report = _run(tmp_path, source, follow_links_within_root=False)
    assert result.files == 6 and "not followed" in _refused(report)["also_a0.jpg"]


def test_fifos_and_devices_are_never_opened(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 3})
    os.mkfifo(source / "a" / "pipe.jpg")  # opening it for reading would block without O_NONBLOCK
    try:
        os.mknod(source / "a" / "zero.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero itself
        devices = 1
    except PermissionError:
        devices = 0
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(out=_run(tmp_path, source)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "ingest blocked on a FIFO or read a device"
    result, report = done["out"]
    assert result.files == 3
    refused = _refused(report)
    assert refused["pipe.jpg"] == "a FIFO, not a regular file: not read"
    if devices:
        assert refused["zero.jpg"] == "a character device, not a regular file: not read"


def test_table_rows_outside_the_tables_folder_are_refused_without_revealing_what_exists(tmp_path: Path):
    outside = outside_files(tmp_path / "outside")
    make_classes(tmp_path / "src" / "images", {"a": 3})
    rows = [(f"images/a/a_{i:03d}.jpg", "a") for i in range(3)]
    rows += [
        (str(outside["passwd"]), "a"),
        ("/etc/passwd", "a"),
        ("/no/such/file.jpg", "a"),
        ("../outside/secret.jpg", "a"),
        ("images/../../outside/passwd", "a"),
        ("file:///etc/hostname", "a"),
    ]
    result, report = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert files_containing(tmp_path / "ws") == []
    assert result.files == 3
    reasons = {r["reason"] for r in report["refused"]}
    assert reasons == {"outside the table's folder or bucket prefix (and ingest.allowed_roots)"}  # the same for all
    assert report["refused_count"] == 6


def test_allowed_roots_admit_rows_from_named_folders_only(tmp_path: Path):
    outside = outside_files(tmp_path / "outside")
    other = write_image(tmp_path / "other" / "x.jpg", seed=3)
    make_classes(tmp_path / "src" / "images", {"a": 2})
    rows = [("images/a/a_000.jpg", "a"), ("images/a/a_001.jpg", "a"), (str(outside["image"]), "a"), (str(other), "a")]
    result, report = _run(
        tmp_path, _table(tmp_path / "src" / "labels.csv", rows), allowed_roots=[str(outside["image"].parent)]
    )
    assert result.files == 3 and report["refused_count"] == 1 and report["refused"][0]["name"].endswith("x.jpg")


def test_a_table_from_a_bucket_may_not_name_local_files(tmp_path: Path):
    outside = outside_files(tmp_path / "outside")
    fs = fsspec.filesystem("memory")
    fs.pipe("/tablebucket/set/a/ok.jpg", write_image(tmp_path / "ok.jpg", seed=8).read_bytes())
    table = f"a/ok.jpg,a\n{outside['passwd']},a\nfile://{outside['image']},a\n../elsewhere/x.jpg,a\n"
    fs.pipe("/tablebucket/set/labels.csv", ("path,label\n" + table).encode())
    try:
        result, report = _run(
            tmp_path, "memory://tablebucket/set/labels.csv", allowed_roots=[str(outside["passwd"].parent)]
        )
    finally:
        fs.rm("/tablebucket", recursive=True)
    assert files_containing(tmp_path / "ws") == []
    assert result.files == 1
    reasons = [r["reason"] for r in report["refused"]]
    assert reasons.count("a local path in a table that came from a bucket or URL") == 2
    assert reasons[-1].startswith("outside the table's folder")


def test_url_rows_to_other_hosts_are_refused(tmp_path: Path):
    make_classes(tmp_path / "src" / "images", {"a": 2})
    rows = [
        ("images/a/a_000.jpg", "a"),
        ("images/a/a_001.jpg", "a"),
        ("http://169.254.169.254/latest/meta-data/iam", "a"),
        ("https://localhost/x.jpg", "a"),
    ]
    result, report = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert result.files == 2 and report["refused_count"] == 2


# --- URLs: schemes, hosts, redirects ----------------------------------------------------------------


def test_plain_http_and_private_hosts_are_refused_unless_allowed(tiny_folder: Path, tmp_path: Path):
    served = make_classes(tmp_path / "served", {"a": 3, "b": 3})
    pd.DataFrame([(f"{c}/{c}_{i:03d}.jpg", c) for c in "ab" for i in range(3)], columns=["path", "label"]).to_csv(
        served / "labels.csv", index=False
    )
    with http_server(served) as (base, requests):
        with pytest.raises(IngestError, match="allow_http"):
            _run(tmp_path, f"{base}/labels.csv")
        with pytest.raises(IngestError, match="loopback address"):
            _run(tmp_path, f"{base}/labels.csv", allow_http=True)
        assert requests == []  # refused before any request was sent
        result, _ = _run(tmp_path, f"{base}/labels.csv", allow_http=True, allow_private_hosts=True)
    assert result.files == 6


def test_redirects_are_checked_again_and_limited(tmp_path: Path, monkeypatch):
    from components.ingestion import url_fetch, urls

    policy = urls.UrlPolicy(allow_http=True, allow_private_hosts=False, timeout_s=5, max_redirects=2)
    # Let this test's server on 127.0.0.1 count as public, so that only the redirect target is judged.
    real = urls.address_problem
    monkeypatch.setattr(urls, "address_problem", lambda a: None if a == "127.0.0.1" else real(a))
    with redirecting_server(
        {
            "/meta": "http://169.254.169.254/latest/meta-data/",
            "/file": "file:///etc/passwd",
            "/a": "/b",
            "/b": "/c",
            "/c": "/d",
        }
    ) as base:
        with pytest.raises(urls.URLRefused, match="link-local address"):
            url_fetch.http_open(f"{base}/meta", policy)
        with pytest.raises(OSError, match="file:///etc/passwd' is not allowed"):  # urllib's own refusal
            url_fetch.http_open(f"{base}/file", policy)
        with pytest.raises(urls.URLRefused, match="max_redirects=2"):
            url_fetch.http_open(f"{base}/a", policy)


@pytest.mark.parametrize(
    "address, problem",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("::ffff:192.168.0.1", "private"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_address_policy(address: str, problem: str | None):
    from components.ingestion.urls import address_problem

    found = address_problem(address)
    assert (found is None) if problem is None else (problem in found)


def test_a_host_is_refused_if_any_of_its_addresses_is_private(monkeypatch):
    import socket

    from components.ingestion import urls

    answers = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 443)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    with pytest.raises(urls.URLRefused, match="10.0.0.5"):
        urls.vetted_addresses("rebind.example", 443, allow_private_hosts=False)
    assert urls.vetted_addresses("rebind.example", 443, allow_private_hosts=True) == answers


# --- caps for every kind ----------------------------------------------------------------------------


def test_file_and_byte_caps_hold_for_folders_tables_and_buckets(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    table = _table(tmp_path / "src" / "labels.csv", [(f"a/a_{i:03d}.jpg", "a") for i in range(6)])
    with pytest.raises(IngestError, match="max_files"):
        _run(tmp_path, source, max_files=10)
    with pytest.raises(IngestError, match="max_bytes"):
        _run(tmp_path, source, max_bytes=5_000)
    with pytest.raises(IngestError, match="max_files"):
        _run(tmp_path, table, max_files=5)
    with pytest.raises(IngestError, match="max_bytes"):
        _run(tmp_path, table, max_bytes=3_000)
    fs = fsspec.filesystem("memory")
    for f in source.rglob("*.jpg"):
        fs.pipe(f"/capbucket/{f.relative_to(source).as_posix()}", f.read_bytes())
    try:
        with pytest.raises(IngestError, match="max_files"):
            _run(tmp_path, "memory://capbucket", max_files=10)
        with pytest.raises(IngestError, match="max_bytes"):
            _run(tmp_path, "memory://capbucket", max_bytes=5_000)
    finally:
        fs.rm("/capbucket", recursive=True)
    assert not (tmp_path / "ws" / "data" / "raw").exists()  # a capped run leaves nothing behind


def test_a_file_that_grows_after_listing_is_stopped_by_the_byte_count(tmp_path: Path, monkeypatch):
    from components.ingestion import source_copy

    source = make_classes(tmp_path / "src", {"a": 3})
    real_materialise = source_copy.materialise

    def grow_then_copy(entries, ctx):
        (source / "a" / "a_000.jpg").write_bytes(b"\xff" * 200_000)  # after the sizes were read
        return real_materialise(entries, ctx)

    monkeypatch.setattr("components.ingestion.source_trees.materialise", grow_then_copy)
    with pytest.raises(IngestError, match="max_bytes"):
        _run(tmp_path, source, max_bytes=100_000)


# --- 5. credentials never live in settings ----------------------------------------------------------


@pytest.mark.parametrize(
    "source, what",
    [
        ("https://alice:hunter2@example.com/data.tgz", "user name or password"),
        (
            "https://example.com/data.tgz?X-Amz-Signature=hunter2&X-Amz-Credential=AKIA",
            "X-Amz-Credential, X-Amz-Signature",
        ),
        ("https://storage.example.com/d.zip?sv=2024&sig=hunter2", "sig"),
        ("s3://bucket/set/labels.csv?token=hunter2", "token"),
    ],
)
def test_a_credential_in_the_source_is_refused_with_what_to_use_instead(source: str, what: str):
    with pytest.raises(ValueError) as caught:
        IngestConfig(source=source)
    message = str(caught.value)
    assert what in message and "AWS_ACCESS_KEY_ID" in message and "GOOGLE_APPLICATION_CREDENTIALS" in message


def test_the_cli_refuses_a_credential_before_writing_and_never_echoes_it(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ingest:\n  source: https://alice:hunter2@example.com/d.tgz\n")
    assert main(["--params", "params.yaml"]) == 2
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err and "user name or password" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written
    with pytest.raises(ParamsError):
        load_params(tmp_path / "params.yaml")


def test_reports_and_manifests_show_sources_redacted(tmp_path: Path):
    from components.core.credentials import redact

    assert redact("https://u:p@host/x?sig=abc&v=1") == "https://***@host/x?sig=***&v=1"
    make_classes(tmp_path / "src" / "images", {"a": 2})
    rows = [
        ("images/a/a_000.jpg", "a"),
        ("images/a/a_001.jpg", "a"),
        ("https://bob:hunter2@example.com/x.jpg", "a"),
        ("https://example.com/y.jpg?token=hunter2", "a"),
    ]
    result, report = _run(tmp_path, _table(tmp_path / "src" / "labels.csv", rows))
    assert report["refused_count"] == 2
    for path in (result.report_path, result.manifest_path):
        assert "hunter2" not in path.read_text()


def test_url_prefixes_compare_normalised_paths():
    from components.ingestion.source_tables import Roots

    roots = Roots.of(
        "https://data.example.com/sets/flowers", True, ["s3://bucket/extra", "https://x.example.com/a/../b"]
    )
    assert roots.holds_url("https://data.example.com/sets/flowers/roses/1.jpg")
    assert roots.holds_url("s3://bucket/extra/1.jpg")
    assert not roots.holds_url("https://data.example.com/sets/flowers/../secret.jpg")
    assert not roots.holds_url("https://data.example.com/sets/flowers/%2e%2e/secret.jpg")
    assert not roots.holds_url("https://data.example.com/sets/flowers-private/1.jpg")
    assert not roots.holds_url("https://DATA.example.com.evil.net/sets/flowers/1.jpg")
    assert not roots.holds_url("https://x.example.com/b/1.jpg")  # a root with '..' in it admits nothing


def test_https_connections_are_checked_too_and_a_downgrade_redirect_is_refused():
    import urllib.request

    from components.ingestion import url_fetch, urls

    with pytest.raises(urls.URLRefused, match="loopback"):
        url_fetch.http_open(
            "https://127.0.0.1:9/x.tgz", urls.UrlPolicy.from_config(IngestConfig())
        )  # refused before connecting
    handler = url_fetch._Redirects(urls.UrlPolicy.from_config(IngestConfig()))
    with pytest.raises(urls.URLRefused, match="allow_http"):
        handler.redirect_request(
            urllib.request.Request("https://a.example/x"), None, 302, "Found", {}, "http://a.example/y"
        )


# --- 6. what a server sends: hashed, complete, within one deadline -----------------------------------

LOCAL_HTTP = {"allow_http": True, "allow_private_hosts": True}  # the test servers are plain http on 127.0.0.1


@dataclass
class Answer:
    """What the test server answers for one path."""

    body: bytes
    declared: int | None = None  # the Content-Length sent (default: the body's); more than the body = cut short
    drip_s: float = 0.0  # a pause before each byte of the body (0: all at once)
    etag: str = '"v1"'


@contextmanager
def answering_server(answers: dict[str, Answer]) -> Iterator[tuple[str, list[str]]]:
    """An http server on 127.0.0.1 answering each path from `answers` (the test may change them while it
    runs), with an ETag and a Content-Length; yields (base URL, GET paths seen)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _headers(self) -> Answer | None:
            answer = answers.get(self.path)
            if answer is None:
                self.send_error(404)
                return None
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer.body) if answer.declared is None else answer.declared))
            self.send_header("ETag", answer.etag)
            self.end_headers()
            return answer

        def do_HEAD(self) -> None:
            self._headers()

        def do_GET(self) -> None:
            seen.append(self.path)
            answer = self._headers()
            try:
                if answer and answer.drip_s:
                    for i in range(len(answer.body)):
                        time.sleep(answer.drip_s)
                        self.wfile.write(answer.body[i : i + 1])
                        self.wfile.flush()
                elif answer:
                    self.wfile.write(answer.body)
            except OSError:
                pass  # the client hung up
            self.close_connection = True

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def image_bytes(fmt: str, seed: int, length: int = 0) -> bytes:
    """A small noisy image in fmt, padded with zeros after its end to `length` bytes (decoders ignore them)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out, fmt)
    data = out.getvalue()
    return data + b"\0" * max(0, length - len(data))


def url_table(extra: dict[str, Answer]) -> dict[str, Answer]:
    """Answers for labels.csv (rows a/*, b/*: three JPEGs per class, plus `extra`) and each row's file."""
    answers = {f"/{c}/{c}_{i}.jpg": Answer(image_bytes("JPEG", 10 * ord(c) + i)) for c in "ab" for i in range(3)}
    answers.update({f"/{name}": answer for name, answer in extra.items()})
    rows = "".join(f"{path[1:]},{path.split('/')[1]}\n" for path in answers)
    answers["/labels.csv"] = Answer(f"path,label\n{rows}".encode())
    return answers


def _row(result, name: str) -> dict[str, str]:
    frame = pd.read_csv(result.manifest_path, keep_default_na=False, dtype=str)
    return frame[frame["path"].map(lambda p: Path(p).name) == name].iloc[0].to_dict()


def test_a_url_row_with_new_bytes_under_the_same_etag_and_size_is_inspected_again(tmp_path: Path):
    png = image_bytes("PNG", 1)
    gif = image_bytes("GIF", 2, len(png))
    assert len(gif) == len(png)  # the same size and the same ETag: only the bytes tell the change
    answers = url_table({"a/changing.png": Answer(png)})
    with answering_server(answers) as (base, _):
        first, _ = _run(tmp_path, f"{base}/labels.csv", **LOCAL_HTTP)
        assert _row(first, "changing.png")["format"] == "PNG"
        answers["/a/changing.png"] = Answer(gif)
        second, _ = _run(tmp_path, f"{base}/labels.csv", **LOCAL_HTTP)
        changed = _row(second, "changing.png")
        assert changed["sha256"] == hashlib.sha256(gif).hexdigest()  # re-inspected: GIF is not an allowed format
        assert changed["format"] == "" and "format GIF is not in validate.allowed_formats" in changed["error"]
        assert (second.raw_dir / "a" / "changing.png").read_bytes() == gif
        assert second.computed == 1  # only the changed file: the others' bytes hashed the same
        third, _ = _run(tmp_path, f"{base}/labels.csv", **LOCAL_HTTP)
    assert third.computed == 0 and _row(third, "changing.png") == changed  # the same bytes: facts from the cache


def test_a_server_that_drips_bytes_is_stopped_at_the_request_deadline(tmp_path: Path):
    """Each byte arrives well within the 1 s timeout; the whole answer would take 8 s."""
    slow = Answer(b"x" * 16, drip_s=0.5)
    for source, answers in (("labels.csv", url_table({"a/slow.jpg": slow})), ("set.tgz", {"/set.tgz": slow})):
        with answering_server(answers) as (base, _):
            started = time.monotonic()
            with pytest.raises(IngestError, match=r"within ingest.download_timeout_s=1 s"):
                _run(tmp_path, f"{base}/{source}", download_timeout_s=1, **LOCAL_HTTP)
            assert time.monotonic() - started < 4, source


def test_a_body_shorter_than_its_content_length_is_an_error_and_never_reused(tmp_path: Path):
    archive = tar_folder(make_classes(tmp_path / "set", {"a": 3, "b": 3}), tmp_path / "set.tgz", "set").read_bytes()
    half = len(archive) // 2
    jpeg = image_bytes("JPEG", 5)
    answers = url_table({"a/cut.jpg": Answer(jpeg[:10], declared=len(jpeg))})
    answers["/set.tgz"] = Answer(archive[:half], declared=len(archive))
    with answering_server(answers) as (base, seen):
        with pytest.raises(IngestError, match=f"ended after {half:,} of its {len(archive):,} bytes"):
            _run(tmp_path, f"{base}/set.tgz", **LOCAL_HTTP)
        answers["/set.tgz"] = Answer(archive)  # the same ETag and size, now whole
        result, _ = _run(tmp_path, f"{base}/set.tgz", **LOCAL_HTTP)
        assert result.files == 6 and seen.count("/set.tgz") == 2  # the cut answer was not kept for reuse
        with pytest.raises(IngestError, match=f"ended after 10 of its {len(jpeg):,} bytes"):
            _run(tmp_path, f"{base}/labels.csv", **LOCAL_HTTP)
    assert not list(tmp_path.joinpath("ws", "data").rglob("cut.jpg"))
