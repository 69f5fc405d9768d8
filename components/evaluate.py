"""Stage `evaluate`: score the fine-tuned model on the test split, log it, register it, gate promotion.

Writes to `reports/evaluate/`: metrics.json (full), classification_report.txt, confusion_matrix.png,
reliability.png (calibration), worst_errors.png (the most confident mistakes), model_card.md and
promotion.json (`contracts.PromotionRecord`); one CSV row per test image (--predictions:
path,actual,predicted,probability: `dvc plots` draws its confusion matrix per experiment); and a flat
`metrics.json` (`contracts.TestMetrics`) for `dvc metrics show`. In MLflow (`components.lifecycle.evaluation_run`): a
new run (tag stage=evaluate, nested under the pipeline's parent run, the test split as its "evaluation"
dataset input, the figures also as images) holding all of it plus the served model with the test metrics
linked to it (MLflow 3 LoggedModel; `components/scoring/serving_model.py`, logged from code), registered as a new
version; alias `champion` moves to it only through the gate in `components.lifecycle.promotion` (against the
champion re-scored on today's test split), and alias `challenger` once its reports are logged. Inside a DVC
experiment (DVC_EXP_NAME set) the model is registered only with `evaluate.experiments.register_model`, and
may become champion only with `evaluate.experiments.promote`.

Reads only its `EvaluatePaths` (all declared in dvc.yaml): the validated manifest, the model folders
(`model_folder.load_model_dir`, sha256-checked; the head's only for the card), the ingest report and the
validation summary (data versions and the quarantined count on the model card; either may be absent for a
hand-made manifest), and train_head's suspect labels (`components.scoring.evaluation_reports`: reported only).

CLI (dvc.yaml): python -m components.evaluate --params params.yaml --manifest data/validated.csv \
    --model-dir models/finetune --head-dir models/head --report-dir reports/evaluate --metrics metrics.json \
    --predictions reports/test_predictions.csv --suspects reports/train_head/label_issues.csv \
    --ingest-report reports/ingest.json --validation-summary reports/validation/summary.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components.core import errors, files, runtime, tracking
from components.core.config import Params, ParamsError, load_params
from components.core.contracts import RUN_INFO_FILE, ContractError, IngestReport, TestMetrics, ValidationSummary
from components.core.overrides import add_set_argument
from components.core.paths import EvaluatePaths
from components.core.settings import environment, workspace_root
from components.core.tracking_connection import RetryPolicy, TrackingUnavailable
from components.ingestion.images import ImageLimits
from components.lifecycle.evaluation_run import log_evaluation, log_reports
from components.lifecycle.lineage import data_versions, lineage_tags
from components.lifecycle.model_packaging import example_input
from components.lifecycle.promotion import apply_decision, judge_challenger, not_registered, refused, scores_of
from components.lifecycle.registry import describe_version, register_version, set_challenger
from components.modeling import onnx_inference
from components.modeling.data import image_batches, load_split
from components.modeling.frozen_forward import Engine, FrozenRunner
from components.modeling.metrics import compute_metrics, flat_metrics, predictions
from components.modeling.model_folder import ModelFolder, load_model_dir, read_model_info
from components.scoring import scoring
from components.scoring.evaluation_plots import write_predictions
from components.scoring.evaluation_reports import score_summary, test_suspects, write_reports
from components.scoring.model_card import model_card, quarantined_count, split_counts


@dataclass
class EvaluationResult:
    accuracy: float
    macro_f1: float
    ece: float
    n_test: int
    run_id: str
    model_version: str
    promoted: bool
    reasons: list[str]
    report_dir: Path
    metrics_path: Path


def scoring_runner(model: Any, engine: Engine, image_size: int, cache_dir: str | Path | None = None) -> FrozenRunner:
    """The fine-tuned model's forward pass on ONNX Runtime where it is faster (checked against Keras), else Keras.

    The ONNX file goes to the workspace's one ONNX cache (train_head's backbone export lives there too),
    fixed to the served input size: the file evaluate accepts here is the one the served model runs.
    """
    runner = FrozenRunner(
        model, cache_dir=cache_dir or workspace_root() / onnx_inference.CACHE_DIR, engine=engine, input_size=image_size
    )
    print(f"scoring: {runner.engine} ({runner.reason})")
    return runner


def predict_probabilities(
    runner: FrozenRunner, paths: list[str], image_size: int, batch_size: int, limits: ImageLimits
) -> np.ndarray:
    """Softmax outputs for the images in order, on the runner's engine (a progress bar where one is shown)."""
    batches = image_batches(paths, image_size, batch_size, limits=limits)
    return np.asarray(runner.predict(batches, verbose=runtime.progress_verbosity()), dtype=np.float64)


def version_tags(
    lineage: dict[str, str], run_id: str, folder: ModelFolder, runner: FrozenRunner, tree_sha256: str | None
) -> dict[str, str]:
    """What the registered version carries: lineage, its run, and the hashes loaders verify it against."""
    onnx = runner.accepted_export
    return {
        **lineage,
        "run_id": run_id,
        scoring.SHA256_TAG: folder.info.model_sha256,
        **({scoring.ONNX_SHA256_TAG: onnx.sha256} if onnx else {}),
        **({scoring.TREE_SHA256_TAG: tree_sha256} if tree_sha256 else {}),
    }


def run_evaluate(params: Params, paths: EvaluatePaths) -> EvaluationResult:
    """Score, report, log, register and gate one trained model (see the module docstring)."""
    config, name = params.evaluate, params.tracking.registered_model
    policy = RetryPolicy.from_config(params.tracking)
    limits = ImageLimits.from_config(params.validate)
    tracking.require_server(params.tracking)  # an outage is told before the model loads and the test set is scored
    folder = load_model_dir(paths.model_dir)  # refused (sha256, safe mode) before any output folder is made
    files.ensure_writable(paths.report_dir, paths.metrics, paths.predictions)  # before registering: no rerun twice
    head_info = read_model_info(paths.head_dir)[1] if (paths.head_dir / RUN_INFO_FILE).is_file() else None
    validation = ValidationSummary.read_optional(paths.validation_summary)
    versions = data_versions(IngestReport.read_optional(paths.ingest_report), validation, folder.info)
    split = load_split(paths.manifest, "test", folder.classes)
    if not len(split):
        raise ValueError(f"{paths.manifest}: the test split is empty")
    runner = scoring_runner(folder.model, config.inference_engine, folder.image_size)
    probs = predict_probabilities(runner, split.paths, folder.image_size, config.batch_size, limits)
    metrics = compute_metrics(
        split.labels, probs, folder.classes, calibration_bins_count=config.calibration_bins, top_k=config.top_k
    )
    suspect_numbers, left_out = test_suspects(paths.suspects, head_info, split, predictions(probs))
    metrics.update(suspect_numbers)  # reported only: promotion.scores_of reads the headline metrics
    print(score_summary(metrics, left_out, runner.engine))
    lineage = lineage_tags(params, folder.info, head_info, versions)

    with files.atomic_dir(paths.report_dir) as out:
        write_reports(out, split, probs, metrics, config.worst_examples, limits, left_out)
        # A DVC experiment (dvc exp run, the flow's --set) registers and promotes only when its settings say so.
        experiment = environment().dvc_exp_name
        register = not experiment or config.experiments.register_model
        example = example_input(split.paths[0], limits) if register else None
        run_id, model_uri, tree_sha256 = log_evaluation(
            params, folder, metrics, lineage, example, paths.manifest, policy, runner
        )
        identity = {"registered_model": name, "run_id": run_id, "lineage": lineage}
        if model_uri is None:
            reason = f"DVC experiment {experiment}: not registered (evaluate.experiments.register_model is off)"
            decision = not_registered(scores_of(metrics), reason, **identity)
        else:
            decision = judge_challenger(config.promotion, scores_of(metrics), split, limits, policy, **identity)
            if experiment and not config.experiments.promote and decision.promoted:
                reason = f"DVC experiment {experiment}: evaluate.experiments.promote is off, so it stays challenger"
                decision = refused(decision, reason)
            tags = version_tags(lineage, run_id, folder, runner, tree_sha256)
            decision = apply_decision(name, register_version(name, model_uri, tags, policy), decision, policy)
        version = decision.version
        card = model_card(
            name,
            folder.classes,
            folder.info,
            metrics,
            split_counts(paths.manifest),
            lineage,
            quarantined_count(validation),
            decision.promoted if version else None,
            decision.reasons,
            version or None,
        )
        (out / "model_card.md").write_text(card, encoding="utf-8")
        if version:
            describe_version(name, version, card, policy)
        decision.write(out / "promotion.json")
        log_reports(run_id, out, policy)
        if version:
            set_challenger(name, version, policy)

    write_predictions(split, probs, paths.predictions)
    TestMetrics.model_validate(flat_metrics(metrics)).write(paths.metrics)
    return EvaluationResult(
        accuracy=metrics["accuracy"],
        macro_f1=metrics["macro_f1"],
        ece=metrics["ece"],
        n_test=metrics["n_test"],
        run_id=run_id,
        model_version=version,
        promoted=decision.promoted,
        reasons=decision.reasons,
        report_dir=paths.report_dir,
        metrics_path=paths.metrics,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate", description="Evaluate, register and gate the fine-tuned model."
    )
    parser.add_argument("--params", default="params.yaml", help="settings file")
    EvaluatePaths.add_arguments(parser)
    add_set_argument(parser, "override one setting (repeatable)")
    return parser


@errors.cli_errors("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = EvaluatePaths.from_args(args)
    try:
        params = load_params(args.params, args.overrides)
        runtime.configure_tensorflow(params.project.seed)
        result = run_evaluate(params, paths)
    except (ParamsError, ContractError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except TrackingUnavailable as exc:
        print(
            f"evaluate: {exc}\nThe trained model is untouched in {paths.model_dir}: rerun this stage "
            "(dvc repro evaluate) once MLflow answers, no retraining needed.",
            file=sys.stderr,
        )
        return 1
    verdict = "now champion" if result.promoted else "stays challenger"
    print(
        f"registered {params.tracking.registered_model} v{result.model_version} ({verdict}); "
        f"reports in {result.report_dir}"
    )
    for reason in result.reasons:
        print(f"  {reason}")
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
