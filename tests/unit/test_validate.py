"""Validate: each kind of bad file is caught and quarantined (or fails the run), with a reason a person can read."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import validate
from components.core.config import Params
from components.core.contracts import MANIFEST_COLUMNS
from components.core.paths import IngestPaths, ValidatePaths
from components.core.stage_config import IngestConfig, NearDuplicatesConfig, ValidateConfig
from components.ingest import IngestResult, run_ingest
from components.ingestion.layout import BadLabel, clean_label
from components.quality import validation_checks, validation_suites
from components.quality.validation_inputs import ValidateInputError
from components.validate import ValidationResult, run_validate
from tests.conftest import FLOWERS, HYMENOPTERA, copy_subset, write_image
from tests.datakit import (
    ingest_params,
    make_classes,
    tree_digest,
    validate_config,
    write_16bit_png,
    write_alpha_png,
    write_cmyk_jpeg,
    write_huge_png,
    write_ico_with_a_larger_png,
    write_truncated_jpeg,
)


@pytest.fixture(autouse=True)
def workspace_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The near-duplicate hash cache lives under the workspace root (DVC_ROOT): a temp folder, not the repo."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path / validate.NEAR_DUPLICATE_CACHE


@dataclass
class Run:
    ingest: IngestResult
    result: ValidationResult
    ws: Path

    @property
    def summary(self) -> dict:
        return validate.files.read_json(self.result.summary_path)

    def quarantine(self) -> pd.DataFrame:
        return pd.read_csv(self.result.quarantine_path, keep_default_na=False)

    def reason(self, name: str) -> str:
        """Why the file with this name (anywhere in raw) was quarantined; '' if it was kept."""
        q = self.quarantine()
        hits = q[q["path"].map(lambda p: Path(p).name) == name]
        return "; ".join(hits["checks"] + ": " + hits["reason"])


def validate_in(
    config: ValidateConfig,
    manifest: Path,
    ingest_report: Path,
    out_manifest: Path,
    report_dir: Path,
    classes: list[str] | None = None,
) -> ValidationResult:
    """run_validate with these settings (and ingest.classes) and paths."""
    params = Params(validate=config, ingest=IngestConfig(classes=classes))
    paths = ValidatePaths(
        manifest=manifest, ingest_report=ingest_report, out_manifest=out_manifest, report_dir=report_dir
    )
    return run_validate(params, paths)


def ingest_and_validate(source: Path, ws: Path, config: ValidateConfig, classes: list[str] | None = None) -> Run:
    ingested = run_ingest(ingest_params(source, config), IngestPaths().under(ws))
    result = validate_in(
        config,
        ingested.manifest_path,
        ws / "reports" / "ingest.json",
        ws / "data" / "validated.csv",
        ws / "reports" / "validation",
        classes,
    )
    return Run(ingested, result, ws)


# --- one source with every per-file defect -----------------------------------------------------

DEFECTS = {
    # file name: (the check that must quarantine it, words in the reason) ; None = must be kept
    "truncated.jpg": ("decodes", "truncated"),
    "zero.jpg": ("decodes", "empty file"),
    "text.jpg": ("decodes", "not an image"),
    "bomb.png": ("decodes", "decompression-bomb"),
    "placeholder.gif": ("decodes", "format GIF is not in validate.allowed_formats"),  # never decoded
    "bomb.ico": ("decodes", "decompression-bomb"),  # an ICO whose PNG is larger than its header says
    "tiny.jpg": ("width_in_range", "width 16px"),
    ".DS_Store": ("not_hidden", "hidden"),
    "conflict_in_a.jpg": ("no_label_conflict", "b/conflict_in_b.jpg"),
    "conflict_in_b.jpg": ("no_label_conflict", "a/conflict_in_a.jpg"),
    "cmyk.jpg": None,
    "sixteen_bit.png": None,
    "alpha.png": None,
    "a_000.jpg": None,
}


@pytest.fixture(scope="module")
def defects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("defects")
    source = make_classes(root / "src", {"a": 12, "b": 12})
    write_truncated_jpeg(source / "a" / "truncated.jpg")
    (source / "a" / "zero.jpg").write_bytes(b"")
    (source / "b" / "text.jpg").write_text("this is text, not a JPEG")
    write_huge_png(source / "a" / "bomb.png", side=200)  # 40,000 px > max_pixels below
    write_image(source / "b" / "placeholder.gif", fmt="GIF", seed=5)
    write_ico_with_a_larger_png(source / "a" / "bomb.ico", side=400)  # 160,000 px > max_pixels below
    write_image(source / "b" / "tiny.jpg", size=(16, 16), seed=6)
    (source / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_image(source / "a" / "conflict_in_a.jpg", seed=77)
    shutil.copy(source / "a" / "conflict_in_a.jpg", source / "b" / "conflict_in_b.jpg")
    write_cmyk_jpeg(source / "a" / "cmyk.jpg")
    write_16bit_png(source / "b" / "sixteen_bit.png")
    write_alpha_png(source / "b" / "alpha.png")
    before = tree_digest(source)
    config = validate_config(max_pixels=20_000, max_bad_fraction=0.5, allowed_formats=["JPEG", "PNG", "BMP", "ICO"])
    return ingest_and_validate(source, root / "ws", config), source, before


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_each_defect_is_caught_and_good_files_are_kept(defects, name: str):
    run, _, _ = defects
    expected = DEFECTS[name]
    reason = run.reason(name)
    if expected is None:
        assert reason == ""
    else:
        check, words = expected
        assert check in reason and words in reason, reason


def test_quarantine_policy_passes_and_writes_only_good_rows(defects):
    run, _, _ = defects
    assert run.result.passed, run.result.problems
    validated = pd.read_csv(run.result.out_manifest, keep_default_na=False)
    assert list(validated.columns) == MANIFEST_COLUMNS
    bad = {n for n, e in DEFECTS.items() if e}
    kept = set(validated["path"].map(lambda p: Path(p).name))
    assert not kept & bad and {"cmyk.jpg", "sixteen_bit.png", "alpha.png"} <= kept
    assert len(validated) + run.result.quarantined == run.ingest.files
    assert set(run.quarantine().columns) >= {"path", "label", "split", "reason"}


def test_source_folder_is_unchanged_after_ingest_and_validate(defects):
    _, source, before = defects
    assert tree_digest(source) == before


def test_summary_names_each_failed_check_with_files_and_versions(defects):
    run, _, _ = defects
    summary = run.summary
    failed = {f["check"]: f for f in summary["failures"]}
    assert {"decodes", "width_in_range", "not_hidden", "no_label_conflict"} <= set(failed)
    assert {Path(i["path"]).name for i in failed["decodes"]["items"]} == {
        "truncated.jpg",
        "zero.jpg",
        "text.jpg",
        "bomb.png",
        "bomb.ico",
        "placeholder.gif",
    }
    assert summary["data_version"] == run.ingest.data_version
    assert summary["validated_version"] != summary["data_version"]
    assert summary["counts"]["hidden_files"] == 1
    # Hidden files are clutter, not bad images: they do not count towards max_bad_fraction.
    assert summary["counts"]["bad_files"] == run.result.quarantined - 1
    assert any("16-bit" in w for w in summary["warnings"])
    assert (run.result.data_docs).is_file()
    assert (run.result.summary_path.parent / "data_docs" / "expectations" / "files.html").is_file()


def test_fail_policy_exits_nonzero_listing_every_problem(defects, tmp_path: Path, capsys):
    run, _, _ = defects
    params = tmp_path / "params.yaml"
    params.write_text(
        "validate:\n  policy: fail\n  max_pixels: 20000\n  min_images_per_class: 5\n"
        "  near_duplicates:\n    embeddings: false\n"
    )
    out = tmp_path / "validated.csv"
    code = validate.main(
        [
            "--params",
            str(params),
            "--manifest",
            str(run.ingest.manifest_path),
            "--out-manifest",
            str(out),
            "--report-dir",
            str(tmp_path / "report"),
            "--ingest-report",
            str(run.ingest.report_path),
        ]
    )
    text = capsys.readouterr().out
    # Exit 2: the data's fault, which the flow does not retry (components.core.errors.EXIT_USER_ERROR).
    assert code == 2 and "FAILED" in text and "Traceback" not in text
    for name, expected in DEFECTS.items():
        if expected:
            assert any(line.strip().startswith("- ") and name in line and ": " in line for line in text.splitlines()), (
                name
            )
    assert not out.exists()


# --- checks that quarantining cannot fix ---------------------------------------------------------


def test_one_image_class_fails_the_run(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6, "solo": 1})
    run = ingest_and_validate(source, tmp_path / "ws", validate_config())
    assert not run.result.passed
    assert any("'solo'" in p and "min_images_per_class=5" in p for p in run.result.problems)
    assert run.result.out_manifest is None and not (tmp_path / "ws" / "data" / "validated.csv").exists()


def test_empty_class_folder_fails_the_run(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    (source / "c").mkdir()
    (source / "c" / ".DS_Store").write_bytes(b"Bud1")  # a folder with only clutter in it is empty too
    run = ingest_and_validate(source, tmp_path / "ws", validate_config())
    assert any("'c'" in p and "empty class folder" in p for p in run.result.problems)
    assert not run.result.passed


def test_class_imbalance_above_limit_fails_the_run(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"big": 30, "small": 5})
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(max_class_imbalance=4))
    assert any("'small'" in p and "max_class_imbalance=4" in p for p in run.result.problems)
    relaxed = ingest_and_validate(source, tmp_path / "ws2", validate_config(max_class_imbalance=7))
    assert relaxed.result.passed, relaxed.result.problems


def test_unexpected_and_missing_labels_fail_the_run(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6, "surprise": 6})
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(), classes=["a", "b", "wanted"])
    problems = "\n".join(run.result.problems)
    assert "'surprise'" in problems and "not in ingest.classes" in problems
    assert "'wanted'" in problems and "no file has this label" in problems


def test_too_many_bad_files_fails_even_under_quarantine(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    for i in range(3):
        (source / "a" / f"broken_{i}.jpg").write_text("nope")
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(max_bad_fraction=0.1))
    assert not run.result.passed
    assert any("3 of 15 files" in p and "max_bad_fraction" in p for p in run.result.problems)
    assert len(run.quarantine()) == 3  # still says which files were bad


def test_cross_split_duplicate_keeps_only_the_train_copy(tmp_path: Path):
    source = tmp_path / "src"
    make_classes(source / "train", {"a": 6, "b": 6})
    make_classes(source / "val", {"a": 3, "b": 3}, start_seed=5000)
    make_classes(source / "test", {"a": 3, "b": 3}, start_seed=7000)  # 6000+: val/b's noise
    shutil.copy(source / "train" / "a" / "a_000.jpg", source / "val" / "a" / "leaked.jpg")
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(min_images_per_class=3))
    assert "no_cross_split_copy" in run.reason("leaked.jpg") and "train/a/a_000.jpg" in run.reason("leaked.jpg")
    assert run.reason("a_000.jpg") == ""
    assert run.result.passed


# --- real data ---------------------------------------------------------------------------------


def test_real_flower_duplicate_under_two_labels_is_quarantined(tmp_path: Path):
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found")
    source = tmp_path / "flowers"
    for name in ["roses", "tulips"]:
        copy_subset(FLOWERS / name, source / name, 8)
        shutil.copy2(FLOWERS / name / "15922772266_1167a06620.jpg", source / name)
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(max_bad_fraction=0.2))
    q = run.quarantine()
    assert sorted(q["label"]) == ["roses", "tulips"]
    assert (q["checks"] == "no_label_conflict").all() and q["path"].str.endswith("15922772266_1167a06620.jpg").all()
    assert run.result.passed and run.result.valid == 16


def test_hymenoptera_keeps_its_split_and_quarantines_the_placeholder_gif(tmp_path: Path):
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not found")
    before = tree_digest(HYMENOPTERA)
    run = ingest_and_validate(HYMENOPTERA, tmp_path / "ws", validate_config(min_images_per_class=10))
    assert tree_digest(HYMENOPTERA) == before
    manifest = pd.read_csv(run.ingest.manifest_path, keep_default_na=False)
    from_val = manifest["path"].str.contains("/raw/val/")
    assert from_val.sum() == 153 and set(manifest.loc[from_val, "split"]) == {"val"}
    assert set(manifest.loc[~from_val, "split"]) == {"train", "test"}
    assert "format GIF is not in validate.allowed_formats" in run.reason("imageNotFound.gif")
    assert run.result.quarantined == 1 and run.result.passed, run.result.problems
    assert run.result.valid == 397


# --- inputs ------------------------------------------------------------------------------------


def test_stale_ingest_report_is_rejected(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    run = ingest_and_validate(source, tmp_path / "ws", validate_config())
    manifest = pd.read_csv(run.ingest.manifest_path, keep_default_na=False, dtype=str)
    manifest.loc[0, "label"] = "b" if manifest.loc[0, "label"] == "a" else "a"
    manifest.to_csv(run.ingest.manifest_path, index=False)
    with pytest.raises(ValidateInputError, match="rerun ingest"):
        validate_in(
            validate_config(), run.ingest.manifest_path, run.ingest.report_path, tmp_path / "v.csv", tmp_path / "r"
        )


def test_cli_missing_manifest_exits_2_without_traceback(tmp_path: Path, capsys, monkeypatch):
    import pyarrow as pa

    chosen: list[pa.MemoryPool] = []
    monkeypatch.setattr(pa, "set_memory_pool", chosen.append)  # the test process keeps its own pool
    params = tmp_path / "params.yaml"
    params.write_text("validate:\n  policy: quarantine\n")
    code = validate.main(
        [
            "--params",
            str(params),
            "--manifest",
            str(tmp_path / "nope.csv"),
            "--out-manifest",
            str(tmp_path / "v.csv"),
            "--report-dir",
            str(tmp_path / "r"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "not found" in err and "Traceback" not in err
    # The stage's Arrow buffers come from the C allocator: mimalloc kept freed pages (issue 24).
    assert [pool.backend_name for pool in chosen] == ["system"]


def test_the_cli_takes_its_path_flags_and_defaults_from_the_paths_table():
    """The flags dvc.yaml and people use, with the defaults of components/core/paths.py's ValidatePaths."""
    parser = validate.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {"--params", "--manifest", "--ingest-report", "--out-manifest", "--report-dir"} <= flags
    assert ValidatePaths.from_args(parser.parse_args([])) == ValidatePaths()
    given = ValidatePaths.from_args(parser.parse_args(["--ingest-report", "elsewhere/ingest.json"]))
    assert given.ingest_report == Path("elsewhere/ingest.json") and given.manifest == ValidatePaths().manifest


# --- hand-offs through the contracts (issue 11) ----------------------------------------------------


def test_summary_is_the_validation_summary_contract_with_the_quarantined_count(defects):
    from components.core.contracts import ValidationSummary

    run, _, _ = defects
    summary = ValidationSummary.read(run.result.summary_path)  # what evaluate's model card reads
    assert summary.counts.quarantined == run.result.quarantined > 0
    assert summary.ingest["refused_count"] == 0


def test_an_ingest_report_missing_a_field_is_refused_naming_it(tmp_path: Path):
    import json

    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    run = ingest_and_validate(source, tmp_path / "ws", validate_config())
    report = json.loads(run.ingest.report_path.read_text())
    del report["class_folders"]
    run.ingest.report_path.write_text(json.dumps(report))
    with pytest.raises(ValidateInputError, match="class_folders"):
        validate_in(
            validate_config(), run.ingest.manifest_path, run.ingest.report_path, tmp_path / "v.csv", tmp_path / "r"
        )


def test_entries_ingest_refused_are_a_warning_in_the_summary(tmp_path: Path):
    source = make_classes(tmp_path / "src", {"a": 6, "b": 6})
    (tmp_path / "secret.txt").write_text("outside the source")
    (source / "a" / "escape.jpg").symlink_to(tmp_path / "secret.txt")
    run = ingest_and_validate(source, tmp_path / "ws", validate_config())
    assert run.result.passed
    assert run.summary["ingest"]["refused_count"] == 1
    assert any("ingest refused 1 entry" in w for w in run.summary["warnings"])


# --- near-duplicates (issue 13): resized copies the byte check cannot see ----------------------------


def scene(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth random picture (blobs of colour), like a photo at thumbnail scale."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)


def near_duplicate_source(root: Path) -> Path:
    """train/val/test folders of distinct images, plus two planted near-duplicates (half size, JPEG quality 40):
    `leak_*` the same photo in train and val under one label, `conflict_*` one photo under labels a and b."""
    make_classes(root / "train", {"a": 6, "b": 6})
    make_classes(root / "val", {"a": 3, "b": 3}, start_seed=5000)
    make_classes(root / "test", {"a": 3, "b": 3}, start_seed=7000)  # 6000+: val/b's noise
    for seed, first, second in (
        (1, "train/a/leak_big.jpg", "val/a/leak_small.jpg"),
        (2, "train/a/conflict_big.jpg", "train/b/conflict_small.jpg"),
    ):
        picture = scene(seed)
        picture.save(root / first, "JPEG", quality=90)
        picture.resize((80, 60), Image.Resampling.LANCZOS).save(root / second, "JPEG", quality=40)
    return root


def near_config(**near) -> ValidateConfig:
    return validate_config(
        min_images_per_class=3,
        max_bad_fraction=0.2,
        near_duplicates=NearDuplicatesConfig(**{"embeddings": False, **near}),
    )


@pytest.fixture(scope="module")
def near_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return near_duplicate_source(tmp_path_factory.mktemp("near") / "src")


def by_name(csv: Path) -> pd.DataFrame:
    frame = pd.read_csv(csv, keep_default_na=False)
    return frame.set_index(frame["path"].map(lambda p: Path(p).name))


def test_a_resized_copy_in_another_split_moves_to_the_split_of_the_smaller_hash(
    near_source: Path, tmp_path: Path, workspace_cache: Path
):
    run = ingest_and_validate(near_source, tmp_path / "ws", near_config())
    assert run.result.passed, run.result.problems
    manifest, validated = by_name(run.ingest.manifest_path), by_name(run.result.out_manifest)
    assert manifest.loc["leak_big.jpg", "split"] == "train" and manifest.loc["leak_small.jpg", "split"] == "val"
    leak = manifest.loc[["leak_big.jpg", "leak_small.jpg"]]
    target = leak.sort_values("sha256")["split"].iloc[0]
    assert validated.loc["leak_big.jpg", "split"] == validated.loc["leak_small.jpg", "split"] == target
    others = manifest.index.difference(["leak_big.jpg", "leak_small.jpg", "conflict_big.jpg", "conflict_small.jpg"])
    assert (validated.loc[others, "split"] == manifest.loc[others, "split"]).all()  # nothing else moves
    counts = run.summary["near_duplicates"]["counts"]
    assert counts["cross_split"] == 1 and counts["moved_images"] == 1 and counts["groups"] == 2
    assert run.summary["near_duplicates"]["moved"][0]["to"] == target
    assert run.result.near_duplicates["moved_images"] == 1
    # The summary's per-split counts and the validated version describe the moved rows.
    assert run.summary["counts"]["per_split"]["train"]["a"] == int(
        (validated["split"].eq("train") & validated["label"].eq("a")).sum()
    )
    moved_version = run.result.validated_version
    reported = ingest_and_validate(near_source, tmp_path / "ws2", near_config(policy="report"))
    assert by_name(reported.result.out_manifest).loc["leak_small.jpg", "split"] == "val"
    assert reported.summary["near_duplicates"]["counts"]["cross_split"] == 1
    assert moved_version != reported.result.validated_version
    assert (run.result.summary_path.parent / validate.NEAR_DUPLICATE_PICTURE).is_file()
    assert workspace_cache.is_file()  # hashed once per content, under the workspace root


def test_a_resized_copy_under_another_label_is_quarantined_naming_the_other(near_source: Path, tmp_path: Path):
    run = ingest_and_validate(near_source, tmp_path / "ws", near_config())
    assert "no_near_duplicate_label_conflict" in run.reason("conflict_big.jpg")
    assert "b/conflict_small.jpg (b)" in run.reason("conflict_big.jpg")
    assert "a/conflict_big.jpg (a)" in run.reason("conflict_small.jpg")
    validated = by_name(run.result.out_manifest)
    assert "conflict_big.jpg" not in validated.index and "conflict_small.jpg" not in validated.index
    assert run.result.quarantined == 2 and run.summary["counts"]["quarantined"] == 2
    assert run.summary["near_duplicates"]["counts"]["label_conflicts"] == 1
    assert run.summary["counts"]["per_class"] == {"a": 12 + 2, "b": 12}  # the leak pair kept, both conflict copies gone


def test_near_duplicate_policy_off_leaves_every_row_where_it_was(
    near_source: Path, tmp_path: Path, workspace_cache: Path
):
    run = ingest_and_validate(near_source, tmp_path / "ws", near_config(policy="off"))
    manifest, validated = by_name(run.ingest.manifest_path), by_name(run.result.out_manifest)
    assert run.result.passed and run.result.quarantined == 0
    assert validated["split"].to_dict() == manifest["split"].to_dict()
    assert run.summary["near_duplicates"]["policy"] == "off" and run.summary["near_duplicates"]["counts"]["groups"] == 0
    assert (
        not (run.result.summary_path.parent / validate.NEAR_DUPLICATE_PICTURE).exists() and not workspace_cache.exists()
    )


def test_near_duplicate_fail_policy_exits_2_and_the_report_prints_the_counts(near_source: Path, tmp_path: Path, capsys):
    run = ingest_and_validate(near_source, tmp_path / "ws", near_config())
    capsys.readouterr()
    args = [
        "--manifest",
        str(run.ingest.manifest_path),
        "--ingest-report",
        str(run.ingest.report_path),
        "--out-manifest",
        str(tmp_path / "v.csv"),
        "--report-dir",
        str(tmp_path / "r"),
    ]
    params = tmp_path / "params.yaml"
    params.write_text(
        "validate:\n  min_images_per_class: 3\n  max_bad_fraction: 0.2\n"
        "  near_duplicates:\n    policy: fail\n    embeddings: false\n"
    )
    code = validate.main(["--params", str(params), *args])
    text = capsys.readouterr().out
    assert code == 2 and "FAILED" in text and not (tmp_path / "v.csv").exists()
    assert any(
        "leak: near-duplicates in splits train, val" in line and "leak_small.jpg" in line for line in text.splitlines()
    )
    assert "near-duplicates (fail): 2 group(s) of 4 images: 1 across splits" in text
    params.write_text(
        "validate:\n  min_images_per_class: 3\n  max_bad_fraction: 0.2\n  near_duplicates:\n    embeddings: false\n"
    )
    assert validate.main(["--params", str(params), *args]) == 0
    assert "1 across splits (1 image(s) moved), 1 under 2+ labels (2 quarantined)" in capsys.readouterr().out


def test_a_manifest_row_outside_the_ingested_folder_is_never_read(near_source: Path, tmp_path: Path):
    """An untrusted manifest cannot make validate open a file elsewhere (here a near-duplicate under label b),
    even with an ingest report edited to match it: the report's raw_dir bounds what is read."""
    from components.core.contracts import IngestReport
    from components.core.hashing import file_sha256, records_version
    from components.quality.validation_inputs import relative_records

    run = ingest_and_validate(near_source, tmp_path / "ws", near_config())
    outside = tmp_path / "elsewhere" / "copy.jpg"
    outside.parent.mkdir()
    scene(1).resize((96, 72), Image.Resampling.LANCZOS).save(outside, "JPEG", quality=50)  # not byte-identical
    manifest = pd.read_csv(run.ingest.manifest_path, keep_default_na=False, dtype=str)
    row = manifest[manifest["path"].str.endswith("leak_big.jpg")].iloc[0].copy()
    row["path"], row["label"], row["sha256"] = outside.as_posix(), "b", file_sha256(outside)
    edited = pd.concat([manifest, row.to_frame().T])
    edited.to_csv(tmp_path / "ws" / "data" / "edited.csv", index=False)
    ingested = IngestReport.read(run.ingest.report_path)
    version = records_version(relative_records(edited, ingested.raw_dir))
    ingested.model_copy(update={"data_version": version}).write(tmp_path / "edited.json")
    result = validate_in(
        near_config(),
        tmp_path / "ws" / "data" / "edited.csv",
        tmp_path / "edited.json",
        tmp_path / "v.csv",
        tmp_path / "r",
    )
    assert result.passed and result.near_duplicates["label_conflicts"] == 1  # the in-folder conflict only
    assert any("1 row(s) outside the ingested image folder" in w for w in result.warnings), (
        result.warnings,
        result.quarantined_files,
    )
    assert outside.as_posix() not in pd.read_csv(result.quarantine_path)["path"].tolist()


def test_images_are_read_only_under_the_ingested_folder_else_the_manifests_folder(tmp_path: Path):
    from components.core.contracts import IngestReport
    from components.quality.validation_inputs import image_root, within

    manifest = tmp_path / "data" / "manifest.csv"
    assert image_root(IngestReport.model_construct(raw_dir="data/raw"), manifest) == Path("data/raw")
    assert image_root(IngestReport.model_construct(raw_dir=""), manifest) == manifest.parent
    root, secret = tmp_path / "raw", tmp_path / "secret.jpg"
    (root / "a").mkdir(parents=True)
    secret.write_bytes(b"outside")
    (root / "a" / "link.jpg").symlink_to(secret)
    assert within(str(root / "a" / "x.jpg"), root)
    assert not within(str(root / "a" / "link.jpg"), root)  # links are resolved first
    assert not within(str(root / ".." / "secret.jpg"), root) and not within(str(secret), root)


# --- names from the source are text, never markup -----------------------------------------------

XSS_LABEL = "<img src=x onerror=alert(1)>"
XSS_FILE = "<svg onload=alert(2)>.jpg"
AMP_LABEL = "Q&A 'x'"  # markup characters a label may still hold


def test_a_file_named_like_html_is_text_in_the_data_docs(tmp_path: Path):
    """Real ingest + validate: a label and a bad file's name appear in the Data Docs, escaped, never as tags.

    A class folder named like a tag no longer gets that far (labels hold no `<` or `>`, test_sources), so
    the file name carries the markup here and the label the characters that still need escaping."""
    with pytest.raises(BadLabel):
        clean_label(XSS_LABEL)
    source = make_classes(tmp_path / "src", {"a": 6, AMP_LABEL: 2})  # too few images: the class fails a check
    (source / AMP_LABEL / XSS_FILE).write_text("not an image")  # quarantined: its path is in the failed rows
    run = ingest_and_validate(source, tmp_path / "ws", validate_config(max_bad_fraction=0.2))
    assert any(AMP_LABEL in p and "min_images_per_class" in p for p in run.result.problems)
    assert "decodes" in run.reason(XSS_FILE)
    pages = {p: p.read_text(encoding="utf-8") for p in run.result.data_docs.parent.rglob("*.html")}
    assert len(pages) >= 4
    for page, text in pages.items():
        assert "<svg" not in text and AMP_LABEL not in text, page
    shown = "\n".join(pages.values())
    assert "&lt;svg onload=alert(2)&gt;.jpg" in shown and "Q&amp;A" in shown


def test_mathtext_in_a_label_and_a_file_name_draws_in_the_near_duplicate_picture(tmp_path: Path):
    """`$^^$` is a matplotlib mathtext error: a near-duplicate pair under that label and file name still draws."""
    source = make_classes(tmp_path / "src", {"a": 6, "$^^$": 6})
    picture = scene(3)
    picture.save(source / "a" / "$^^$.jpg", "JPEG", quality=90)
    picture.resize((80, 60), Image.Resampling.LANCZOS).save(source / "$^^$" / "copy.jpg", "JPEG", quality=40)
    run = ingest_and_validate(source, tmp_path / "ws", near_config())
    assert "no_near_duplicate_label_conflict" in run.reason("$^^$.jpg")
    drawn = run.result.summary_path.parent / validate.NEAR_DUPLICATE_PICTURE
    assert drawn.read_bytes()[:4] == b"\x89PNG"


def _run_one_suite(docs: Path) -> validation_suites.Suites:
    """One tiny suite run through its Checkpoint, as run_validate runs each suite."""
    import great_expectations.expectations as gxe

    check = validation_checks.Check(
        "width_positive",
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1, meta={"check": "width_positive"}),
        lambda r: "width below 1",
        "file",
    )
    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "width": [10, 0]}).set_index("path", drop=False)
    suites = validation_suites.Suites(docs)
    result = suites.run("files", frame, [check], "path")
    failures = validation_suites.collect_failures(result, [check], frame, "path")
    assert [item["path"] for f in failures for item in f.items] == ["b.jpg"]
    return suites


def test_the_checkpoint_update_data_docs_action_builds_the_data_docs(tmp_path: Path, monkeypatch):
    """Each suite runs as a GX Checkpoint whose UpdateDataDocsAction writes the pages; nothing else builds them."""
    suites = _run_one_suite(tmp_path / "docs")
    (checkpoint,) = suites.context.checkpoints.all()
    assert checkpoint.name == "files"
    assert [type(a).__name__ for a in checkpoint.actions] == ["UpdateDataDocsAction"]
    assert checkpoint.actions[0].site_names == [validation_suites.DATA_DOCS_SITE]
    (page,) = (tmp_path / "docs" / "validations" / "files").rglob("*.html")
    assert "b.jpg" in page.read_text(encoding="utf-8")  # the failing row, from this run's result
    assert "validations/files/" in (tmp_path / "docs" / "index.html").read_text(encoding="utf-8")

    monkeypatch.setattr(validation_suites, "checkpoint_actions", lambda: [])  # the same run without the action
    _run_one_suite(tmp_path / "no_action")
    assert not (tmp_path / "no_action").exists()
