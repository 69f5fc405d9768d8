"""Throughput of the training input and compute paths on this machine, on a real image subset.

    nice -n 10 python -m benchmarks.input_pipeline --source ../shared/datasets/flower_photos \
        --per-class 60 --image-size 224 --alpha 0.5

Measures images/s of: decoding only (val/test path), decoding + augmentation (training path),
frozen-backbone feature extraction (train_head's cached path), and one fine-tuning epoch with the
default unfreeze point (batch 32). Each is timed on a second pass, after tracing and warm-up. Writes
benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from components.core import files, runtime

RESULTS = Path(__file__).resolve().parent / "results"


def subset_split(source: Path, per_class: int) -> Any:
    import numpy as np

    from components.modeling.data import Split

    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, name in enumerate(classes):
        images = (f for f in (source / name).iterdir() if f.suffix.lower() in {".jpg", ".jpeg", ".png"})
        files = sorted(images)[:per_class]
        paths += [str(f) for f in files]
        labels += [i] * len(files)
    return Split(paths, np.asarray(labels, dtype=np.int32), classes)


def images_per_second(run: Any, count: int) -> float:
    run()  # warm-up: tracing, thread pools, file cache
    started = time.perf_counter()
    run()
    return round(count / (time.perf_counter() - started), 1)


def measure(source: Path, per_class: int, image_size: int, alpha: float, batch_size: int) -> dict[str, Any]:
    import keras

    from components.core.config import ModelConfig
    from components.core.stage_config import AugmentConfig, FinetuneConfig, TrainHeadConfig
    from components.modeling import backbones
    from components.modeling.data import make_dataset
    from components.modeling.transforms import build_pipeline, save_pipeline

    runtime.configure_tensorflow(0)
    split = subset_split(source, per_class)
    n = len(split)
    policy = Path(tempfile.mkdtemp()) / "policy.json"
    save_pipeline(build_pipeline(AugmentConfig().policy, 0), policy)

    def drain(ds: Any) -> None:
        for _ in ds:
            pass

    decode = make_dataset(split, image_size, batch_size)
    augmented = make_dataset(split, image_size, batch_size, policy_path=policy, training=True)
    result: dict[str, Any] = {
        "decode_images_per_s": images_per_second(lambda: drain(decode), n),
        "decode_augment_images_per_s": images_per_second(lambda: drain(augmented), n),
    }
    model, _ = backbones.build_classifier(
        ModelConfig(alpha=alpha, image_size=image_size), len(split.classes), TrainHeadConfig()
    )
    extractor = backbones.feature_extractor(model)
    for batch in sorted({32, batch_size}):  # oneDNN on a small CPU: batch size matters a lot
        cached = make_dataset(split, image_size, batch, cache=True).map(lambda x, y: x)
        result[f"feature_extraction_images_per_s_batch{batch}"] = images_per_second(
            lambda ds=cached: extractor.predict(ds, verbose=0), n
        )

    unfreeze = FinetuneConfig()
    backbones.unfreeze_top(
        backbones.find_backbone(model), unfreeze, backbones.get_spec("mobilenet_v2").default_unfreeze_layers
    )
    model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", jit_compile=False)
    train = make_dataset(split, image_size, 32, policy_path=policy, training=True).map(
        lambda x, y: (x, keras.ops.one_hot(y, len(split.classes)))
    )
    result["finetune_epoch_images_per_s"] = images_per_second(
        lambda: model.fit(train, epochs=1, verbose=0, shuffle=False), n
    )
    result["finetune_unfreeze_layers"] = unfreeze.unfreeze_layers
    result["images"] = n
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of class sub-folders")
    parser.add_argument("--per-class", type=int, default=60, help="images taken from each class")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--alpha", type=float, default=0.5, help="MobileNetV2 width multiplier")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--out", type=Path, default=RESULTS / "input_pipeline.json", help="results (JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    figures = measure(args.source, args.per_class, args.image_size, args.alpha, args.batch_size)
    report = {
        **figures,
        "source": str(args.source),
        "per_class": args.per_class,
        "image_size": args.image_size,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.platform(),
    }
    files.write_json(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
