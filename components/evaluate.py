"""Stage `evaluate`: score the fine-tuned model on the test split, log it, register it, gate promotion.

Writes to `reports/evaluate/`: metrics.json (full), classification_report.txt, confusion_matrix.png,
reliability.png (calibration), worst_errors.png (the most confident mistakes), model_card.md and
promotion.json (`contracts.PromotionRecord`); given --predictions, one CSV row per test image
(path,actual,predicted,probability: `dvc plots` draws its confusion matrix per experiment); and a flat
`metrics.json` (`contracts.TestMetrics`) for `dvc metrics show`. In MLflow: a new run (tag stage=evaluate,
nested under the pipeline's parent run, the test split as its "evaluation" dataset input, the figures
also as images) holding all of it plus the served model with the test metrics linked to it (MLflow 3
LoggedModel; `components/serving_model.py`, logged from code), registered as a new version; alias `champion`
moves to it only through the gate in `components.registry` (against the champion re-scored on
today's test split), and alias `challenger` once its reports are logged. Inside a DVC experiment
(DVC_EXP_NAME set) the model is registered only with `evaluate.experiments.register_model`, and may
become champion only with `evaluate.experiments.promote`.

Reads (all declared in dvc.yaml): the validated manifest, the model folders (`data.load_model_dir`,
sha256-checked), `reports/ingest.json` and `reports/validation/summary.json` (data versions and the
quarantined count on the model card; either may be absent for a hand-made manifest).

Suspect labels (train_head's `label_issues.csv`, --suspects): the headline accuracy is on every test image;
`accuracy_without_suspects` leaves out the test images flagged as suspect labels (`n_test_suspects`, listed
in test_suspects.csv). Both are reported only: promotion and every other decision use the headline metrics.

CLI (dvc.yaml): python -m components.evaluate --params params.yaml --manifest data/validated.csv \
    --model-dir models/finetune --head-dir models/head --report-dir reports/evaluate --metrics metrics.json \
    --predictions reports/test_predictions.csv --suspects reports/train_head/label_issues.csv
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import errors, files, hashing, label_issues, onnx_inference, registry, runtime, scoring, tracking
from components.config import Params, ParamsError, load_params
from components.contracts import (
    RUN_INFO_FILE,
    ContractError,
    IngestReport,
    ModelRunInfo,
    TestMetrics,
    ValidationSummary,
    read_manifest,
)
from components.data import ModelFolder, image_batches, load_model_dir, load_rgb, load_split, read_model_info
from components.evaluation_plots import (
    FIGURES,
    plot_confusion_matrix,
    plot_reliability,
    plot_worst_errors,
    write_predictions,
)
from components.images import ImageLimits
from components.metrics import compute_metrics, flat_metrics, mlflow_key, predictions
from components.model_card import model_card, quarantined_count, split_counts
from components.settings import environment, workspace_root
from components.tracking_connection import RetryPolicy, TrackingUnavailable, shown_uri, with_retries

INGEST_REPORT = Path("reports/ingest.json")
SUSPECTS_REPORT = Path("reports/train_head") / label_issues.REPORT_FILE
TEST_SUSPECTS_FILE = "test_suspects.csv"
VALIDATION_SUMMARY = Path("reports/validation/summary.json")


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


def scoring_runner(
    model: Any, engine: onnx_inference.Engine, image_size: int, cache_dir: str | Path | None = None
) -> onnx_inference.FrozenRunner:
    """The fine-tuned model's forward pass on ONNX Runtime where it is faster (checked against Keras), else Keras.

    The ONNX file goes to the workspace's one ONNX cache (train_head's backbone export lives there too),
    fixed to the served input size: the file evaluate accepts here is the one the served model runs.
    """
    runner = onnx_inference.FrozenRunner(
        model, cache_dir=cache_dir or workspace_root() / onnx_inference.CACHE_DIR, engine=engine, input_size=image_size
    )
    print(f"scoring: {runner.engine} ({runner.reason})")
    return runner


def predict_probabilities(
    runner: onnx_inference.FrozenRunner, paths: list[str], image_size: int, batch_size: int, limits: ImageLimits
) -> np.ndarray:
    """Softmax outputs for the images in order, on the runner's engine (a progress bar where one is shown)."""
    batches = image_batches(paths, image_size, batch_size, limits=limits)
    return np.asarray(runner.predict(batches, verbose=runtime.progress_verbosity()), dtype=np.float64)


def served_onnx(runner: onnx_inference.FrozenRunner) -> onnx_inference.OnnxExport | None:
    """The accepted ONNX file the test split was scored with, which the served model may then run; else None."""
    return runner.export if runner.engine == "onnxruntime" and runner.export is not None else None


def example_input(path: str, limits: ImageLimits, size: int = 64) -> pd.DataFrame:
    """One small test image as base64 JPEG: the request shape `mlflow models serve` expects."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_rgb(path, size, limits)).save(buffer, "JPEG", quality=85)
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})


def log_evaluation(
    params: Params,
    folder: ModelFolder,
    metrics: dict[str, Any],
    lineage: dict[str, str],
    example: pd.DataFrame | None,
    manifest: str | Path,
    policy: RetryPolicy,
    runner: onnx_inference.FrozenRunner | None = None,
) -> tuple[str, str | None, str | None]:
    """The evaluation run (test split as dataset input, settings, metrics) and, given an example, the served
    model with the metrics linked to it (MLflow 3 LoggedModel): (run id, model URI, the logged folder's digest).

    The digest (`scoring.logged_tree_digest`, every file of the logged model) is read back from the store
    right after logging, trusting it for that moment; registration records it as `model_tree_sha256`.

    The run nests under the pipeline's parent run and carries the workspace and git tags (tracking.stage_run), and
    the tag `inference_engine` (what scored the test split). When that was ONNX Runtime, the served model
    carries the same checked ONNX file."""
    engine = runner.engine if runner is not None else "keras"
    onnx = served_onnx(runner) if runner is not None else None
    with tracking.stage_run(params.tracking, "evaluate", {**lineage, "inference_engine": engine}) as (
        client,
        run_id,
        _,
    ):
        frame = read_manifest(manifest)
        test_split = with_retries(
            "log the test split",
            tracking.log_dataset,
            run_id,
            manifest,
            frame[frame["split"] == "test"],
            hashing.manifest_version(manifest),
            "evaluation",
            policy=policy,
        )
        with_retries(
            "log params",
            tracking.log_params,
            client,
            run_id,
            {
                **{
                    f"evaluate.{k}": v
                    for k, v in params.evaluate.model_dump().items()
                    if k not in ("promotion", "serving")
                },
                **{f"promotion.{k}": v for k, v in params.evaluate.promotion.model_dump().items()},
                **{f"serving.{k}": v for k, v in params.evaluate.serving.model_dump().items()},
                "image_size": folder.image_size,
                "n_classes": len(folder.classes),
                "tracking_server": shown_uri(),
            },
            policy=policy,
        )
        if example is None:  # an experiment that does not register: metrics and reports only
            log_test_metrics(client, run_id, metrics, None, test_split, policy)
            return run_id, None, None
        config = registry.serving_model_config(
            params, folder.image_size, folder.info.model_sha256, onnx.sha256 if onnx else None
        )
        info = with_retries(  # into the active run: the stage run
            "log the model",
            registry.log_pyfunc,
            folder.model_path,
            folder.classes,
            config,
            example,
            onnx.path if onnx else None,
            policy=policy,
        )
        tree_sha256 = scoring.logged_tree_digest(info.model_uri, policy)
        log_test_metrics(client, run_id, metrics, info.model_id, test_split, policy)
    return run_id, info.model_uri, tree_sha256


def log_test_metrics(
    client: Any, run_id: str, metrics: dict[str, Any], model_id: str | None, dataset: Any, policy: RetryPolicy
) -> None:
    """The test metrics on the run, each naming the dataset that produced them (the test split's name and
    digest, as logged as the run's input) and, given a model id, on the logged model too (its Models tab row)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = [
        Metric(
            mlflow_key(k),
            float(v),
            now,
            0,
            model_id=model_id,
            dataset_name=dataset.name,
            dataset_digest=dataset.digest,
        )
        for k, v in flat_metrics(metrics).items()
    ]
    for start in range(0, len(logged), 1000):  # MLflow's log_batch limit
        with_retries("log metrics", client.log_batch, run_id, metrics=logged[start : start + 1000], policy=policy)


def log_reports(run_id: str, report: Path, policy: RetryPolicy) -> None:
    """Every report file, the card and decision included (they exist only after registration), and the
    figures as MLflow images as well (the run's image view, not only its files)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in sorted(report.iterdir()):
        if path.is_file():
            with_retries(f"upload {path.name}", client.log_artifact, run_id, str(path), "evaluate", policy=policy)
    for name in FIGURES:
        if (report / name).is_file():
            with_retries(
                f"log image {name}",
                tracking.log_picture,
                client,
                run_id,
                report / name,
                f"figures/{name}",
                policy=policy,
            )


def test_suspects(
    suspects_path: str | Path | None, head_info: ModelRunInfo | None, split: Any, y_pred: np.ndarray
) -> tuple[dict[str, float], pd.DataFrame | None]:
    """Accuracy on the test images not flagged as suspect labels, and the flagged ones (None: not checked).

    Checked means the report lists a split column and, where the head's run.json is at hand, that the
    head's check covered the test split (a header-only report from a skipped check is not "none found")."""
    suspects = label_issues.suspects_of(suspects_path, "test") if suspects_path else None
    if suspects is None or (head_info is not None and "test" not in (head_info.suspect_label_splits or [])):
        return {}, None
    flagged = np.isin(np.asarray(split.paths, dtype=object), np.asarray(suspects, dtype=object))
    correct = y_pred == split.labels
    numbers: dict[str, float] = {"n_test_suspects": int(flagged.sum())}
    if (~flagged).any():
        numbers["accuracy_without_suspects"] = float(correct[~flagged].mean())
    rows = np.flatnonzero(flagged)
    left_out = pd.DataFrame(
        {
            "path": [split.paths[i] for i in rows],
            "given_label": [split.classes[split.labels[i]] for i in rows],
            "predicted": [split.classes[y_pred[i]] if y_pred[i] >= 0 else "" for i in rows],
        }
    )
    return numbers, left_out


def run_evaluate(
    params: Params,
    manifest: str | Path,
    model_dir: str | Path,
    head_dir: str | Path | None,
    report_dir: str | Path,
    metrics_path: str | Path,
    workspace: str | Path = ".",
    predictions_path: str | Path | None = None,
    suspects_path: str | Path | None = None,
) -> EvaluationResult:
    """Score, report, log, register and gate one trained model (see the module docstring)."""
    workspace = Path(workspace)
    config = params.evaluate
    name = params.tracking.registered_model
    policy = RetryPolicy.from_config(params.tracking)
    limits = ImageLimits.from_config(params.validate)
    # Before registering: a rerun would register twice.
    files.ensure_writable(report_dir, metrics_path, *([predictions_path] if predictions_path else []))
    folder = load_model_dir(model_dir)
    head_info: ModelRunInfo | None = None
    if head_dir and (Path(head_dir) / RUN_INFO_FILE).is_file():
        head_info = read_model_info(head_dir)[1]
    ingest = IngestReport.read_optional(workspace / INGEST_REPORT)
    validation = ValidationSummary.read_optional(workspace / VALIDATION_SUMMARY)
    split = load_split(manifest, "test", folder.classes)
    if not len(split):
        raise ValueError(f"{manifest}: the test split is empty")
    runner = scoring_runner(folder.model, config.inference_engine, folder.image_size)
    probs = predict_probabilities(runner, split.paths, folder.image_size, config.batch_size, limits)
    metrics = compute_metrics(
        split.labels, probs, folder.classes, calibration_bins_count=config.calibration_bins, top_k=config.top_k
    )
    suspect_numbers, left_out = test_suspects(suspects_path, head_info, split, predictions(probs))
    metrics.update(suspect_numbers)  # reported only: registry.scores_of reads the headline metrics
    print(
        f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
        f"ECE {metrics['ece']:.4f} on {metrics['n_test']} images (scored with {runner.engine})"
    )
    if left_out is not None:
        without = metrics.get("accuracy_without_suspects")
        print(
            f"suspect test labels: {len(left_out)}; accuracy without them "
            + (f"{without:.4f}" if without is not None else "n/a (every test image is a suspect)")
        )
    lineage = registry.lineage_tags(
        params, folder.info, head_info, registry.data_versions(ingest, validation, folder.info), workspace
    )

    with files.atomic_dir(report_dir) as out:
        from sklearn.metrics import classification_report

        y_pred = predictions(probs)
        plot_confusion_matrix(
            split.labels, np.where(y_pred >= 0, y_pred, 0), folder.classes, out / "confusion_matrix.png"
        )
        plot_reliability(pd.DataFrame(metrics["calibration"]), metrics["ece"], out / "reliability.png")
        plot_worst_errors(split, probs, config.worst_examples, out / "worst_errors.png", limits)
        (out / "classification_report.txt").write_text(
            classification_report(
                split.labels,
                y_pred,
                labels=list(range(len(folder.classes))),
                target_names=folder.classes,
                zero_division=0,
            )
        )
        files.write_json(out / "metrics.json", metrics)
        if left_out is not None:
            files.write_csv(left_out, out / TEST_SUSPECTS_FILE)

        # A DVC experiment (dvc exp run, the flow's --set) registers and promotes only when its settings say so.
        experiment = environment().dvc_exp_name
        register = not experiment or config.experiments.register_model
        example = example_input(split.paths[0], limits) if register else None
        run_id, model_uri, tree_sha256 = log_evaluation(
            params, folder, metrics, lineage, example, manifest, policy, runner
        )
        if model_uri is None:
            version = ""
            decision = registry.PromotionDecision(
                False,
                [f"note: DVC experiment {experiment}: not registered (evaluate.experiments.register_model is off)"],
                registry.scores_of(metrics),
            )
        else:
            champion_version, champion, problem, class_set_changed = registry.rescore_champion(
                name, split, limits, policy
            )
            decision = registry.decide_promotion(
                config.promotion, registry.scores_of(metrics), champion, champion_version, problem, class_set_changed
            )
            if experiment and not config.experiments.promote and decision.promoted:
                decision.refuse(
                    f"DVC experiment {experiment}: evaluate.experiments.promote is off, so it stays challenger"
                )
            onnx = served_onnx(runner)
            version = registry.register_version(
                name,
                model_uri,
                {
                    **lineage,
                    "run_id": run_id,
                    registry.SHA256_TAG: folder.info.model_sha256,
                    **({registry.ONNX_SHA256_TAG: onnx.sha256} if onnx else {}),
                    **({scoring.TREE_SHA256_TAG: tree_sha256} if tree_sha256 else {}),
                },
                policy,
            )
            registry.apply_decision(name, version, decision, policy)

        card = model_card(
            name,
            folder.classes,
            folder.info,
            metrics,
            split_counts(manifest),
            lineage,
            quarantined_count(validation),
            decision.promoted if version else None,
            decision.reasons,
            version or None,
        )
        (out / "model_card.md").write_text(card, encoding="utf-8")
        if version:
            registry.describe_version(name, version, card, policy)
        decision.record(name, version, run_id, lineage).write(out / "promotion.json")
        log_reports(run_id, out, policy)
        if version:
            registry.set_challenger(name, version, policy)

    if predictions_path:
        write_predictions(split, probs, predictions_path)
    TestMetrics.model_validate(flat_metrics(metrics)).write(metrics_path)
    return EvaluationResult(
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["ece"],
        metrics["n_test"],
        run_id,
        version,
        decision.promoted,
        decision.reasons,
        Path(report_dir),
        Path(metrics_path),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate", description="Evaluate, register and gate the fine-tuned model."
    )
    parser.add_argument("--params", default="params.yaml", help="settings file")
    parser.add_argument("--manifest", required=True, help="validated manifest (data/validated.csv): its test split")
    parser.add_argument("--model-dir", required=True, help="the fine-tuned model folder (models/finetune)")
    parser.add_argument("--head-dir", default=None, help="the train_head model folder, for the model card")
    parser.add_argument("--report-dir", required=True, help="folder for the reports, figures and model card")
    parser.add_argument("--metrics", required=True, help="flat test metrics for dvc metrics show (metrics.json)")
    parser.add_argument(
        "--predictions",
        default=None,
        help="CSV of path,actual,predicted,probability per test image (dvc plots: confusion)",
    )
    parser.add_argument(
        "--suspects",
        default=str(SUSPECTS_REPORT),
        help="train_head's suspect-label report: test accuracy is also reported without the flagged test images",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting (repeatable)",
    )
    return parser


@errors.cli_errors("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        runtime.configure_tensorflow(params.project.seed)
        result = run_evaluate(
            params,
            args.manifest,
            args.model_dir,
            args.head_dir,
            args.report_dir,
            args.metrics,
            predictions_path=args.predictions,
            suspects_path=args.suspects,
        )
    except (ParamsError, ContractError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except TrackingUnavailable as exc:
        print(
            f"evaluate: {exc}\nThe trained model is untouched in {args.model_dir}: rerun this stage "
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
    sys.exit(main())
