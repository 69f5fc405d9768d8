"""Batch scoring of local image files with a registered model (the served model takes image data only).

Local paths are a batch feature: this CLI and `flows/predict.py` read the files, within the input
root, and hand the served model their bytes. A folder's root is the folder; a CSV's rows resolve
against `--root` (default: the CSV's folder), and a row that names a file outside that root (an
absolute path elsewhere, `..`, or a symlink that leads out) is refused by name in the output. Files
are read with the guarded reader (regular files only, byte cap) and decoded within the same image
limits (`validate.*`, as in training; serving's smaller caps are for untrusted requests).

The model is verified against the registry and run by the installed code (`components.scoring.scoring`),
never by the code stored with it: a version whose stored files changed since registration is refused.

CLI: python -m components.predict --model models:/image-classifier@champion --inputs DIR_OR_CSV --out preds.csv \
        [--root DIR] [--split test]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import errors, files, runtime
from components.core.stage_config import ValidateConfig
from components.ingestion.images import GENERIC_MESSAGE, ImageLimits, UnusableImage, read_limited

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
OUTSIDE_ROOT = "outside the input root"


@dataclass(frozen=True)
class PredictResult:
    out_csv: Path
    n_images: int
    n_failed: int
    engine: str = "keras"  # what ran the model: onnxruntime (its checked ONNX file) or keras


def list_inputs(inputs: str | Path, split: str | None = None) -> list[str]:
    """Image paths from a folder (recursive) or the `path` column of a manifest CSV (as written there)."""
    inputs = Path(inputs)
    if inputs.is_dir():
        return sorted(str(p) for p in inputs.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if inputs.is_file() and inputs.suffix.lower() == ".csv":
        frame = pd.read_csv(inputs, keep_default_na=False, dtype=str)
        if "path" not in frame.columns:
            raise ValueError(f"{inputs}: a CSV input needs a 'path' column")
        if split is not None and "split" in frame.columns:
            frame = frame[frame["split"] == split]
        return frame["path"].astype(str).tolist()
    raise ValueError(f"{inputs}: expected a folder of images or a CSV with a 'path' column")


def default_root(inputs: str | Path) -> Path:
    inputs = Path(inputs)
    return inputs if inputs.is_dir() else inputs.parent


def confine(path: str, root: Path) -> Path | None:
    """`path` (relative ones against `root`) with every link resolved, or None if that lies outside `root`."""
    real_root = Path(os.path.realpath(root))
    candidate = Path(path) if os.path.isabs(path) else root / path
    real = Path(os.path.realpath(candidate))
    return real if real == real_root or real_root in real.parents else None


def read_images(paths: list[str], root: Path, limits: ImageLimits) -> tuple[list[bytes | None], list[str]]:
    """The bytes of each file inside `root` (None where refused or unreadable) and why not ('' if read)."""
    data: list[bytes | None] = []
    problems: list[str] = []
    for path in paths:
        real = confine(path, root)
        if real is None:
            data.append(None)
            problems.append(OUTSIDE_ROOT)
            continue
        try:
            data.append(read_limited(real, limits.max_bytes))
            problems.append("")
        except UnusableImage:
            data.append(None)
            problems.append(GENERIC_MESSAGE)
    return data, problems


def _score_chunk(scorer: Any, images: list[bytes], limits: ImageLimits) -> tuple[np.ndarray, list[str]]:
    """Probabilities per image (NaN row where unusable) and '' or the generic error, one image sinking none."""
    try:
        return scorer.score(images, limits), [""] * len(images)
    except ValueError:
        rows, problems = [], []
        for image in images:
            try:
                rows.append(scorer.score([image], limits)[0])
                problems.append("")
            except ValueError:
                rows.append(np.full(len(scorer.classes), np.nan))
                problems.append(GENERIC_MESSAGE)
        return np.stack(rows), problems


def run_predict(
    model_uri: str,
    inputs: str | Path,
    out_csv: str | Path,
    batch_size: int = 64,
    split: str | None = None,
    root: str | Path | None = None,
    limits: ImageLimits | None = None,
) -> PredictResult:
    """Score every image under `inputs` with `model_uri` (e.g. models:/NAME@champion) into a CSV.

    Columns: path, label, probability, error ('' or why that image could not be scored).
    """
    from tqdm import tqdm

    from components.scoring.scoring import load_scoring_model

    root = Path(root) if root is not None else default_root(inputs)
    limits = limits or ImageLimits.from_config(ValidateConfig())
    paths = list_inputs(inputs, split)
    if not paths:
        raise ValueError(f"{inputs}: no images found")
    scorer = load_scoring_model(model_uri)  # verified, and run by the installed code (never the stored code)
    engine = scorer.engine
    print(f"predict: {model_uri} runs on {engine}")
    rows = []
    with tqdm(total=len(paths), unit="img", desc="predict") as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            data, problems = read_images(chunk, root, limits)
            readable = [i for i, d in enumerate(data) if d is not None]
            probs, decode_problems = _score_chunk(scorer, [data[i] for i in readable], limits)
            scored = dict(zip(readable, zip(probs, decode_problems)))
            for i, path in enumerate(chunk):
                p, problem = scored.get(i, (None, problems[i]))
                if problem:
                    rows.append({"path": path, "label": "", "probability": float("nan"), "error": problem})
                else:
                    top = int(np.argmax(p))
                    rows.append({"path": path, "label": scorer.classes[top], "probability": float(p[top]), "error": ""})
            bar.update(len(chunk))
    table = pd.DataFrame(rows, columns=["path", "label", "probability", "error"])
    files.write_csv(table, out_csv)  # paths and labels come from outside: no cell starts a formula
    return PredictResult(Path(out_csv), len(table), int((table["error"] != "").sum()), engine)


class _OldInputSpelling(argparse.Action):
    """`--input`, this CLI's old spelling of `--inputs` (flows/predict.py's): still accepted, not shown in --help."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        print("predict: --input is deprecated, use --inputs", file=sys.stderr)
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.predict", description="Score a folder or manifest of images with a registered model."
    )
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/image-classifier@champion")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--inputs", metavar="DIR_OR_CSV", help="folder of images or CSV with a 'path' column")
    inputs.add_argument("--input", dest="inputs", action=_OldInputSpelling, help=argparse.SUPPRESS)
    parser.add_argument("--out", required=True, help="output CSV: path, label, probability, error")
    parser.add_argument(
        "--root",
        default=None,
        help="folder every image must lie in; CSV rows resolve against it (default: the folder or the CSV's folder)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images scored per batch")
    parser.add_argument("--split", default=None, help="with a manifest CSV: only this split")
    parser.add_argument(
        "--params", default="params.yaml", help="tracking URI and image limits (MLFLOW_TRACKING_URI wins)"
    )
    return parser


@errors.cli_errors("predict")
def main(argv: list[str] | None = None) -> int:
    import mlflow

    from components.core.config import ParamsError, load_params
    from components.core.tracking_connection import resolve_tracking_uri, shown_uri, use_tracking_uri

    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params) if Path(args.params).exists() else None
        uri = resolve_tracking_uri(params.tracking) if params else None
        if uri:
            use_tracking_uri(uri)
        limits = ImageLimits.from_config(params.validate) if params else None
        result = run_predict(args.model, args.inputs, args.out, args.batch_size, args.split, args.root, limits)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"predict: {exc}", file=sys.stderr)
        return 2
    except mlflow.exceptions.MlflowException as exc:
        print(f"predict: could not load {args.model} from {shown_uri()}: {exc.message}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.out_csv}: {result.n_images} images, {result.n_failed} could not be scored "
        f"(engine: {result.engine})"
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
