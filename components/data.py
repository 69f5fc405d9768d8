"""Reading the validated manifest and turning a split into a tf.data pipeline.

Shared by train_head, finetune and evaluate. Images are decoded with Pillow (it handles
grayscale, palette, alpha, 16-bit and CMYK files that validate let through) and resized to the
model's square input; the model itself carries the backbone's normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ["path", "label", "split", "sha256", "bytes", "width", "height", "format", "mode", "source", "error"]


@dataclass(frozen=True)
class Split:
    paths: list[str]
    labels: np.ndarray  # int32 class indices into `classes`
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def read_manifest(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype={"label": str, "split": str, "sha256": str}, keep_default_na=False)
    missing = {"path", "label", "split"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    return frame


def class_names(frame: pd.DataFrame) -> list[str]:
    return sorted(frame["label"].unique().tolist())


def load_split(manifest: str | Path | pd.DataFrame, split: str, classes: list[str] | None = None) -> Split:
    """Paths and integer labels of one split, with classes in sorted order unless given."""
    frame = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    classes = classes or class_names(frame)
    index = {name: i for i, name in enumerate(classes)}
    rows = frame[frame["split"] == split]
    unknown = set(rows["label"]) - set(index)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the model's classes {classes}")
    labels = rows["label"].map(index).to_numpy(dtype=np.int32)
    return Split(rows["path"].tolist(), labels, list(classes))


def load_rgb(path: str | Path, size: int) -> np.ndarray:
    """Decode any Pillow-readable image to a (size, size, 3) uint8 RGB array."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when much larger than needed
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
