"""params.yaml's sections after training: evaluate (promotion, experiments, serving) and drift.

One pydantic model per section (core/section.py's rules); core/config.py assembles them into Params.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from components.core.section import Section


class PromotionConfig(Section):
    min_accuracy: float = Field(0.5, ge=0, le=1, description="Test accuracy a version needs to become champion.")
    min_class_recall: float = Field(0.0, ge=0, le=1, description="Every class's test recall must reach this.")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="Accuracy margin over the champion re-scored on the same test split."
    )
    promote_on_tie: bool = Field(False, description="Whether equal accuracy (within float noise) promotes.")
    max_class_recall_drop: float = Field(
        0.03, ge=0, le=1, description="No class's recall may fall more than this below the champion's."
    )
    allow_class_set_change: bool = Field(
        False, description="Promote when the class set differs from the champion's (it cannot be re-scored)."
    )


class ServingConfig(Section):
    max_images_per_request: int = Field(64, ge=1, le=10_000, description="Images one served request may hold.")
    max_request_bytes: int = Field(
        64 * 1024**2, ge=1024, le=2 * 1024**3, description="Total image bytes one served request may hold."
    )
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        le=1_000_000_000,
        description="Pixels one served image may have (from its header, before decoding); serving's own cap, "
        "smaller than validate.max_pixels, which training, evaluation and batch scoring use.",
    )
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        le=10_000_000_000,
        description="Pixels all the images of one served request may have together (the request's decode budget).",
    )

    @model_validator(mode="after")
    def _budget_fits_an_image(self) -> ServingConfig:
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels}) is below max_pixels ({self.max_pixels}): "
                "a request could not hold one image of the largest size allowed"
            )
        return self


class ExperimentsConfig(Section):
    register_model: bool = Field(False, description="Whether a DVC experiment registers its model (as a challenger).")
    promote: bool = Field(
        False, description="With register_model: the gate may make it champion (main-line runs always may)."
    )


class EvaluateConfig(Section):
    batch_size: int = Field(64, ge=1)
    top_k: int = Field(3, ge=1, description="Top-k accuracy is reported when there are more than 5 classes.")
    worst_examples: int = Field(16, ge=0, le=64, description="Misclassified test images shown in the gallery.")
    calibration_bins: int = Field(10, ge=2, le=100, description="Confidence bins for ECE and the reliability diagram.")
    inference_engine: Literal["auto", "onnxruntime", "keras"] = Field(
        "auto",
        description="Scoring the test split: auto = ONNX Runtime on a CPU where it is installed (checked "
        "against Keras on a probe batch; the accepted file is also served), Keras otherwise; keras never exports.",
    )
    promotion: PromotionConfig = PromotionConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    serving: ServingConfig = ServingConfig()


class DriftConfig(Section):
    policy: Literal["always", "on_drift", "alert"] = Field(
        "always",
        description="Retrain on any new data (always), only on drift or new classes (on_drift), or "
        "never because of drift (alert: report only).",
    )
    significance: float = Field(
        0.01, gt=0, lt=1, description="Family-wise false-alarm rate of the MMD tests (Bonferroni)."
    )
    permutations: int = Field(200, ge=20, le=10_000, description="Relabellings for each permutation p-value.")
    reference_per_class: int = Field(
        100, ge=5, le=5_000, description="Training embeddings per class kept with a model."
    )
    sample_per_class: int = Field(100, ge=5, le=5_000, description="New images per class embedded and tested.")
    max_confidence_drop: float = Field(
        0.1, ge=0, le=1, description="A larger drop of the champion's mean top-class probability counts as drift."
    )
