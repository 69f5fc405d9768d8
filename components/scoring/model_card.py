"""The model card (reports/evaluate/model_card.md): use, data, recipe, test metrics, limits, promotion."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

import pandas as pd

from components.core.contracts import ModelRunInfo, ValidationSummary, read_manifest

# Characters markdown gives a meaning (emphasis, code, links, table cells, escapes, math): shown literally.
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]|~$!])")


def markdown_text(text: object) -> str:
    """Text from a source (a class name, a reason naming one) as literal markdown on one line.

    Line breaks and other unprintable characters become spaces (a newline would end a table row),
    HTML is escaped (markdown passes raw HTML through), and markdown's own characters get a
    backslash, so a label like `x | 99 |` stays inside its cell.
    """
    one_line = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def split_counts(manifest: str | Path) -> pd.DataFrame:
    """Images per class (rows) and split (columns)."""
    frame = read_manifest(manifest)
    return frame.pivot_table(index="label", columns="split", values="path", aggfunc="count", fill_value=0)


def quarantined_count(summary: ValidationSummary | None) -> int | None:
    """Files validate set aside (None when there is no validation summary, e.g. a hand-made manifest)."""
    return summary.counts.quarantined if summary is not None else None


def markdown_table(counts: pd.DataFrame) -> str:
    columns = [c for c in ("train", "val", "test") if c in counts.columns] + [
        c for c in counts.columns if c not in ("train", "val", "test")
    ]
    header = "| class | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = [
        f"| {markdown_text(label)} | " + " | ".join(str(int(counts.loc[label, c])) for c in columns) + " |"
        for label in counts.index
    ]
    total = "| **all** | " + " | ".join(str(int(counts[c].sum())) for c in columns) + " |"
    return "\n".join([header, *rows, total])


# The params sections train_head/finetune store in run.json (ModelRunInfo.settings), as the card names them.
RECIPE_SECTIONS = {"model": "model settings", "train_head": "head training", "finetune": "fine-tuning", "seed": "seed"}


def tta_lines(info: Any) -> list[str]:
    """The test-time augmentation the saved model applies, with the val accuracies it was kept on."""
    if info.crop_tta and info.val_accuracy_crop_tta is not None:
        return [
            f"- each prediction is the mean over the image, its central crop and both mirror images (crop test-time "
            f"augmentation, 4 times the inference cost; val accuracy {info.val_accuracy_single_view:.4f} one view, "
            f"{info.val_accuracy_crop_tta:.4f} four)"
        ]
    if info.flip_tta and info.val_accuracy_single_view is not None:
        return [
            f"- each prediction is the mean over the image and its mirror image (flip test-time augmentation, "
            f"twice the inference cost; val accuracy {info.val_accuracy_single_view:.4f} without, "
            f"{info.val_accuracy_flip_tta:.4f} with)"
        ]
    return []


def recipe_lines(settings: dict[str, Any]) -> list[str]:
    """The settings the model was trained with, from its own run.json (not today's params.yaml)."""
    if not settings:
        return ["- settings: not recorded in the model folder"]
    order = list(RECIPE_SECTIONS)
    ranked = sorted(settings.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    return [f"- {RECIPE_SECTIONS.get(key, key)}: {value}" for key, value in ranked]


def suspect_line(metrics: dict[str, Any]) -> str:
    """Accuracy without the test images flagged as suspect labels, or why there is none (reported only)."""
    if "n_test_suspects" not in metrics:
        return "- suspect test labels: not checked (train_head's label_issues check did not cover the test split)"
    count = metrics["n_test_suspects"]
    without = metrics.get("accuracy_without_suspects")
    shown = f"{without:.4f}" if without is not None else "n/a (every test image is a suspect)"
    return (
        f"- accuracy without the {count} test image(s) flagged as suspect labels (listed in test_suspects.csv): "
        f"{shown}; the headline accuracy above counts every test image and is what promotion uses"
    )


def model_card(
    registered_model: str,
    classes: list[str],
    info: ModelRunInfo,
    metrics: dict[str, Any],
    counts: pd.DataFrame,
    lineage: dict[str, str],
    quarantined: int | None,
    promoted: bool | None = None,
    reasons: list[str] | None = None,
    version: str | None = None,
) -> str:
    recipe = {
        k: v
        for k, v in info.model_dump(mode="json").items()
        if k not in {"run_id", "head_run_id", "settings", "schema_version", "device"} and v is not None
    }
    weak = [
        f"{markdown_text(name)} (recall {m['recall']:.2f}, {m['support']} test images)"
        for name, m in metrics["per_class"].items()
        if m["recall"] < max(0.8, metrics["accuracy"] - 0.1)
    ]
    per_class = "\n".join(
        f"| {markdown_text(name)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for name, m in metrics["per_class"].items()
    )
    topk = "".join(f"- {k.replace('_', ' ')}: {v:.4f}\n" for k, v in metrics.items() if k.startswith("top_"))
    versions = (
        ", ".join(
            f"{k} {lineage[k]}" for k in ("data_version", "validated_version", "model_data_version") if lineage.get(k)
        )
        or "unknown"
    )
    lines = [
        f"# Model card: {registered_model}" + (f" v{version}" if version else ""),
        "",
        "## Intended use",
        f"Classifies a photo into one of {len(classes)} classes: {', '.join(map(markdown_text, classes))}. "
        "Input: image data (raw bytes, or base64 in a JSON request; JPEG, PNG, BMP or WebP within the served "
        "limits); output: label, its probability and all class probabilities. "
        "It always answers with one of these classes: images of anything else get a confident-looking wrong label. "
        "Not for decisions about people, safety or health.",
        "",
        "## Data",
        f"- data versions: {versions}",
        f"- files quarantined by validation: {'n/a (no validation summary)' if quarantined is None else quarantined}",
        "",
        "Images per class and split:",
        "",
        markdown_table(counts),
        "",
        "## Training recipe",
        f"- backbone: {lineage.get('backbone')} (ImageNet transfer learning: head training, then fine-tuning)",
        *recipe_lines(info.settings),
        f"- from the training run: {recipe}",
        f"- MLflow runs: head {lineage.get('head_run_id', 'n/a')}, fine-tune {lineage.get('finetune_run_id', 'n/a')}",
        f"- code: git {lineage.get('git_commit')}, params sha256 {lineage.get('params_sha256', '')[:16]}",
        f"- model file sha256: {info.model_sha256}",
        "",
        f"## Test metrics (n = {metrics['n_test']} held-out images)",
        f"- accuracy: {metrics['accuracy']:.4f}",
        *tta_lines(info),
        suspect_line(metrics),
        f"- macro F1: {metrics['macro_f1']:.4f}",
        f"- expected calibration error: {metrics['ece']:.4f}"
        + (
            f" (temperature {info.temperature:.3f}, fitted on val, folded into the output layer)"
            if info.temperature != 1.0
            else " (no temperature scaling)"
        ),
        *(
            [f"- images with non-finite (NaN/inf) outputs: {metrics['non_finite_rows']}"]
            if metrics.get("non_finite_rows")
            else []
        ),
        topk,
        "| class | precision | recall | F1 | test images |",
        "|---|---|---|---|---|",
        per_class,
        "",
        "## Known limits",
        *([f"- low recall: {w}" for w in weak] or ["- no class has recall well below the overall accuracy"]),
        f"- metrics come from {metrics['n_test']} test images: with few images per class they are noisy.",
        "- trained on this data set's photos only; other cameras, lighting or domains may score worse.",
    ]
    if promoted is not None:
        lines += [
            "",
            "## Promotion",
            f"- decision: {'champion' if promoted else 'stays challenger'}",
            *[f"- {markdown_text(r)}" for r in reasons or []],  # reasons name classes
        ]
    return "\n".join(lines) + "\n"
