"""The drift check of a scheduled run: today's new images against the last model's reference.

    python -m components.drift_check --model-dir models/finetune --manifest data/validated.csv --out reports/drift.json

Run by the training flow after validate (not a DVC stage: its answer decides whether training runs).
The statistics live in components/modeling/drift.py; this is the command around them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from components.core import errors, runtime
from components.core.config import Params, ParamsError, load_params
from components.core.contracts import ContractError, read_manifest
from components.core.paths import DRIFT_REPORT, VALIDATED_MANIFEST
from components.ingestion.images import ImageLimits
from components.modeling.drift import (
    REFERENCE_FILE,
    DriftReport,
    Reference,
    compare,
    embed,
    sample_per_class,
    sha_prefixes,
)


def run_drift(params: Params, manifest: str | Path, model_dir: str | Path, out_path: str | Path) -> DriftReport:
    """Compare today's new images (those not in the model's training data) with the model's reference."""
    from components.modeling.model_folder import load_model_dir

    started, config = time.perf_counter(), params.drift
    reference = Reference.load(Path(model_dir) / REFERENCE_FILE)
    frame = read_manifest(manifest)
    new = frame[~np.isin(sha_prefixes(frame["sha256"]), reference.known)].reset_index(drop=True)
    if len(new):
        rows = sample_per_class(new["label"].to_numpy(), config.sample_per_class, params.project.seed)
        sample = new.iloc[rows]
        folder = load_model_dir(model_dir)
        features, probs = embed(
            folder.model,
            sample["path"].tolist(),
            folder.image_size,
            params.train_head.batch_size,
            ImageLimits.from_config(params.validate),
        )
        report = compare(
            reference, features, sample["label"].tolist(), probs, config, params.project.seed, new_images=len(new)
        )
    else:
        report = compare(reference, np.zeros((0, reference.features.shape[1])), [], None, config)
    report = report.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})
    report.write(out_path)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.drift_check", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (section drift and the image limits)")
    parser.add_argument("--manifest", type=Path, default=VALIDATED_MANIFEST, help="today's validated manifest")
    parser.add_argument("--model-dir", required=True, help="the champion's model folder (with drift_reference.npz)")
    parser.add_argument("--out", type=Path, default=DRIFT_REPORT, help="the drift report to write (JSON)")
    return parser


@errors.cli_errors("drift")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run_drift(load_params(args.params), args.manifest, args.model_dir, args.out)
    except (ParamsError, ContractError, ValueError) as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return 2
    print(
        f"drift: {'DRIFT' if report.drifted else 'no drift'} on {report.sampled_images} of {report.new_images} new "
        f"images; retrain={report.retrain} ({report.reason}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
