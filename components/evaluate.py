"""Stage `evaluate`: score the fine-tuned model on the test split, log it, register it, gate promotion.

Writes to `reports/evaluate/`: metrics.json (full), classification_report.txt, confusion_matrix.png,
reliability.png (calibration), worst_errors.png (the most confident mistakes), model_card.md and
promotion.json; and a flat `metrics.json` for `dvc metrics show`. In MLflow: a new run (tag
stage=evaluate) holding all of it plus the model as a pyfunc that takes raw images, registered as a
new version with alias `challenger`; alias `champion` moves to it only through the gate in
`components.registry.decide_promotion`, against the champion re-scored on today's test split.

CLI (dvc.yaml): python -m components.evaluate --params params.yaml --manifest data/validated.csv \
    --model-dir models/finetune --head-dir models/head --report-dir reports/evaluate --metrics metrics.json
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components import runtime, files, errors
from components.config import EvaluateConfig, Params, ParamsError, load_params
from components.data import Split, image_batches, load_rgb, load_split
from components.contracts import read_manifest
from components.registry import (
    CHAMPION,
    PromotionDecision,
    Scores,
    alias_version,
    apply_decision,
    decide_promotion,
    lineage_tags,
    register_version,
)
from components.tracking import RetryPolicy, TrackingUnavailable, scrub_credentials, setup_mlflow, shown_uri, with_retries

PYFUNC_NAME = "model"
# The modules the pyfunc imports when loaded somewhere without this project installed.
PYFUNC_CODE = ["__init__.py", "predict.py", "data.py", "runtime.py", "backbones.py", "config.py"]


@dataclass(frozen=True)
class ModelBundle:
    model: Any
    model_path: Path
    classes: list[str]
    classes_path: Path
    run_info: dict[str, Any]
    image_size: int


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
    extra: dict[str, Any] = field(default_factory=dict)


# --- scoring ------------------------------------------------------------------------------------

def load_model_dir(model_dir: str | Path, default_size: int) -> ModelBundle:
    """The model-dir contract: model.keras, classes.json, run.json (written by train_head/finetune)."""
    from components.data import load_keras_model

    model_dir = Path(model_dir)
    for name in ("model.keras", "classes.json"):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} not found: run the training stages first")
    run_info = files.read_json(model_dir / "run.json") if (model_dir / "run.json").is_file() else {}
    model = load_keras_model(model_dir / "model.keras")
    size = run_info.get("image_size") or _static_side(model) or default_size
    return ModelBundle(model, model_dir / "model.keras", list(files.read_json(model_dir / "classes.json")),
                       model_dir / "classes.json", run_info, int(size))


def _static_side(model: Any) -> int | None:
    shape = getattr(model, "input_shape", None)
    return shape[1] if shape and len(shape) == 4 and shape[1] == shape[2] else None


def predict_probabilities(model: Any, paths: list[str], image_size: int, batch_size: int) -> np.ndarray:
    """Softmax outputs for the images in order (Keras shows a progress bar)."""
    batches = image_batches(paths, image_size, batch_size)
    return np.asarray(model.predict(batches, verbose=1), dtype=np.float64)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per equal-width confidence bin: count, mean confidence, accuracy (top-label calibration)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = index == b
        rows.append({"low": edges[b], "high": edges[b + 1], "count": int(mask.sum()),
                     "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                     "accuracy": float(correct[mask].mean()) if mask.any() else np.nan})
    return pd.DataFrame(rows)


def expected_calibration_error(table: pd.DataFrame) -> float:
    filled = table[table["count"] > 0]
    total = filled["count"].sum()
    return float((filled["count"] / total * (filled["accuracy"] - filled["confidence"]).abs()).sum()) if total else 0.0


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], config: EvaluateConfig) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1, top-k (> 5 classes), ECE."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    bins = calibration_bins(probs.max(axis=1), y_pred == y_true, config.calibration_bins)
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "min_class_recall": float(recall.min()),
        "ece": expected_calibration_error(bins),
        "n_test": int(len(y_true)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "calibration": bins.to_dict(orient="records"),
    }
    if len(classes) > 5 and config.top_k < len(classes):
        metrics[f"top_{config.top_k}_accuracy"] = float(
            top_k_accuracy_score(y_true, probs, k=config.top_k, labels=labels))
    return metrics


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """One level, for `dvc metrics show` and MLflow: headline numbers plus recall_<class> etc."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    for name, values in metrics["per_class"].items():
        for key in ("recall", "precision", "f1"):
            flat[f"{key}_{name}"] = values[key]
    return flat


def mlflow_key(name: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", name)


# --- pictures -----------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    side = max(4.0, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
    ax.set_title(f"Test confusion matrix (n={len(y_true)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(bins: pd.DataFrame, ece: float, path: Path) -> None:
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    centers = (bins["low"] + bins["high"]) / 2
    width = float(bins["high"].iloc[0] - bins["low"].iloc[0])
    top.bar(centers, bins["accuracy"].fillna(0), width=width * 0.95, edgecolor="black", label="accuracy in bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability (top-label), ECE = {ece:.3f}")
    top.legend(loc="upper left")
    bottom.bar(centers, bins["count"], width=width * 0.95, color="gray")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_worst_errors(split: Split, probs: np.ndarray, count: int, path: Path) -> int:
    """The most confident mistakes, with true and predicted labels; returns how many are shown."""
    plt = _pyplot()
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != split.labels)
    worst = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:count]
    cols = max(1, min(4, len(worst)))
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst):
        ax.imshow(load_rgb(split.paths[i], 160))
        ax.set_title(f"true: {split.classes[split.labels[i]]}\npred: {split.classes[y_pred[i]]} "
                     f"({probs[i, y_pred[i]]:.2f})", fontsize=9)
    if not len(worst):
        axes[0, 0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("Most confident test mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return int(len(worst))


# --- model card ---------------------------------------------------------------------------------

def split_counts(manifest: str | Path) -> pd.DataFrame:
    frame = read_manifest(manifest)
    return frame.pivot_table(index="label", columns="split", values="path", aggfunc="count", fill_value=0)


def quarantined_count(workspace: Path) -> int | None:
    """Files validate set aside, from its summary where the stage wrote one."""
    summary = workspace / "reports" / "validation" / "summary.json"
    if not summary.is_file():
        return None
    data = files.read_json(summary)
    for key in ("quarantined", "n_quarantined", "quarantined_count", "bad"):
        value = data.get(key)
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, list):
            return len(value)
    return None


def model_card(params: Params, bundle: ModelBundle, metrics: dict[str, Any], counts: pd.DataFrame,
               lineage: dict[str, str], quarantined: int | None, decision: PromotionDecision | None,
               version: str | None) -> str:
    recipe = {k: v for k, v in bundle.run_info.items() if k not in {"run_id", "head_run_id"}}
    weak = [f"{name} (recall {m['recall']:.2f}, {m['support']} test images)"
            for name, m in metrics["per_class"].items() if m["recall"] < max(0.8, metrics["accuracy"] - 0.1)]
    per_class = "\n".join(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                          for name, m in metrics["per_class"].items())
    topk = "".join(f"- {k.replace('_', ' ')}: {v:.4f}\n" for k, v in metrics.items() if k.startswith("top_"))
    lines = [
        f"# Model card: {params.tracking.registered_model}" + (f" v{version}" if version else ""),
        "",
        "## Intended use",
        f"Classifies a photo into one of {len(bundle.classes)} classes: {', '.join(bundle.classes)}. "
        "Input: any RGB image (path, bytes or base64); output: label, its probability and all class probabilities. "
        "It always answers with one of these classes: images of anything else get a confident-looking wrong label. "
        "Not for decisions about people, safety or health.",
        "",
        "## Data",
        f"- data version: {lineage.get('data_version', 'unknown')}; data/raw md5 (dvc.lock): {lineage.get('data_raw_md5', 'n/a')}",
        f"- files quarantined by validation: {quarantined if quarantined is not None else 'n/a (no validation summary)'}",
        "",
        "Images per class and split:",
        "",
        markdown_table(counts),
        "",
        "## Training recipe",
        f"- backbone: {lineage.get('backbone')} (ImageNet transfer learning: head training, then fine-tuning)",
        f"- model settings: {params.model.model_dump()}",
        f"- head training: {params.train_head.model_dump()}",
        f"- fine-tuning: {params.finetune.model_dump()}",
        f"- from the training run: {recipe}",
        f"- MLflow runs: head {lineage.get('head_run_id', 'n/a')}, fine-tune {lineage.get('finetune_run_id', 'n/a')}",
        f"- code: git {lineage.get('git_commit')}, params sha256 {lineage.get('params_sha256', '')[:16]}",
        "",
        f"## Test metrics (n = {metrics['n_test']} held-out images)",
        f"- accuracy: {metrics['accuracy']:.4f}",
        f"- macro F1: {metrics['macro_f1']:.4f}",
        f"- expected calibration error: {metrics['ece']:.4f}",
        topk,
        "| class | precision | recall | F1 | test images |",
        "|---|---|---|---|---|",
        per_class,
        "",
        "## Known limits",
        *([f"- low recall: {w}" for w in weak] or ["- no class has recall well below the overall accuracy"]),
        f"- metrics come from {metrics['n_test']} test images: with few images per class they are noisy.",
        "- trained on this data set's photos only; other cameras, lighting or domains may score worse.",
    ]
    if decision is not None:
        lines += ["", "## Promotion", f"- decision: {'champion' if decision.promoted else 'stays challenger'}",
                  *[f"- {r}" for r in decision.reasons]]
    return "\n".join(lines) + "\n"


def markdown_table(counts: pd.DataFrame) -> str:
    columns = [c for c in ("train", "val", "test") if c in counts.columns] + \
              [c for c in counts.columns if c not in ("train", "val", "test")]
    header = "| class | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = [f"| {label} | " + " | ".join(str(int(counts.loc[label, c])) for c in columns) + " |" for label in counts.index]
    total = "| **all** | " + " | ".join(str(int(counts[c].sum())) for c in columns) + " |"
    return "\n".join([header, *rows, total])


# --- MLflow -------------------------------------------------------------------------------------

def pyfunc_requirements() -> list[str]:
    """Pinned from this environment: inferring them is slow and lists both tensorflow wheels."""
    wanted = ["mlflow", "keras", "pillow", "numpy", "pandas", "pydantic", "pyyaml"]
    for tf_dist in ("tensorflow-cpu", "tensorflow"):
        try:
            metadata.version(tf_dist)
        except metadata.PackageNotFoundError:
            continue
        wanted.insert(0, tf_dist)
        break
    return [f"{name}=={metadata.version(name)}" for name in wanted]


def _code_package(tmp: Path) -> Path:
    """A copy of just the modules the pyfunc imports, as a `components` package."""
    here = Path(__file__).resolve().parent
    package = tmp / "components"
    package.mkdir()
    for name in PYFUNC_CODE:
        (package / name).write_bytes((here / name).read_bytes())
    return package


def example_input(path: str, size: int = 64) -> pd.DataFrame:
    """One small test image as base64 JPEG: the request shape `mlflow models serve` expects."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(load_rgb(path, size)).save(buffer, "JPEG", quality=85)
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()]})


def log_pyfunc(bundle: ModelBundle, example: pd.DataFrame, batch_size: int) -> Any:
    """Log the raw-image pyfunc (the .keras file travels inside it as an artifact)."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Schema

    from components.predict import ImageClassifier

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),  # path, raw bytes or base64 string
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
                        ColSpec(Map(DataType.double), "probabilities")]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=PYFUNC_NAME,
            python_model=ImageClassifier(),
            artifacts={"keras_model": str(bundle.model_path), "classes": str(bundle.classes_path)},
            code_paths=[str(_code_package(Path(tmp)))],
            model_config={"image_size": bundle.image_size, "batch_size": batch_size},
            signature=signature,
            input_example=example,
            pip_requirements=pyfunc_requirements(),
            metadata={"classes": bundle.classes, "image_size": bundle.image_size},
        )


def rescore_champion(name: str, split: Split, policy: RetryPolicy) -> tuple[str | None, Scores | None, str | None]:
    """(champion version, its scores on today's test split, or why it could not be scored)."""
    import mlflow
    from sklearn.metrics import recall_score

    version = alias_version(name, CHAMPION, policy)
    if version is None:
        return None, None, None
    try:
        champion = with_retries("load the champion", mlflow.pyfunc.load_model, f"models:/{name}/{version}", policy=policy)
        scorer = champion.unwrap_python_model()
        their_classes = list(scorer.classes)
        if set(their_classes) != set(split.classes):
            return version, None, f"class set differs: champion {their_classes} vs test split {split.classes}"
        probs = scorer.predict_proba(split.paths)
    except TrackingUnavailable:
        raise
    except Exception as exc:
        return version, None, f"could not load or run it: {scrub_credentials(exc)}"[:500]
    order = [their_classes.index(c) for c in split.classes]  # their columns in our class order
    y_pred = probs[:, order].argmax(axis=1)
    recall = recall_score(split.labels, y_pred, labels=list(range(len(split.classes))), average=None, zero_division=0)
    return version, Scores(float((y_pred == split.labels).mean()), float(recall.min()), len(split)), None


def track_and_register(params: Params, bundle: ModelBundle, split: Split, metrics: dict[str, Any],
                       lineage: dict[str, str], policy: RetryPolicy) -> tuple[str, str, PromotionDecision]:
    """Log the evaluation run and the pyfunc, register a version, apply the promotion gate."""
    import mlflow

    experiment_id = with_retries("reach the tracking server", setup_mlflow, params.tracking, policy=policy)
    run = with_retries("start a run", mlflow.start_run, experiment_id=experiment_id, run_name="evaluate",
                       tags={"stage": "evaluate", **lineage}, policy=policy)
    status = "FAILED"
    try:
        logged = {mlflow_key(k): v for k, v in flat_metrics(metrics).items()}
        with_retries("log metrics", mlflow.log_metrics, logged, policy=policy)
        with_retries("log params", mlflow.log_params, {
            **{f"evaluate.{k}": v for k, v in params.evaluate.model_dump().items() if k != "promotion"},
            **{f"promotion.{k}": v for k, v in params.evaluate.promotion.model_dump().items()},
            "image_size": bundle.image_size, "n_classes": len(bundle.classes),
            "tracking_server": shown_uri(),
        }, policy=policy)
        info = with_retries("log the model", log_pyfunc, bundle, example_input(split.paths[0]),
                            params.evaluate.batch_size, policy=policy)
        status = "FINISHED"
    finally:
        mlflow.end_run(status)
    name = params.tracking.registered_model
    champion_version, champion_scores, problem = rescore_champion(name, split, policy)
    challenger = Scores(metrics["accuracy"], metrics["min_class_recall"], metrics["n_test"])
    decision = decide_promotion(params.evaluate.promotion, challenger, champion_scores, champion_version, problem)
    version = register_version(name, info.model_uri, {**lineage, "run_id": run.info.run_id}, policy)
    apply_decision(name, version, decision, policy)
    return run.info.run_id, version, decision


# --- the stage ----------------------------------------------------------------------------------

def run_evaluate(params: Params, manifest: str | Path, model_dir: str | Path, head_dir: str | Path | None,
                 report_dir: str | Path, metrics_path: str | Path, workspace: str | Path = ".") -> EvaluationResult:
    """Score, report, log, register and gate one trained model (see the module docstring)."""
    workspace = Path(workspace)
    config = params.evaluate
    policy = RetryPolicy.from_config(params.tracking)
    files.ensure_writable(report_dir, metrics_path)  # before registering: a rerun would register twice
    bundle = load_model_dir(model_dir, params.model.image_size)
    head_json = Path(head_dir) / "run.json" if head_dir else None
    head_info = files.read_json(head_json) if head_json and head_json.is_file() else None
    split = load_split(manifest, "test", bundle.classes)
    if not len(split):
        raise ValueError(f"{manifest}: the test split is empty")
    probs = predict_probabilities(bundle.model, split.paths, bundle.image_size, config.batch_size)
    metrics = compute_metrics(split.labels, probs, bundle.classes, config)
    print(f"test accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
          f"ECE {metrics['ece']:.4f} on {metrics['n_test']} images")
    lineage = lineage_tags(params, bundle.run_info, head_info, workspace)

    with files.atomic_dir(report_dir) as out:
        from sklearn.metrics import classification_report

        y_pred = probs.argmax(axis=1)
        plot_confusion_matrix(split.labels, y_pred, bundle.classes, out / "confusion_matrix.png")
        plot_reliability(pd.DataFrame(metrics["calibration"]), metrics["ece"], out / "reliability.png")
        plot_worst_errors(split, probs, config.worst_examples, out / "worst_errors.png")
        (out / "classification_report.txt").write_text(classification_report(
            split.labels, y_pred, labels=list(range(len(bundle.classes))), target_names=bundle.classes, zero_division=0))
        files.write_json(out / "metrics.json", metrics)
        run_id, version, decision = track_and_register(params, bundle, split, metrics, lineage, policy)
        card = model_card(params, bundle, metrics, split_counts(manifest), lineage, quarantined_count(workspace),
                          decision, version)
        (out / "model_card.md").write_text(card, encoding="utf-8")
        promotion = {"registered_model": params.tracking.registered_model, "version": version, "run_id": run_id,
                     "lineage": lineage, **decision.to_json()}
        files.write_json(out / "promotion.json", promotion)
        log_reports(run_id, out, policy)

    files.write_json(metrics_path, flat_metrics(metrics))
    return EvaluationResult(metrics["accuracy"], metrics["macro_f1"], metrics["ece"], metrics["n_test"], run_id,
                            version, decision.promoted, decision.reasons, Path(report_dir), Path(metrics_path))


def log_reports(run_id: str, report: Path, policy: RetryPolicy) -> None:
    """Every report file, the card and decision included (they exist only after registration)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for path in sorted(report.iterdir()):
        if path.is_file():
            with_retries(f"upload {path.name}", client.log_artifact, run_id, str(path), "evaluate", policy=policy)


@errors.cli_errors("evaluate")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluate, register and gate the fine-tuned model.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--head-dir", default=None)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        runtime.configure_tensorflow(params.project.seed)
        result = run_evaluate(params, args.manifest, args.model_dir, args.head_dir, args.report_dir, args.metrics)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    except TrackingUnavailable as exc:
        print(f"evaluate: {exc}\nThe trained model is untouched in {args.model_dir}: rerun this stage "
              "(dvc repro evaluate) once MLflow answers, no retraining needed.", file=sys.stderr)
        return 1
    verdict = "now champion" if result.promoted else "stays challenger"
    print(f"registered {params.tracking.registered_model} v{result.model_version} ({verdict}); "
          f"reports in {result.report_dir}")
    for reason in result.reasons:
        print(f"  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
