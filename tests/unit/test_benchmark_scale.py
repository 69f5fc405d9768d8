"""The scale benchmark's image sets and fits (benchmarks/scale.py), without running a stage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from benchmarks import scale
from benchmarks.scale_images import available, list_photos, make_image_set
from benchmarks.workspace import git

PHOTOS_PER_CLASS = 3


def digests(root: Path) -> dict[str, str]:
    found = [p for p in root.rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in found}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "source"
    for label in ("daisy", "roses"):
        (root / label).mkdir(parents=True)
        for i in range(PHOTOS_PER_CLASS):
            pixels = rng.integers(0, 256, size=(36, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}{i}.jpg", quality=95)
    return root


def test_every_view_is_a_distinct_file_of_its_photos_class(source: Path, tmp_path: Path) -> None:
    before = digests(source)
    count = available(list_photos(source))  # originals, 4 quadrants and 9 grid cells of each photo
    assert count == 2 * PHOTOS_PER_CLASS * 14
    make_image_set(source, tmp_path / "set", count)
    made = digests(tmp_path / "set")
    assert len(made) == count and len(set(made.values())) == count  # distinct bytes, none overwritten
    for name in made:
        label, file = name.split("/")
        assert file.split("_g")[0].removesuffix(".jpg") in {p.stem for p in (source / label).iterdir()}
    assert digests(source) == before  # the source is only read
    assert set(made.values()) >= set(before.values())  # the originals are in the set, as they were


def test_a_smaller_set_is_the_start_of_a_larger_one(source: Path, tmp_path: Path) -> None:
    make_image_set(source, tmp_path / "small", 10)
    make_image_set(source, tmp_path / "large", 20)
    small, large = digests(tmp_path / "small"), digests(tmp_path / "large")
    assert len(small) == 10 and small.items() <= large.items()
    assert {name.split("/")[0] for name in small} == {"daisy", "roses"}  # the crops are spread over the classes


def test_the_set_is_never_written_into_the_source_and_not_beyond_it(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside the source"):
        make_image_set(source, source / "daisy" / "more", 6)
    with pytest.raises(ValueError, match="available"):
        make_image_set(source, tmp_path / "set", 2 * PHOTOS_PER_CLASS * 14 + 1)
    assert not (source / "daisy" / "more").exists() and not (tmp_path / "set").exists()


def test_the_fit_recovers_a_known_exponent_and_extrapolates_along_it() -> None:
    images = [3670.0, 18000.0, 37000.0]
    seconds = [0.002 * n**1.3 for n in images]
    assert scale.growth_exponent(images, seconds) == pytest.approx(1.3, abs=1e-9)
    linear = [5.0 + 0.01 * n for n in images]  # 5 s start-up, then 100 images/s
    assert scale.fixed_seconds(images, linear) == pytest.approx(5.0)
    one = scale.extrapolate(images, linear, 1.0, 1_000_000)
    assert one == pytest.approx(5.0 + 0.01 * 1_000_000)
    assert scale.extrapolate(images, linear, 1.0, 1_000_000, workers=4) == pytest.approx(5.0 + 0.01 * 250_000)


def test_targets_are_marked_from_the_measured_numbers() -> None:
    def size(n: int, head_s: float, head_rss: float) -> dict:
        flat = {"seconds": n / 100, "peak_rss_mb": 300.0}
        stages = {stage: dict(flat) for stage in scale.STAGES}
        stages["train_head"] = {"seconds": head_s, "peak_rss_mb": head_rss}
        return {"images": n, "stages": stages}

    summary = scale.summarize([size(1000, 10.0, 1000.0), size(4000, 80.0, 1500.0)])  # k = 1.5, memory x1.5
    assert summary["ingest"]["exponent_met"] and summary["ingest"]["memory_met"]
    assert summary["train_head"]["exponent"] == pytest.approx(1.5, abs=0.01)
    assert not summary["train_head"]["exponent_met"] and not summary["train_head"]["memory_met"]
    assert "exponent_met" not in summary["augment"]  # no target
    assert summary["train_head"]["memory_of"] == "process tree with dvc"


def test_memory_is_judged_on_the_stage_process_where_it_was_measured() -> None:
    def size(n: int, stage_rss: float, tree_rss: float) -> dict:
        row = {"seconds": n / 100, "stage_rss_mb": stage_rss, "peak_rss_mb": tree_rss}
        return {"images": n, "stages": {"ingest": dict(row), "validate": dict(row)}}

    summary = scale.summarize([size(1000, 100.0, 150.0), size(4000, 110.0, 300.0)])  # dvc grew, the stage did not
    assert set(summary) == {"ingest", "validate"}  # stages not run are left out
    assert summary["ingest"]["memory_ratio"] == pytest.approx(1.1) and summary["ingest"]["memory_met"]
    assert summary["ingest"]["tree_memory_ratio"] == pytest.approx(2.0)


def test_each_stage_command_is_wrapped_to_record_its_own_peak_memory(tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    stages = {name: {"cmd": f"python -m components.{name} --x y"} for name in ("ingest", "validate")}
    (workspace / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    git(workspace, "init", "-q")
    git(workspace, "config", "user.email", "bench@transfer-pipeline.local")
    git(workspace, "config", "user.name", "transfer-pipeline")
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "workspace")
    scale.wrap_commands(workspace, ("ingest",), tmp_path)
    spec = yaml.safe_load((workspace / "dvc.yaml").read_text())
    cmds = {name: stage["cmd"] for name, stage in spec["stages"].items()}
    assert cmds["ingest"] == f"/usr/bin/time -f %M -o {tmp_path / 'ingest.rss'} python -m components.ingest --x y"
    assert cmds["validate"] == "python -m components.validate --x y"
    assert not git(workspace, "status", "--porcelain")  # committed, as a user's change would be
    (tmp_path / "ingest.rss").write_text("Command exited with non-zero status 1\n204800\n")
    assert scale._stage_rss(tmp_path, "ingest") == 200.0


def test_the_feature_pass_and_label_issue_times_are_read_from_the_stamped_log(tmp_path: Path) -> None:
    log = tmp_path / "train_head.log"
    lines = [
        (0.8, "Running stage 'train_head':"),
        (18.8, "features: onnxruntime, 1 replica(s) (ONNX Runtime, 2 threads, x.onnx)"),
        (19.0, "features: 36 images, as is"),
        (25.5, "onnxruntime: 100%|##########| 2/2 [00:06<00:00,  3.16batch/s]"),
        (25.6, "features: 6 images, as is"),
        (31.0, "onnxruntime: 100%|##########| 1/1 [00:05<00:00, 18.96batch/s]"),
        (33.3, "label issues: folds: 5/5 folds (2 s)"),
        (33.4, "label issues: 3 suspect(s) (1 val, 1 test, 1 train), 0 training image(s) excluded, 2.3 s"),
        (34.0, "Epoch 1/3"),
    ]
    log.write_text("".join(f"{t:8.1f} {text}\n" for t, text in lines))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "validated.csv").write_text("path,label,split\na.jpg,x,train\nb.jpg,y,val\n")
    facts = scale.stage_facts(tmp_path, "train_head", log)
    assert facts == {"images": 2, "feature_pass_s": 12.0, "label_issues_s": 2.3}


def test_embeddings_can_be_left_out_of_validate_keeping_the_dry_run_settings() -> None:
    args = scale.build_parser().parse_args(["--dry-run", "--no-embeddings", "--head-epochs", "2"])
    settings = scale.run_settings(args)
    assert settings["validate"]["near_duplicates"] == {"embeddings": False}
    assert settings["validate"]["min_images_per_class"] == 3 and settings["train_head"] == {"epochs": 2}
    assert scale.DRY_SETTINGS == {"validate": {"min_images_per_class": 3}}  # the constant is not changed
    assert "validate" not in scale.run_settings(scale.build_parser().parse_args([]))
