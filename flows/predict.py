"""Batch prediction flow: score a folder or manifest of images with a registered model.

python -m flows.predict --inputs DIR_OR_CSV --out predictions.csv [--model models:/NAME@champion]

The CLI is trusted. The deployment (prefect.yaml) runs `batch_predict_deployment`, whose run form is
confined by the workspace's `deployments:` settings first (components/lifecycle/run_forms.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.core.config import load_params
from components.core.orchestration_config import OrchestrationConfig
from components.lifecycle import run_forms
from flows.limits import flow_deadline, retry_outages


@task(name="score-images", retry_condition_fn=retry_outages)  # timeout and retries: orchestration settings
def score_images(model_uri: str, inputs: str, out_csv: str, batch_size: int) -> dict:
    from components.predict import run_predict

    result = run_predict(model_uri, inputs, out_csv, batch_size)
    return {
        "out_csv": str(result.out_csv),
        "n_images": result.n_images,
        "n_failed": result.n_failed,
        "engine": result.engine,
    }


def scoring_task(limits: OrchestrationConfig):
    """score_images bounded by `orchestration.predict_timeout_s`, retried only after an outage."""
    return score_images.with_options(
        timeout_seconds=limits.predict_timeout_s,
        retries=limits.predict_retries,
        retry_delay_seconds=limits.retry_delays_s if limits.predict_retries else 0,
        retry_jitter_factor=limits.retry_jitter_factor,
    )


@flow(name="batch-predict", log_prints=True)
def batch_predict_flow(
    inputs: str,
    out_csv: str = "predictions.csv",
    model_uri: str | None = None,
    params_path: str = "params.yaml",
    batch_size: int = 64,
) -> dict:
    """Score every image under `inputs` (default model: the registry's champion) into a CSV."""
    from components.core.tracking_connection import resolve_tracking_uri, shown_uri, use_tracking_uri

    logger = get_run_logger()
    params = load_params(params_path)
    use_tracking_uri(resolve_tracking_uri(params.tracking, Path(params_path).resolve().parent))
    model_uri = model_uri or f"models:/{params.tracking.registered_model}@champion"
    logger.info("scoring %s with %s from %s", inputs, model_uri, shown_uri())
    limits = params.orchestration
    with flow_deadline(limits.flow_timeout_s, "the batch prediction"):
        result = scoring_task(limits)(model_uri, inputs, out_csv, batch_size)
    create_markdown_artifact(
        key="batch-predictions",
        markdown=f"# Batch prediction\n\n- model: `{model_uri}`\n- inputs: `{inputs}`\n"
        f"- output: `{result['out_csv']}`\n"
        f"- images scored: {result['n_images'] - result['n_failed']} of {result['n_images']}\n"
        f"- engine: {result['engine']}\n",
    )
    return result


@flow(name="batch-predict", log_prints=True)
def batch_predict_deployment(
    inputs: str,
    out_csv: str = "predictions.csv",
    model_uri: str | None = None,
    params_path: str = "params.yaml",
    batch_size: int = 64,
) -> dict:
    """Score every image under `inputs` into `out_csv` inside the workspace's output folder.

    A run form (untrusted) is checked against the workspace's `deployments:` settings before anything
    runs: `inputs` under `input_roots`, `out_csv` inside `output_dir`, `model_uri` a registered name.
    """
    form = run_forms.check_batch_predict_form(inputs, out_csv, model_uri, params_path, batch_size)
    Path(form["out_csv"]).parent.mkdir(parents=True, exist_ok=True)
    return batch_predict_flow.fn(form["inputs"], form["out_csv"], form["model_uri"], params_path, form["batch_size"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", required=True, help="folder of images, or CSV with a 'path' column")
    parser.add_argument("--out", default="predictions.csv", help="output CSV: path, label, probability, error")
    parser.add_argument("--model", default=None, help="MLflow model URI; default models:/<registered_model>@champion")
    parser.add_argument("--params", default="params.yaml", help="settings file (tracking URI, registered model)")
    parser.add_argument("--batch-size", type=int, default=64, help="images scored per batch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = batch_predict_flow(args.inputs, args.out, args.model, args.params, args.batch_size)
    print(
        f"wrote {result['out_csv']}: {result['n_images']} images, {result['n_failed']} could not be scored "
        f"(engine: {result['engine']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
