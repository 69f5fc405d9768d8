"""The model card: the quarantined count from validate's summary, the request format, the metrics."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import mistune
import numpy as np

from components.core.contracts import ModelRunInfo, ValidationSummary
from components.modeling.metrics import compute_metrics
from components.scoring.model_card import model_card, quarantined_count, split_counts
from tests.evalkit import CLASSES, run_info, write_manifest, write_stage_reports


def _card(
    tmp_path: Path,
    summary: ValidationSummary | None,
    settings: dict | None = None,
    classes: list[str] = CLASSES,
    reasons: tuple[str, ...] = ("pass: accuracy",),
    **info_fields,
) -> str:
    metrics = compute_metrics(np.array([0, 1, 2]), np.eye(3), classes)
    info = ModelRunInfo(
        **{**run_info(classes), **({"settings": settings} if settings is not None else {}), **info_fields},
        model_sha256="ab" * 32,
    )
    return model_card(
        "image-classifier",
        classes,
        info,
        metrics,
        split_counts(write_manifest(tmp_path, classes)),
        {"backbone": "tiny"},
        quarantined_count(summary),
        True,
        list(reasons),
        "3",
    )


def test_quarantined_count_from_the_validation_summary_is_on_the_card(tmp_path: Path) -> None:
    write_stage_reports(tmp_path, quarantined=7)
    summary = ValidationSummary.read(tmp_path / "reports" / "validation" / "summary.json")
    assert quarantined_count(summary) == 7
    card = _card(tmp_path, summary)
    assert "- files quarantined by validation: 7\n" in card
    assert "v3" in card and "decision: champion" in card


def test_card_says_n_a_only_without_a_validation_summary(tmp_path: Path) -> None:
    assert "files quarantined by validation: n/a (no validation summary)" in _card(tmp_path, None)


def test_card_describes_the_served_input_as_image_data_not_paths(tmp_path: Path) -> None:
    card = _card(tmp_path, None)
    assert "raw bytes, or base64" in card and "path" not in card.split("## Intended use")[1].split("##")[0]


def test_recipe_comes_from_the_model_folders_settings_not_todays_params(tmp_path: Path) -> None:
    trained_with = {
        "seed": 7,
        "finetune": {"learning_rate": 0.000123, "epochs": 3},
        "model": {"backbone": "mobilenet_v2", "image_size": 96},
        "train_head": {"epochs": 2},
    }
    card = _card(tmp_path, None, trained_with)
    recipe = card.split("## Training recipe")[1].split("##")[0]
    assert "- fine-tuning: {'learning_rate': 0.000123, 'epochs': 3}" in recipe
    assert "- model settings: {'backbone': 'mobilenet_v2', 'image_size': 96}" in recipe
    assert "- head training: {'epochs': 2}" in recipe and "- seed: 7" in recipe
    # In training order, whatever order run.json holds them in.
    assert (
        recipe.index("- model settings:")
        < recipe.index("- head training:")
        < recipe.index("- fine-tuning:")
        < recipe.index("- seed:")
    )
    assert "# Model card: image-classifier v3" in card


def test_card_says_when_the_model_folder_recorded_no_settings(tmp_path: Path) -> None:
    assert "- settings: not recorded in the model folder" in _card(tmp_path, None, {})


def test_card_says_when_predictions_average_the_mirror_image(tmp_path: Path) -> None:
    assert "mirror" not in _card(tmp_path, None)
    card = _card(tmp_path, None, flip_tta=True, val_accuracy_single_view=0.95, val_accuracy_flip_tta=0.9567)
    assert "mean over the image and its mirror image" in card and "0.9500 without, 0.9567 with" in card


class _Rendered(HTMLParser):
    """The tags of rendered markdown, and its tables as rows of cell texts."""

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.feed(mistune.html(markdown))  # raw HTML passes through, as on most renderers

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")

    def handle_data(self, data: str) -> None:
        if self.tables and self.tables[-1] and self.tables[-1][-1]:
            self.tables[-1][-1][-1] += data.strip()


def test_labels_cannot_forge_table_cells_or_inject_html(tmp_path: Path) -> None:
    forged = "x | 99 |\n| forged | 1.000 | 1.000 | 1.000 | 9 |"
    classes = ["alpha", forged, "<img src=x onerror=alert(1)>", "tail\\"]
    reasons = (f"class {classes[2]} recall fell", "![beacon](http://attacker.invalid/x.png)")
    card = _card(tmp_path, None, classes=classes, reasons=reasons)
    rendered = _Rendered(card)
    assert "img" not in rendered.tags and "a" not in rendered.tags  # no HTML, image or link from a label
    counts, per_class = rendered.tables
    for table in (counts, per_class):
        assert {len(row) for row in table} == {len(table[0])}  # no row gained or lost a cell
    shown = [c.replace("\n", " ") for c in classes]
    assert [row[0] for row in per_class[1:]] == shown
    assert sorted(row[0] for row in counts[1:-1]) == sorted(shown)
    assert not any(line.startswith("| forged") for line in card.splitlines())
    assert "one of 4 classes: alpha, x \\| 99 \\|" in card and "&lt;img src=x onerror=alert(1)&gt;" in card


def test_card_says_when_predictions_also_average_the_central_crop(tmp_path: Path) -> None:
    card = _card(
        tmp_path,
        None,
        flip_tta=True,
        crop_tta=True,
        val_accuracy_single_view=0.8333,
        val_accuracy_flip_tta=0.8333,
        val_accuracy_crop_tta=0.9,
    )
    assert "its central crop and both mirror images" in card and "0.8333 one view, 0.9000 four" in card
    assert "mean over the image and its mirror image (flip" not in card  # one TTA line: the one the model applies
