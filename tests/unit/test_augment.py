"""The augment stage: policy mistakes fail loudly by key; the saved pipeline is the one previewed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from components.augment import main, run_augment
from components.core.config import ParamsError
from components.core.paths import AugmentPaths
from components.core.stage_config import AugmentConfig
from components.modeling.transforms import build_pipeline, load_pipeline, save_pipeline
from tests.modelkit import tiny_params, write_manifest


def test_unknown_transform_error_names_its_policy_index():
    policy = [{"HorizontalFlip": {"p": 0.5}}, {"HorizontalFlipp": {"p": 0.5}}]
    with pytest.raises(ParamsError, match=r"augment\.policy\[1\].*HorizontalFlipp.*did you mean 'HorizontalFlip'"):
        build_pipeline(policy, seed=0)


def test_unknown_argument_is_an_error_not_a_silent_warning():
    # albumentations 2 would only warn and drop `value=` (renamed `fill=`); a policy must not lie.
    policy = [{"HorizontalFlip": {"p": 0.5}}, {"Affine": {"rotate": [-10, 10], "value": 0}}]
    with pytest.raises(ParamsError, match=r"augment\.policy\[1\] \(Affine\).*value"):
        build_pipeline(policy, seed=0)


def test_bad_argument_value_names_its_policy_index():
    with pytest.raises(ParamsError, match=r"augment\.policy\[0\] \(Affine\)"):
        build_pipeline([{"Affine": {"scale": "big"}}], seed=0)


def test_saved_pipeline_reloads_and_repeats_the_same_augmentations_for_a_seed(tmp_path: Path):
    policy = AugmentConfig().policy
    save_pipeline(build_pipeline(policy, seed=3), tmp_path / "policy.json")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    first = [load_pipeline(tmp_path / "policy.json", seed=5)(image=image)["image"] for _ in range(2)]
    pipeline = load_pipeline(tmp_path / "policy.json", seed=5)
    again = [pipeline(image=image)["image"] for _ in range(4)]
    np.testing.assert_array_equal(first[0], again[0])
    assert any(not np.array_equal(again[0], other) for other in again[1:])  # not a no-op


def test_stage_writes_the_policy_and_a_preview_of_training_images(tmp_path: Path):
    manifest = write_manifest(tmp_path)
    result = run_augment(
        tiny_params(project={"seed": 1}, augment={"preview_images": 6}),
        AugmentPaths(
            manifest=manifest,
            policy_out=tmp_path / "models/augment/policy.json",
            preview=tmp_path / "reports/augment/preview.png",
        ),
    )
    assert result.transforms == 3 and result.preview_images == 6
    reloaded = load_pipeline(result.policy_path, seed=0)
    assert [type(t).__name__ for t in reloaded.transforms] == ["HorizontalFlip", "Affine", "RandomBrightnessContrast"]
    assert result.preview_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_a_bad_policy_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    manifest = write_manifest(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"augment": {"policy": [{"RandomCropp": {"height": 8, "width": 8}}]}}))
    code = main(
        [
            "--params",
            str(params),
            "--manifest",
            str(manifest),
            "--policy-out",
            str(tmp_path / "p.json"),
            "--preview",
            str(tmp_path / "preview.png"),
        ]
    )
    assert code == 2
    assert "augment.policy[0]" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_cli_path_flags_default_to_the_paths_table():
    from components.augment import build_parser

    assert AugmentPaths.from_args(build_parser().parse_args([])) == AugmentPaths()
    assert AugmentPaths.from_args(build_parser().parse_args(["--preview", "p.png"])).preview == Path("p.png")
