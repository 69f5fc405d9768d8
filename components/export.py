"""Export a trained model dir for serving outside Python/MLflow: SavedModel and TFLite (float16).

The TFLite file is checked against the Keras model on sample images (top-1 agreement rate and the
largest probability difference) and the check is written to `export.json` beside the exports,
so a conversion that silently changed the model's answers is visible.

CLI: python -m components.export --model-dir models/finetune --out-dir models/export \
        [--manifest data/validated.csv --split test | --images DIR] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.core import errors, files, runtime
from components.ingestion.images import ImageLimits
from components.modeling.data import load_rgb, load_split
from components.modeling.model_folder import ClassNames, load_model_dir
from components.predict import list_inputs


@dataclass(frozen=True)
class ExportResult:
    saved_model: Path
    tflite: Path
    tflite_bytes: int
    n_samples: int
    top1_agreement: float
    max_prob_diff: float


def convert_tflite_float16(saved_model: Path) -> bytes:
    """Weights stored as float16 (half the size), computed in float32 on CPUs."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def tflite_predict(tflite_model: bytes, images: np.ndarray) -> np.ndarray:
    """Run the TFLite model image by image (its input is fixed at batch 1 after resizing)."""
    try:  # LiteRT replaces tf.lite.Interpreter (deprecated) where it is installed
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        warnings.filterwarnings("ignore", message=r"(?s).*tf.lite.Interpreter is deprecated")
        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_content=tflite_model)
    entry = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(entry["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    out_index = interpreter.get_output_details()[0]["index"]
    outputs = []
    for image in images:
        interpreter.set_tensor(entry["index"], image[None].astype(np.float32))
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out_index)[0].copy())
    return np.stack(outputs)


def sample_images(paths: list[str], size: int, count: int, limits: ImageLimits | None = None) -> np.ndarray:
    chosen = paths[:count]
    if not chosen:
        raise ValueError("no sample images to check the export against")
    return np.stack([load_rgb(p, size, limits) for p in chosen]).astype(np.float32)


def run_export(model_dir: str | Path, out_dir: str | Path, sample_paths: list[str], samples: int = 32) -> ExportResult:
    """SavedModel + float16 TFLite for `model_dir`, checked on up to `samples` images."""
    model_dir = Path(model_dir)
    folder = load_model_dir(model_dir)  # refused if model.keras differs from the sha256 in run.json
    model, size = folder.model, folder.image_size
    images = sample_images(sample_paths, size, samples)
    with files.atomic_dir(out_dir) as out:
        model.export(str(out / "saved_model"), verbose=False)
        tflite = convert_tflite_float16(out / "saved_model")
        (out / "model_float16.tflite").write_bytes(tflite)
        ClassNames(folder.classes).write(out / "classes.json")
        keras_probs = np.asarray(model.predict(images, verbose=0))
        lite_probs = tflite_predict(tflite, images)
        result = ExportResult(
            saved_model=Path(out_dir) / "saved_model",
            tflite=Path(out_dir) / "model_float16.tflite",
            tflite_bytes=len(tflite),
            n_samples=len(images),
            top1_agreement=float((keras_probs.argmax(1) == lite_probs.argmax(1)).mean()),
            max_prob_diff=float(np.abs(keras_probs - lite_probs).max()),
        )
        files.write_json(
            out / "export.json",
            {**asdict(result), "image_size": size, "source": str(model_dir), "model_sha256": folder.info.model_sha256},
        )
    return result


def log_to_run(out_dir: str | Path, run_id: str, params_path: str | Path) -> None:
    """Attach the exports to an existing MLflow run, so the registry version carries them."""
    from mlflow import MlflowClient

    from components.core.config import load_params
    from components.core.tracking_connection import resolve_tracking_uri, with_retries

    client = MlflowClient(tracking_uri=resolve_tracking_uri(load_params(params_path).tracking))
    with_retries("log the exports", client.log_artifacts, run_id, str(out_dir), "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.export",
        description="Export a model dir to SavedModel and float16 TFLite, checked.",
    )
    parser.add_argument("--model-dir", default="models/finetune", help="the model folder to export")
    parser.add_argument("--out-dir", default="models/export", help="folder for the SavedModel, TFLite and export.json")
    parser.add_argument("--manifest", default="data/validated.csv", help="sample images from this manifest...")
    parser.add_argument("--split", default="test", help="...and split")
    parser.add_argument("--images", default=None, help="or from this folder")
    parser.add_argument("--samples", type=int, default=32, help="images the TFLite file is checked on")
    parser.add_argument(
        "--mlflow-run",
        default=None,
        help="also log the exports to this MLflow run (e.g. the evaluate run of the registered version)",
    )
    parser.add_argument("--params", default="params.yaml", help="for the tracking URI with --mlflow-run")
    return parser


@errors.cli_errors("export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.images:
            paths = list_inputs(args.images)
        else:
            paths = load_split(args.manifest, args.split).paths
        result = run_export(args.model_dir, args.out_dir, paths, args.samples)
        if args.mlflow_run:
            log_to_run(args.out_dir, args.mlflow_run, args.params)
    except (ValueError, OSError) as exc:
        print(f"export: {errors.describe_os_error(exc) or exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.saved_model} and {result.tflite} ({result.tflite_bytes / 1e6:.1f} MB); TFLite agrees with "
        f"Keras on {result.top1_agreement:.1%} of {result.n_samples} images, max prob diff {result.max_prob_diff:.4f}"
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
