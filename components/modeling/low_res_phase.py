"""finetune's optional low-resolution phase (progressive resizing): the first epochs on smaller images.

A convolutional backbone's weights do not depend on the image size, and the classifier resizes whatever it is
given (backbones.build_classifier: image -> Resizing -> preprocessing -> backbone -> head). So a twin whose
Resizing is smaller, sharing every other layer, trains the very same weights at about (low / size)^2 of the
cost per image. The twin is compiled with the model's own optimizer, so the learning-rate schedule, its step
count and any weight EMA or per-layer rates run on across the switch to full size. The backbone checks its
input shape against the size it was built for; that check is lifted while the twin exists and put back after.

Off by default (`finetune.low_res_epochs: 0`): measured on val in benchmarks/results/training_levers.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from components.core import runtime
from components.modeling import optimization

RESIZE_LAYER = "resize"  # backbones.build_classifier's first layer after the input
_UNSET = object()


@contextmanager
def any_input_size(model: Any) -> Iterator[None]:
    """Lift the input-shape checks of `model`'s nested models (the backbone was built for one size)."""
    nested = [layer for layer in model.layers if hasattr(layer, "layers")]
    saved = [(layer, layer.__dict__.get("_manual_input_spec", _UNSET)) for layer in nested]
    for layer in nested:
        layer.input_spec = None  # Functional's setter: None checks nothing
    try:
        yield
    finally:
        for layer, spec in saved:
            if spec is _UNSET:
                del layer._manual_input_spec  # back to the spec of the inputs it was built on
            else:
                layer.input_spec = spec


def twin(model: Any, size: int) -> Any:
    """`model` with its Resizing layer replaced by one to `size` x `size`; every other layer is shared (call it
    within `any_input_size(model)`)."""
    import keras

    if RESIZE_LAYER not in {layer.name for layer in model.layers}:
        raise ValueError(f"{model.name}: no '{RESIZE_LAYER}' layer, so its input size cannot be changed")
    smaller = keras.layers.Resizing(size, size, interpolation="bilinear", name=f"{RESIZE_LAYER}_{size}")
    return keras.models.clone_model(
        model, clone_function=lambda layer: smaller if layer.name == RESIZE_LAYER else layer
    )


def train(model: Any, batches: Any, epochs: int, size: int, label_smoothing: float) -> dict[str, Any]:
    """Train `model`'s weights for `epochs` epochs on `batches` (images decoded at `size`) through its
    low-resolution twin and `model.optimizer`; what the phase did, for run.json."""
    started = time.perf_counter()
    print(f"finetune: the first {epochs} epochs at {size} px (progressive resizing)", flush=True)
    with any_input_size(model):
        low = twin(model, size)
        optimization.compile_classifier(
            low, None, label_smoothing, jit_compile=runtime.jit_compile_default(), optimizer=model.optimizer
        )
        history = low.fit(batches, epochs=epochs, shuffle=False, verbose=runtime.progress_verbosity())
    last = {f"train_{key}": round(float(values[-1]), 4) for key, values in history.history.items()}
    return {"epochs": epochs, "image_size": size, "seconds": round(time.perf_counter() - started, 1), **last}
