"""params.yaml's training sections: ingest, validate, augment, train_head, finetune (evaluate_config.py: the rest).

One pydantic model per section (core/section.py's rules); core/config.py assembles them into Params.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, field_validator, model_validator

from components.core.section import Section


class SplitFractions(Section):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class IngestConfig(Section):
    source: str = Field(
        "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
        min_length=1,
        description="Folder of class sub-folders (optionally under train/val/test), CSV/Parquet "
        "manifest, .zip/.tar.gz archive, or URL (http(s)://, s3://, gs://).",
    )
    classes: list[str] | None = Field(None, description="Expected label set; null accepts the labels found.")
    split: SplitFractions = SplitFractions()
    min_val_per_class: int = Field(
        30,
        ge=0,
        description="A class with fewer decodable val images takes the rest from its train images (lowest hash "
        "position first; test never); 0 = off. 30: the 95% Wilson interval of a per-class val accuracy near 0.9 "
        "is then about +-0.11, whatever the data set's size (the width depends on the count, not the fraction).",
    )
    max_val_share_per_class: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="At most this share of a class's train images moves to val (the usual 70/30 hold-out): "
        "a class under min_val_per_class / share train images (100 by default) keeps 70% of them.",
    )
    workers: int = Field(0, ge=0, description="Processes for hashing and decoding; 0 = one per core.")
    max_bytes: int = Field(20 * 1024**3, gt=0, description="Cap on the bytes any source delivers (archives: unpacked).")
    max_files: int = Field(1_000_000, gt=0, description="Cap on the files any source delivers (archives: members).")
    max_archive_metadata_bytes: int = Field(
        256 * 1024**2,
        gt=0,
        description="Cap on an archive's metadata: tar long-name and pax headers in total, a zip's central directory.",
    )
    allow_http: bool = Field(False, description="Accept plain http:// URLs (https, s3 and gs always).")
    allow_private_hosts: bool = Field(
        False, description="Accept URLs whose host is loopback, private or link-local (e.g. a lab server)."
    )
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Folders or bucket prefixes that manifest rows may name besides the manifest's own folder.",
    )
    follow_links_within_root: bool = Field(
        True, description="Follow symlinks that stay inside the source root; links out of it are always refused."
    )
    allow_hard_links: bool = Field(
        False,
        description="Read source files that have more than one name (hard links); one may be a file "
        "outside the source, which a hard link cannot show.",
    )
    download_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="Deadline for each whole HTTP(S) request (connect, redirects, headers, body)."
    )
    max_redirects: int = Field(5, ge=0, le=20, description="HTTP redirects followed for a URL source.")


class NearDuplicatesConfig(Section):
    policy: Literal["move", "report", "fail", "off"] = Field(
        "move",
        description="Near-duplicate groups across splits: move to the split of the smallest content hash, "
        "report only, fail validation, or off (no perceptual hashing). Groups under 2+ labels are quarantined.",
    )
    max_distance: int = Field(
        10, ge=0, le=32, description="Largest Hamming distance between 64-bit perceptual hashes of one group."
    )
    embeddings: bool = Field(
        True,
        description="Also pair images whose frozen-backbone embeddings (`model:` section) are close: finds crops "
        "and small rotations the hashes miss; one cached backbone pass per new image.",
    )
    min_cosine: float = Field(
        0.93, gt=0, le=1, description="Smallest cosine similarity of two embeddings that pairs them."
    )
    probes: int = Field(
        8,
        ge=1,
        le=1000,
        description="Embedding index cells (k-means, about sqrt(images) of them) each image is compared in, its "
        "nearest first: more finds more pairs near the threshold; search time grows in proportion.",
    )
    candidate_cosine: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Embedding pairs from this cosine up to min_cosine are near-duplicates only when geometric "
        "verification confirms them (local features fitting one crop/resize/rotation); = min_cosine: none checked.",
    )
    max_candidates: int = Field(
        10, ge=1, le=1000, description="Candidate pairs verified per image at most (its closest by cosine)."
    )
    min_inliers: int = Field(
        20, ge=3, description="Keypoint matches that must fit one similarity transform to verify a candidate pair."
    )
    max_scale: float = Field(
        1.5, ge=1, description="Largest zoom between a verified pair, either way (a 10% crop is 1.11)."
    )
    max_rotation: float = Field(15.0, ge=0, le=180, description="Largest rotation in degrees between a verified pair.")

    @model_validator(mode="after")
    def _candidates_below_pairs(self) -> NearDuplicatesConfig:
        if self.candidate_cosine > self.min_cosine:
            raise ValueError(
                f"candidate_cosine ({self.candidate_cosine}) is above min_cosine ({self.min_cosine}): "
                "set it to min_cosine to verify no candidates"
            )
        return self


class ValidateConfig(Section):
    policy: Literal["quarantine", "fail"] = "quarantine"
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "BMP", "WEBP"])
    min_width: int = Field(32, ge=1)
    min_height: int = Field(32, ge=1)
    max_width: int = Field(12_000, ge=1)
    max_height: int = Field(12_000, ge=1)
    max_pixels: int = Field(80_000_000, ge=1, le=1_000_000_000, description="Decompression-bomb guard.")
    max_image_bytes: int = Field(50 * 1024**2, ge=1024, le=2 * 1024**3, description="Largest image file accepted.")
    min_images_per_class: int = Field(10, ge=1)
    max_class_imbalance: float = Field(10.0, ge=1, description="Largest class size / smallest class size.")
    max_bad_fraction: float = Field(0.05, ge=0, le=1, description="Quarantine more than this and the run fails.")
    near_duplicates: NearDuplicatesConfig = NearDuplicatesConfig()

    @model_validator(mode="after")
    def _consistent_bounds(self) -> ValidateConfig:
        for low, high in (("min_width", "max_width"), ("min_height", "max_height")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is larger than {high} ({getattr(self, high)})")
        if self.min_width * self.min_height > self.max_pixels:
            raise ValueError(
                f"min_width x min_height ({self.min_width * self.min_height}) exceeds max_pixels "
                f"({self.max_pixels}): no image could pass"
            )
        return self


class AugmentConfig(Section):
    policy: list[dict[str, dict[str, Any]]] = Field(
        default_factory=lambda: [
            {"HorizontalFlip": {"p": 0.5}},
            {"Affine": {"scale": [0.9, 1.15], "rotate": [-15, 15], "p": 0.7}},
            {"RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5}},
        ],
        description="albumentations 2.x transforms in order, each {Name: {argument: value}}.",
    )
    preview_images: int = Field(16, ge=1, le=64)

    @field_validator("policy")
    @classmethod
    def _one_transform_per_item(cls, policy: list[dict[str, dict[str, Any]]]) -> list[dict[str, dict[str, Any]]]:
        for i, item in enumerate(policy):
            if len(item) != 1:
                raise ValueError(f"item {i} must map exactly one transform name to its arguments, got {list(item)}")
        return policy


class LabelIssuesConfig(Section):
    action: Literal["report", "exclude", "off"] = Field(
        "report",
        description="Suspect labels of every split (cleanlab on probabilities from heads that did not see "
        "each image): report them, also exclude the top training ones from head training (listed in the "
        "model folder; val and test images are never excluded), or skip the check.",
    )
    folds: int = Field(5, ge=2, le=20, description="Folds of the out-of-fold heads.")
    max_excluded_fraction: float = Field(
        0.02,
        ge=0,
        le=0.5,
        description="With action exclude: at most this fraction of training images, most suspect first.",
    )
    gallery_images: int = Field(16, ge=1, le=64, description="Top suspects shown in label_issues.png.")


class TrainHeadConfig(Section):
    batch_size: int = Field(
        32, ge=1, le=4096, description="Also the feature-extraction batch (32 is ~2x faster than 64 on CPU)."
    )
    epochs: int = Field(40, ge=1)
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    pooling: Literal["avg", "max"] = Field("avg", description="Global pooling of the backbone's feature map.")
    hidden_units: int = Field(0, ge=0, description="Optional dense layer before the classifier; 0 = none.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighting: Literal["balanced", "none"] = "balanced"
    early_stopping_patience: int = Field(5, ge=1)
    min_epoch_steps: int = Field(64, ge=1, description="Cached-features head: an epoch is at least this many batches.")
    cached_features: bool = Field(True, description="Train the head on backbone features computed once.")
    augmented_copies: int = Field(
        2, ge=0, le=32, description="Augmented variants per training image in the feature cache."
    )
    feature_engine: Literal["auto", "onnxruntime", "keras"] = Field(
        "auto",
        description="Frozen feature pass: auto = ONNX Runtime on a CPU where it is installed "
        "(checked against Keras on a probe batch), Keras otherwise.",
    )
    data_parallel: Literal["auto", "off"] = Field(
        "auto",
        description="auto: with several GPUs/TPUs, the Keras frozen feature pass runs on all of them (keras "
        "DataParallel on JAX, MirroredStrategy on TensorFlow; batch_size is the global batch); off: one device.",
    )
    solver: Literal["adam", "auto", "lbfgs"] = Field(
        "adam",
        description="Cached-features head: adam | auto = Adam, and an L2 logistic regression (L-BFGS, strength "
        "chosen on val), keeping the lower val log-loss | lbfgs (needs cached_features and hidden_units 0).",
    )
    label_issues: LabelIssuesConfig = LabelIssuesConfig()

    @model_validator(mode="after")
    def _linear_head_needs_cached_features(self) -> TrainHeadConfig:
        if self.solver == "lbfgs" and (not self.cached_features or self.hidden_units):
            raise ValueError(
                "train_head.solver: lbfgs needs cached_features: true and hidden_units: 0 (a linear head on the cache)"
            )
        return self


def _peak_rate(value: Any) -> float | dict[int, float]:
    """finetune.learning_rate: a rate in (0, 1), or a non-empty {training images per class (integer >= 0): rate}."""

    def rate(number: Any) -> float:
        if isinstance(number, bool) or not isinstance(number, (int, float, str)):
            raise ValueError(f"expected a learning rate, got {number!r}")
        found = float(number)
        if not 0 < found < 1:
            raise ValueError(f"a learning rate must lie in (0, 1), got {found:g}")
        return found

    if not isinstance(value, dict):
        return rate(value)
    if not value or any(isinstance(k, bool) or not str(k).isdigit() for k in value):
        raise ValueError("expected a rate, or {training images per class (an integer >= 0): rate, ...}")
    return {int(k): rate(v) for k, v in sorted(value.items(), key=lambda item: int(item[0]))}


PeakRate = Annotated[Any, PlainValidator(_peak_rate)]


class FinetuneConfig(Section):
    unfreeze_layers: int | None = Field(
        100, ge=1, description="Train the top N backbone layers; all three unfreeze keys null = the backbone's default."
    )
    unfreeze_from: str | None = Field(None, description="Or: train from this backbone layer name upwards.")
    unfreeze_fraction: float | None = Field(
        None, gt=0, le=1, description="Or: train this top fraction of backbone layers (wins over unfreeze_layers)."
    )
    batch_size: int = Field(32, ge=1, le=4096)
    epochs: int = Field(12, ge=0, description="Upper bound; 0 = keep the head model as is.")
    learning_rate: PeakRate = Field(
        {0: 5e-5, 125: 2e-4},
        description="Peak after warm-up (cosine decay to 0): a rate, or rates by training images "
        "per class (the largest threshold at or below the data's; below them all, the lowest's).",
    )
    warmup_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(4, ge=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    bottom_lr_factor: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Discriminative rates: the lowest trained backbone layer learns at this fraction of the peak, "
        "geometric up to the head's full rate; 1 = one rate (benchmarks/results/training_levers.md).",
    )
    ema_epochs: float = Field(
        0.0,
        ge=0,
        description="Weights averaged (EMA) over about this many epochs of steps and written into the model at "
        "each epoch's end, so val, early stopping and checkpoints see the average; 0 = off.",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="Mixup of training images and labels, mixing weight ~ Beta(alpha, alpha); 0 = off."
    )
    low_res_epochs: int = Field(
        0,
        ge=0,
        description="Progressive resizing: the first N of `epochs` train on images of low_res_size (about "
        "(low_res_size / model.image_size)^2 of an epoch's cost), the rest at full size; 0 = off.",
    )
    low_res_size: int = Field(
        160, ge=32, description="Image side of the low-resolution epochs, below model.image_size."
    )
    calibrate: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Temperature fitted on val, folded into the output layer (predictions unchanged). auto: "
        "the most probable T under a prior centred on T = 1 (small val sets are pulled towards it); on: the "
        "NLL-optimal T; off: none.",
    )
    flip_tta: Literal["auto", "on", "off"] = Field(
        "auto", description="Average with the mirror image (2x inference). auto: kept if val accuracy rises; on; off."
    )
    crop_tta: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Also average over the central crop (87.5% of each side) and its mirror (4 views in all: 2x the "
        "flip's cost). auto: keep them only when that raises val accuracy over the flip decision's; on/off.",
    )
    data_parallel: Literal["auto", "off"] = Field(
        "auto",
        description="auto: with several GPUs/TPUs, train on all of them (keras DataParallel on JAX, MirroredStrategy "
        "on TensorFlow; batch_size is the global batch, split across them); off: one device.",
    )
    keep_head_if_not_better: bool = Field(
        True,
        description="Keep the head's weights unless the fine-tuned ones are more accurate on val beyond noise (the "
        "paired 95% interval of the gain above 0; one view, uncalibrated); false: always keep the fine-tuned weights.",
    )

    @model_validator(mode="after")
    def _a_full_size_epoch_remains(self) -> FinetuneConfig:
        if self.low_res_epochs and self.low_res_epochs >= self.epochs:
            raise ValueError(
                f"finetune.low_res_epochs ({self.low_res_epochs}) must be below finetune.epochs ({self.epochs}): "
                "the last epochs train at full size"
            )
        return self

    def peak_rate(self, images_per_class: float) -> float:
        """learning_rate for data with this many training images per class: a number as is; by size, the rate of
        the largest threshold at or below it (below every threshold, the lowest threshold's). Why the default
        is {0: 5e-5, 125: 2e-4}: components.modeling.fine_tuning.for_data."""
        rates = self.learning_rate
        if not isinstance(rates, dict):
            return float(rates)
        reached = [size for size in rates if size <= images_per_class]
        return float(rates[max(reached) if reached else min(rates)])
