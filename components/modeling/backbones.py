"""Registry of Keras application backbones and the classifier built on them.

Every model this project saves takes float32 RGB in 0..255 of any size and carries its own
preprocessing as layers (resize to the training size, then the backbone's normalisation), so a
server cannot feed it differently from training. Only serializable layers are used (no Lambda):
the saved `.keras` file loads with `keras.models.load_model(path)` in safe mode, once this module
has been imported (it registers `CaffePreprocess`, `CentralCrop` and finetune's `LayerwiseAdam`).

The full model is:  image -> Resizing -> preprocessing -> backbone (named "backbone", called with
training=False) -> pooling layer "pool" -> sub-model "head" (dropout, optional dense, softmax).
Splitting at "pool" is what lets train_head cache feature vectors and train "head" alone.

When finetune keeps flip test-time augmentation (decided on val), the saved model wraps that
classifier: image -> [classifier(image), classifier(mirror image)] -> mean; with crop TTA kept too, the
central crop and its mirror are two more views of the mean. Every consumer (evaluate,
serving, batch prediction, ONNX, TFLite) then averages both views with no flag to honour, and
`plain_classifier` gives back the single-view model inside (features, drift embeddings).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from components.core.config import ModelConfig, ParamsError
from components.core.stage_config import FinetuneConfig, TrainHeadConfig
from components.modeling import layerwise_adam  # noqa: F401  (registers the optimizer a saved model may name)

BACKBONE_LAYER = "backbone"
POOL_LAYER = "pool"
HEAD_LAYER = "head"
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="transfer_pipeline")
class CaffePreprocess(keras.layers.Layer):
    """'caffe' preprocessing (ResNet50): RGB -> BGR, then subtract the ImageNet channel means."""

    def __init__(self, means: tuple[float, float, float] = IMAGENET_BGR_MEANS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.means = tuple(float(m) for m in means)

    def call(self, inputs: Any) -> Any:
        bgr = keras.ops.flip(inputs, axis=-1)
        return bgr - keras.ops.cast(keras.ops.convert_to_tensor(self.means), bgr.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "means": list(self.means)}


@keras.saving.register_keras_serializable(package="transfer_pipeline")
class HorizontalFlip(keras.layers.Layer):
    """Mirror NHWC images left to right, always (RandomFlip only flips while training)."""

    def call(self, inputs: Any) -> Any:
        return keras.ops.flip(inputs, axis=-2)


@keras.saving.register_keras_serializable(package="transfer_pipeline")
class CentralCrop(keras.layers.Layer):
    """The central `fraction` of each side of NHWC images of any size (the classifier resizes it back)."""

    def __init__(self, fraction: float = 0.875, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def call(self, inputs: Any) -> Any:
        # As tf.image.central_crop: the same margin, int((side - side * fraction) / 2), off both ends.
        shape = keras.ops.shape(inputs)
        margins = []
        for side in (shape[1], shape[2]):
            if isinstance(side, int):  # static (JAX traces, fixed-size exports)
                margins.append(int((side - side * self.fraction) / 2))
            else:  # a dynamic TensorFlow dimension
                side = keras.ops.cast(side, "float32")
                margins.append(keras.ops.cast(keras.ops.floor((side - side * self.fraction) / 2), "int32"))
        (top, left), (height, width) = margins, (shape[1], shape[2])
        return inputs[:, top : height - top, left : width - left, :]

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        def side(n: int | None) -> int | None:
            return None if n is None else n - 2 * int((n - n * self.fraction) / 2)

        return (input_shape[0], side(input_shape[1]), side(input_shape[2]), input_shape[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fraction": self.fraction}


def _mobilenet_scaling() -> list[keras.layers.Layer]:
    return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_minus1_1")]


def _no_preprocessing() -> list[keras.layers.Layer]:
    return []  # the application normalises inside (include_preprocessing=True)


def _caffe() -> list[keras.layers.Layer]:
    return [CaffePreprocess(name="caffe_preprocess")]


@dataclass(frozen=True)
class BackboneSpec:
    constructor: Callable[..., keras.Model]
    default_size: int
    preprocessing: Callable[[], list[keras.layers.Layer]]
    uses_alpha: bool = False
    extra_kwargs: tuple[tuple[str, Any], ...] = ()
    # Top layers to train in finetune when params don't say: about the last one or two blocks.
    default_unfreeze_layers: int = 30


def _normalising_itself(constructor: Callable[..., keras.Model], default_unfreeze_layers: int) -> BackboneSpec:
    """An application built with its own input normalisation (include_preprocessing=True): no layers of ours."""
    return BackboneSpec(
        constructor,
        224,
        _no_preprocessing,
        extra_kwargs=(("include_preprocessing", True),),
        default_unfreeze_layers=default_unfreeze_layers,
    )


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet_v2": BackboneSpec(
        keras.applications.MobileNetV2, 224, _mobilenet_scaling, uses_alpha=True, default_unfreeze_layers=40
    ),
    "mobilenet": BackboneSpec(
        keras.applications.MobileNet, 224, _mobilenet_scaling, uses_alpha=True, default_unfreeze_layers=24
    ),
    "efficientnet_v2_b0": _normalising_itself(keras.applications.EfficientNetV2B0, default_unfreeze_layers=40),
    "resnet50": BackboneSpec(keras.applications.ResNet50, 224, _caffe, default_unfreeze_layers=33),
    "convnext_tiny": _normalising_itself(keras.applications.ConvNeXtTiny, default_unfreeze_layers=30),
}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        hint = difflib.get_close_matches(name, BACKBONES, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ParamsError(f"model.backbone = {name!r} is not known{suggestion} (allowed: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def _resolve_weights(weights: str) -> str | None:
    if weights == "imagenet":
        return "imagenet"
    if weights.lower() == "none":
        return None
    if not Path(weights).is_file():
        raise ParamsError(f"model.weights = {weights!r}: expected 'imagenet', 'none' or an existing weights file")
    return weights


def build_backbone(model_cfg: ModelConfig) -> keras.Model:
    """The headless application at `image_size`, frozen, named "backbone"."""
    spec = get_spec(model_cfg.backbone)
    kwargs: dict[str, Any] = dict(spec.extra_kwargs)
    if spec.uses_alpha and model_cfg.alpha is not None:
        kwargs["alpha"] = model_cfg.alpha
    size = model_cfg.image_size
    try:
        base = spec.constructor(
            input_shape=(size, size, 3), include_top=False, weights=_resolve_weights(model_cfg.weights), **kwargs
        )
    except ValueError as exc:  # e.g. an alpha with no published ImageNet weights
        raise ParamsError(
            f"model ({model_cfg.backbone}, alpha={model_cfg.alpha}, image_size={size}, "
            f"weights={model_cfg.weights}): {exc}"
        ) from None
    except Exception as exc:  # Keras raises a bare Exception when the weights download fails
        if "URL fetch failure" not in str(exc):
            raise
        raise ParamsError(
            f"model.weights = 'imagenet': the weights for {model_cfg.backbone} (alpha={model_cfg.alpha}, "
            f"image_size={size}) are not in KERAS_HOME and could not be downloaded ({exc})"
        ) from None
    base.name = BACKBONE_LAYER  # a stable name for finetune (EfficientNetV2 needs its own name while building)
    base.trainable = False
    return base


def build_head(feature_dim: int, num_classes: int, head_cfg: TrainHeadConfig) -> keras.Model:
    """The trainable part on top of pooled features; also trained alone on cached features."""
    features = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(head_cfg.dropout, name="head_dropout")(features)
    if head_cfg.hidden_units:
        x = keras.layers.Dense(head_cfg.hidden_units, activation="relu", name="head_hidden")(x)
        x = keras.layers.Dropout(head_cfg.dropout, name="head_hidden_dropout")(x)
    # float32 output even under mixed precision: softmax in float16 loses calibration.
    probs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(features, probs, name=HEAD_LAYER)


def build_classifier(
    model_cfg: ModelConfig, num_classes: int, head_cfg: TrainHeadConfig
) -> tuple[keras.Model, keras.Model]:
    """Raw 0..255 images of any size -> class probabilities; returns (model, frozen backbone)."""
    spec = get_spec(model_cfg.backbone)
    base = build_backbone(model_cfg)
    size = model_cfg.image_size
    images = keras.Input((None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")(images)
    for layer in spec.preprocessing():
        x = layer(x)
    # training=False keeps BatchNorm in inference mode even when layers are unfrozen later.
    x = base(x, training=False)
    pool_cls = keras.layers.GlobalMaxPooling2D if head_cfg.pooling == "max" else keras.layers.GlobalAveragePooling2D
    pooled = pool_cls(name=POOL_LAYER)(x)
    head = build_head(int(pooled.shape[-1]), num_classes, head_cfg)
    model = keras.Model(images, head(pooled), name=f"{model_cfg.backbone}_classifier")
    return model, base


def feature_extractor(model: keras.Model) -> keras.Model:
    """The classifier cut at the pooled features (what the head sees)."""
    model = plain_classifier(model)
    return keras.Model(model.inputs, model.get_layer(POOL_LAYER).output, name="feature_extractor")


# --- test-time augmentation: the mirror image, and central crops --------------------------------------

FLIP_TTA_MODEL = "flip_tta"
CROP_FRACTION = 0.875  # the central crop of ImageNet evaluation (224 of 256)


def flip_views(classifier: keras.Model, crop: bool = False) -> keras.Model:
    """image -> [classifier(image), classifier(mirror image)], with `crop` also the central crop and its
    mirror: every view in one pass, to judge TTA on val."""
    images = keras.Input((None, None, 3), dtype="float32", name="image")
    views = [images, HorizontalFlip(dtype="float32", name="mirror")(images)]
    if crop:
        cropped = CentralCrop(CROP_FRACTION, dtype="float32", name="central_crop")(images)
        views += [cropped, HorizontalFlip(dtype="float32", name="crop_mirror")(cropped)]
    return keras.Model(images, [classifier(view) for view in views], name="flip_views")


def with_flip_tta(classifier: keras.Model, crop: bool = False) -> keras.Model:
    """The saved form of TTA: the mean of the classifier's probabilities over its views (`flip_views`)."""
    views = flip_views(classifier, crop)
    probs = keras.layers.Average(dtype="float32", name="mean_of_views")(views.outputs)
    return keras.Model(views.inputs, probs, name=FLIP_TTA_MODEL)


def uses_flip_tta(model: keras.Model) -> bool:
    return any(isinstance(layer, HorizontalFlip) for layer in model.layers)


def uses_crop_tta(model: keras.Model) -> bool:
    return any(isinstance(layer, CentralCrop) for layer in model.layers)


def plain_classifier(model: keras.Model) -> keras.Model:
    """The single-view classifier: `model` itself, or the one inside a flip-TTA model."""
    if not uses_flip_tta(model):
        return model
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"{model.name}: a flip-TTA model must wrap exactly one classifier")
    return nested[0]


def find_backbone(model: keras.Model) -> keras.Model:
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and layer.name != HEAD_LAYER]
        if len(nested) != 1:
            raise ValueError(f"{model.name}: cannot tell which nested model is the backbone") from None
        return nested[0]


# --- fine-tuning: which layers train ---------------------------------------------------------


def unfreeze_top(backbone: Any, config: FinetuneConfig, default_layers: int) -> int:
    """Make the top of the backbone trainable (BatchNorm excluded); return the first trainable index.

    `default_layers` is the backbone's own (`BackboneSpec.default_unfreeze_layers`), used when all
    three finetune.unfreeze_* keys are null.
    """
    layers = backbone.layers
    names = [layer.name for layer in layers]
    if config.unfreeze_from is not None:
        if config.unfreeze_from not in names:
            hint = difflib.get_close_matches(config.unfreeze_from, names, n=3)
            close = f"; close: {', '.join(hint)}" if hint else ""
            raise ParamsError(
                f"finetune.unfreeze_from = {config.unfreeze_from!r} is not a layer of the backbone "
                f"'{backbone.name}' ({len(layers)} layers){close}"
            )
        start = names.index(config.unfreeze_from)
    elif config.unfreeze_fraction is not None:
        start = len(layers) - max(1, round(len(layers) * config.unfreeze_fraction))
    else:
        count = config.unfreeze_layers or default_layers
        if count > len(layers):
            raise ParamsError(
                f"finetune.unfreeze_layers = {count} exceeds the backbone's layer count "
                f"({len(layers)} layers in '{backbone.name}')"
            )
        start = len(layers) - count
    backbone.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    return start
