"""The augmentation policy as an albumentations pipeline: built from params, saved, loaded re-seeded.

Shared by the augment stage (which builds and saves it), the input pipelines in `components.modeling.data`
(which load it once per worker) and preflight (which builds it to check the settings).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import albumentations as A

from components.core.config import ParamsError
from components.core.files import atomic_file


def _transform_class(name: str, key: str) -> type:
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        known = [n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)]
        hint = difflib.get_close_matches(name, known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ParamsError(f"{key}: unknown albumentations transform '{name}'{suggestion}")
    return cls


def build_pipeline(policy: list[dict[str, dict[str, Any]]], seed: int) -> A.Compose:
    """A seeded Compose from `augment.policy`; any unknown name or argument is a ParamsError."""
    transforms = []
    for i, item in enumerate(policy):
        key = f"augment.policy[{i}]"
        if not isinstance(item, dict) or len(item) != 1:
            raise ParamsError(f"{key}: expected one {{TransformName: {{argument: value}}}} mapping")
        ((name, args),) = item.items()
        cls = _transform_class(name, key)
        try:
            # strict=True: albumentations 2 otherwise drops unknown arguments with only a warning.
            transforms.append(cls(**(args or {}), strict=True))
        except (TypeError, ValueError) as exc:
            raise ParamsError(f"{key} ({name}): {exc}") from None
    return A.Compose(transforms, seed=seed)


def save_pipeline(pipeline: A.Compose, path: str | Path) -> None:
    with atomic_file(path) as fh:
        A.save(pipeline, fh, data_format="json")


def load_pipeline(path: str | Path, seed: int) -> A.Compose:
    """The saved pipeline, re-seeded (the seed is not part of albumentations' serialization)."""
    with open(path, encoding="utf-8") as fh:
        pipeline = A.load(fh, data_format="json")
    pipeline.set_random_seed(seed)
    return pipeline
