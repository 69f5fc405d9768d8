"""The model folder's classes.json, read and written through `ClassNames`: the file as it always was, a bad one
refused with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core.contracts import ContractError
from components.modeling.model_folder import ClassNames, read_model_info


def test_classes_json_keeps_its_format_and_order(tmp_path: Path) -> None:
    path = ClassNames(["tulips", "daisy"]).write(tmp_path / "classes.json")
    assert path.read_text(encoding="utf-8") == '[\n  "tulips",\n  "daisy"\n]\n'  # the output order, never sorted
    assert ClassNames.read(path).root == ["tulips", "daisy"]


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"classes": ["a"]}', "expected a non-empty list of class names"),
        ("[]", "expected a non-empty list of class names"),
        ('["a", 3]', "expected a non-empty list of class names"),
        ('["a", ', "not readable as JSON"),
    ],
)
def test_a_bad_classes_json_is_refused_naming_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "classes.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ContractError, match=problem) as caught:
        ClassNames.read(path)
    assert str(path) in str(caught.value)


def test_a_model_folder_without_classes_json_says_to_run_the_training_stages(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="classes.json not found: run the training stages first"):
        read_model_info(tmp_path)
