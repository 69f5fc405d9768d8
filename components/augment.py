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

from components import errors, files
from components.config import ParamsError, load_params
from components.contracts import read_manifest
from components.data import load_rgb, load_split
from components.stage_config import AugmentConfig
from components.transforms import build_pipeline, save_pipeline


@dataclass(frozen=True)
class AugmentResult:
    transforms: int
    preview_images: int
    policy_path: Path
    preview_path: Path


def save_preview(originals: list[np.ndarray], augmented: list[np.ndarray], path: str | Path) -> None:
    """Pairs of rows: originals above their augmented versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(originals))
    row_pairs = -(-len(originals) // cols)
    fig, axes = plt.subplots(2 * row_pairs, cols, figsize=(1.6 * cols, 3.4 * row_pairs), squeeze=False)
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
    fig.tight_layout()
    with files.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)


def run_augment(
    config: AugmentConfig, seed: int, image_size: int, manifest: str | Path, policy_out: str | Path, preview: str | Path
) -> AugmentResult:
    """Validate and save the policy; preview it on a seeded sample of training images."""
    pipeline = build_pipeline(config.policy, seed)
    train = load_split(read_manifest(manifest), "train")
    if not len(train):
        raise ValueError(f"{manifest}: no training images to preview the augmentation on")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(train), size=min(config.preview_images, len(train)), replace=False)
    originals = [load_rgb(train.paths[i], image_size) for i in sorted(picks)]
    augmented = [pipeline(image=img)["image"] for img in originals]
    save_pipeline(pipeline, policy_out)
    save_preview(originals, augmented, preview)
    return AugmentResult(len(config.policy), len(originals), Path(policy_out), Path(preview))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.augment", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections project, augment, model)")
    parser.add_argument("--manifest", required=True, help="validated manifest (data/validated.csv)")
    parser.add_argument("--policy-out", required=True, help="where to write the serialized pipeline (JSON)")
    parser.add_argument("--preview", required=True, help="PNG grid of originals vs augmented training images")
    return parser


@errors.cli_errors("augment")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        result = run_augment(
            params.augment, params.project.seed, params.model.image_size, args.manifest, args.policy_out, args.preview
        )
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"augment: {exc}", file=sys.stderr)
        return 2
    print(
        f"augment: {result.transforms} transforms -> {result.policy_path}; "
        f"preview of {result.preview_images} images -> {result.preview_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
