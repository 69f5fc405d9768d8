"""Stage `augment`: turn `augment.policy` into a seeded albumentations pipeline, save it, preview it.

The saved `policy.json` (albumentations' own serialization) is what train_head and finetune load,
so the transforms trained with are exactly the ones previewed. Mistakes in the policy (a
transform albumentations does not have, an argument it does not take or a bad value) fail here,
naming `augment.policy[i]`, instead of being skipped with a warning as albumentations 2 does.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.core import errors, figures, runtime
from components.core.config import Params, ParamsError, load_params
from components.core.contracts import read_manifest
from components.core.paths import AugmentPaths
from components.modeling.data import load_rgb, load_split
from components.modeling.transforms import build_pipeline, save_pipeline


@dataclass(frozen=True)
class AugmentResult:
    transforms: int
    preview_images: int
    policy_path: Path
    preview_path: Path


def save_preview(originals: list[np.ndarray], augmented: list[np.ndarray], path: str | Path) -> None:
    """Pairs of rows: originals above their augmented versions."""
    cols = min(8, len(originals))
    row_pairs = -(-len(originals) // cols)
    fig, axes = figures.pyplot().subplots(2 * row_pairs, cols, figsize=(1.6 * cols, 3.4 * row_pairs), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (orig, aug) in enumerate(zip(originals, augmented, strict=True)):
        r, c = divmod(i, cols)
        axes[2 * r, c].imshow(orig)
        axes[2 * r + 1, c].imshow(aug)
        if c == 0:
            axes[2 * r, c].set_title("original", fontsize=8, loc="left")
            axes[2 * r + 1, c].set_title("augmented", fontsize=8, loc="left")
    fig.suptitle("augment.policy on training images")
    figures.save_png(fig, path, dpi=90)


def run_augment(params: Params, paths: AugmentPaths) -> AugmentResult:
    """Validate and save the policy; preview it on a seeded sample of training images."""
    config, seed = params.augment, params.project.seed
    pipeline = build_pipeline(config.policy, seed)
    train = load_split(read_manifest(paths.manifest), "train")
    if not len(train):
        raise ValueError(f"{paths.manifest}: no training images to preview the augmentation on")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train), size=min(config.preview_images, len(train)), replace=False)
    originals = [load_rgb(train.paths[i], params.model.image_size) for i in sorted(picks)]
    augmented = [pipeline(image=img)["image"] for img in originals]
    save_pipeline(pipeline, paths.policy_out)
    save_preview(originals, augmented, paths.preview)
    return AugmentResult(len(config.policy), len(originals), paths.policy_out, paths.preview)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.augment", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections project, augment, model)")
    AugmentPaths.add_arguments(parser)
    return parser


@errors.cli_errors("augment")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_augment(load_params(args.params), AugmentPaths.from_args(args))
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"augment: {exc}", file=sys.stderr)
        return 2
    print(
        f"augment: {result.transforms} transforms -> {result.policy_path}; "
        f"preview of {result.preview_images} images -> {result.preview_path}"
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
