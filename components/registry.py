"""MLflow model registry: lineage, packaging the served model, the challenger -> champion gate, aliases.

Aliases only (`challenger`, `champion`), never the deprecated stages. Every registered version is
kept, promoted or not; the decision and its reasons are tags on the version.

The gate fails closed: a challenger becomes champion only when it passes the absolute thresholds
AND beats the champion re-scored on today's test split (accuracy, per-class recall) with finite
outputs. A champion that cannot be re-scored keeps its place (a changed class set may be let
through by `evaluate.promotion.allow_class_set_change`). The champion alias moves only if it still
points at the version that was scored.

The served model is logged as "models from code" (`components/serving_model.py`), never as a
pickle; the Keras file's sha256 (and the ONNX file's, when evaluate scored with ONNX Runtime) is in
its model_config and on the registered version, with the digest of the whole logged folder
(`model_tree_sha256`). Champion re-scoring loads it through `components.scoring`: verified, and run
by the installed code, never the stored code.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Params
from components.contracts import IngestReport, ModelRunInfo, PromotionRecord, ScoresRecord, ValidationSummary
from components.credentials import scrub_credentials
from components.data import Split
from components.images import ImageLimits, read_limited
from components.metrics import align_columns, compute_metrics

# Re-exported: the tags and checks lived here before components.scoring; callers still name them registry.X
from components.scoring import CODE_LOADER as CODE_LOADER
from components.scoring import ONNX_SHA256_TAG, UnsafeModel, load_scoring_model
from components.scoring import SHA256_TAG as SHA256_TAG
from components.scoring import TREE_SHA256_TAG as TREE_SHA256_TAG
from components.scoring import check_logged_model as check_logged_model
from components.scoring import registered_version as registered_version
from components.serving_model import CONFIG_KEYS, ONNX_ARTIFACT, OPTIONAL_CONFIG_KEYS, SERVING_PIXEL_KEYS
from components.settings import environment
from components.stage_config import PromotionConfig
from components.tracking_connection import RetryPolicy, TrackingUnavailable, with_retries

CHAMPION = "champion"
CHALLENGER = "challenger"
PYFUNC_NAME = "model"
SERVING_MODEL = Path(__file__).resolve().parent / "serving_model.py"
EPS = 1e-9  # float noise must not flip a comparison

# --- lineage ------------------------------------------------------------------------------------


def git_commit(workspace: str | Path = ".") -> str:
    """HEAD's commit, '+dirty' when tracked files changed; 'unknown' outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=workspace, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def data_versions(
    ingest: IngestReport | None, validation: ValidationSummary | None, info: ModelRunInfo | None
) -> dict[str, str]:
    """The data versions the hand-off files declare: ingested, validated, and the one the model trained on."""
    found = {
        "data_version": ingest.data_version if ingest else (validation.data_version if validation else ""),
        "validated_version": validation.validated_version if validation else "",
        "model_data_version": info.data_version if info else "",
    }
    return {k: v for k, v in found.items() if v}


def params_hash(params: Params) -> str:
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def lineage_tags(
    params: Params,
    info: ModelRunInfo,
    head_info: ModelRunInfo | None,
    versions: dict[str, str],
    workspace: str | Path = ".",
) -> dict[str, str]:
    """Where a model came from: code, data, settings, backbone, the runs that trained it."""
    tags = {
        "git_commit": git_commit(workspace),
        "params_sha256": params_hash(params),
        "backbone": info.backbone,  # from run.json: evaluate does not depend on params.model
        "finetune_run_id": info.run_id,
        "head_run_id": info.head_run_id or (head_info.run_id if head_info else ""),
        "data_version": "unknown",
        **versions,
    }
    flow_run_id = environment().prefect_flow_run_id
    if flow_run_id:
        tags["prefect_flow_run_id"] = flow_run_id
    return {key: scrub_credentials(value) for key, value in tags.items() if value != ""}


# --- the gate -------------------------------------------------------------------------------------

Scores = ScoresRecord


def scores_from(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> ScoresRecord:
    """The numbers the gate compares, computed by components.metrics for challenger and champion alike."""
    return scores_of(compute_metrics(y_true, probs, classes))


def scores_of(metrics: dict[str, Any]) -> ScoresRecord:
    return ScoresRecord(
        accuracy=metrics["accuracy"],
        min_class_recall=metrics["min_class_recall"],
        n_test=metrics["n_test"],
        non_finite_rows=metrics.get("non_finite_rows", 0),
        per_class_recall={c: m["recall"] for c, m in metrics["per_class"].items()},
    )


@dataclass
class PromotionDecision:
    promoted: bool
    reasons: list[str]
    challenger: ScoresRecord
    champion_version: str | None = None
    champion: ScoresRecord | None = None
    champion_problem: str | None = None
    thresholds: dict[str, float | bool] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.promoted = False
        self.reasons.append(f"fail: {reason}")

    def tags(self) -> dict[str, str]:
        tags = {
            "promotion.decision": "champion" if self.promoted else "rejected",
            "promotion.reasons": "; ".join(self.reasons),
            "promotion.challenger_accuracy": f"{self.challenger.accuracy:.6f}",
            "promotion.challenger_min_class_recall": f"{self.challenger.min_class_recall:.6f}",
            "promotion.n_test": str(self.challenger.n_test),
            **{
                f"promotion.threshold.{k}": f"{v:g}" if not isinstance(v, bool) else str(v).lower()
                for k, v in self.thresholds.items()
            },
        }
        if self.champion_version:
            tags["promotion.champion_version"] = self.champion_version
        if self.champion:
            tags["promotion.champion_accuracy"] = f"{self.champion.accuracy:.6f}"
        if self.champion_problem:
            tags["promotion.champion_problem"] = self.champion_problem
        return {k: scrub_credentials(v)[:5000] for k, v in tags.items()}

    def record(self, registered_model: str, version: str, run_id: str, lineage: dict[str, str]) -> PromotionRecord:
        return PromotionRecord(
            registered_model=registered_model,
            version=version,
            run_id=run_id,
            lineage=lineage,
            promoted=self.promoted,
            reasons=self.reasons,
            challenger=self.challenger,
            champion_version=self.champion_version,
            champion=self.champion,
            champion_problem=self.champion_problem,
            thresholds=self.thresholds,
        )


def decide_promotion(
    config: PromotionConfig,
    challenger: ScoresRecord,
    champion: ScoresRecord | None = None,
    champion_version: str | None = None,
    champion_problem: str | None = None,
    class_set_changed: bool = False,
) -> PromotionDecision:
    """Finite outputs and absolute thresholds first, then accuracy and per-class recall against the champion."""
    decision = PromotionDecision(
        True, [], challenger, champion_version, champion, champion_problem, thresholds=config.model_dump()
    )

    def check(what: str, value: float, needed: float, against: str) -> None:
        ok = value >= needed - EPS
        decision.promoted = decision.promoted and ok
        decision.reasons.append(f"{'pass' if ok else 'fail'}: {what} {value:.4f} {'>=' if ok else '<'} {against}")

    if challenger.non_finite_rows:
        decision.refuse(
            f"{challenger.non_finite_rows} of {challenger.n_test} test images got non-finite (NaN/inf) probabilities"
        )
    check("accuracy", challenger.accuracy, config.min_accuracy, f"min_accuracy {config.min_accuracy:g}")
    check(
        "lowest class recall",
        challenger.min_class_recall,
        config.min_class_recall,
        f"min_class_recall {config.min_class_recall:g}",
    )
    if champion_version is None:
        decision.reasons.append("note: no champion yet; decided on the thresholds alone")
    elif champion is None:
        if class_set_changed and config.allow_class_set_change:
            decision.reasons.append(
                f"note: champion v{champion_version} could not be re-scored ({champion_problem}); "
                "allow_class_set_change is on, so the thresholds alone decide"
            )
        else:
            hint = " (allow_class_set_change lets a new class set through)" if class_set_changed else ""
            decision.refuse(
                f"champion v{champion_version} could not be re-scored ({champion_problem}): it stays champion{hint}"
            )
    else:
        against = f"(same {challenger.n_test} test images)"
        check(
            "accuracy",
            challenger.accuracy,
            champion.accuracy + config.min_improvement,
            f"champion v{champion_version} re-scored {champion.accuracy:.4f} + min_improvement "
            f"{config.min_improvement:g} {against}",
        )
        if not config.promote_on_tie and abs(challenger.accuracy - champion.accuracy) <= EPS:
            decision.refuse(
                f"accuracy ties champion v{champion_version} at {champion.accuracy:.4f} (promote_on_tie is off)"
            )
        drops = {
            c: champion.per_class_recall[c] - r
            for c, r in challenger.per_class_recall.items()
            if c in champion.per_class_recall and champion.per_class_recall[c] - r > config.max_class_recall_drop + EPS
        }
        if drops:
            decision.refuse(
                "recall fell more than max_class_recall_drop "
                f"{config.max_class_recall_drop:g} below champion v{champion_version} for "
                + ", ".join(
                    f"{c} ({champion.per_class_recall[c]:.4f} -> {challenger.per_class_recall[c]:.4f})"
                    for c in sorted(drops)
                )
            )
        else:
            decision.reasons.append(
                f"pass: no class recall fell more than {config.max_class_recall_drop:g} "
                f"below champion v{champion_version}"
            )
    return decision


# --- packaging: the served model --------------------------------------------------------------------


def pyfunc_requirements() -> list[str]:
    """Pinned from this environment: inferring them is slow and lists both tensorflow wheels."""
    wanted = ["mlflow", "keras", "pillow", "numpy", "pandas", "pydantic", "pyyaml"]
    for tf_dist in ("tensorflow-cpu", "tensorflow"):
        if _installed(tf_dist):
            wanted.insert(0, tf_dist)
            break
    if _installed("onnxruntime"):  # runs the ONNX file; the model still serves with Keras without it
        wanted.append("onnxruntime")
    return [f"{name}=={metadata.version(name)}" for name in wanted]


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def code_closure(module_file: Path) -> set[str]:
    """File names of the `components` modules that `module_file` imports (anywhere in it), transitively."""
    here = module_file.parent
    seen: set[str] = set()
    todo = [module_file.name, "__init__.py"]  # the package init runs first, with its own imports
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((here / name).read_text(encoding="utf-8"))):  # lazy imports too
            found = []
            if isinstance(node, ast.ImportFrom) and node.module == "components":
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components."):
                found = [node.module.split(".", 1)[1]]
            elif isinstance(node, ast.Import):
                found = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith("components.")]
            todo += [f"{m}.py" for m in found if (here / f"{m}.py").is_file()]
    return seen


def code_package(tmp: Path) -> Path:
    """A copy of just the modules the served model imports, as a `components` package."""
    package = tmp / "components"
    package.mkdir()
    for name in sorted(code_closure(SERVING_MODEL) | {"__init__.py"}):
        (package / name).write_bytes((SERVING_MODEL.parent / name).read_bytes())
    return package


def serving_model_config(
    params: Params, image_size: int, keras_sha256: str, onnx_sha256: str | None = None
) -> dict[str, Any]:
    """What the served model needs at load time, with every limit it enforces on requests (and, given the
    sha256 of the ONNX file evaluate scored with, that file's hash: the served model may run it then)."""
    config = {
        "image_size": int(image_size),
        "batch_size": params.evaluate.batch_size,
        "keras_sha256": keras_sha256,
        "max_images_per_request": params.evaluate.serving.max_images_per_request,
        "max_request_bytes": params.evaluate.serving.max_request_bytes,
        "max_image_bytes": params.validate.max_image_bytes,
        "max_pixels": params.validate.max_pixels,
        "allowed_formats": [f.upper() for f in params.validate.allowed_formats],
        # serving's own, smaller caps (never above the training cap)
        "serving_max_pixels": min(params.evaluate.serving.max_pixels, params.validate.max_pixels),
        "max_request_pixels": params.evaluate.serving.max_request_pixels,
    }
    assert set(config) == {*CONFIG_KEYS, *SERVING_PIXEL_KEYS}, "serving_model's key lists and this function disagree"
    if onnx_sha256:
        config.update({"onnx_sha256": onnx_sha256, "serving_engine": "auto"})
        assert set(config) - set(CONFIG_KEYS) <= set(OPTIONAL_CONFIG_KEYS), "serving_model.OPTIONAL_CONFIG_KEYS"
    return config


def log_pyfunc(
    model_path: Path, classes: list[str], model_config: dict[str, Any], example: Any, onnx_path: Path | None = None
) -> Any:
    """Log the served model into the active run: code from serving_model.py, the .keras file as an artifact,
    and the ONNX file too when given (its sha256 must be model_config's `onnx_sha256`)."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Map, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "image")]),  # raw bytes or base64 (data: URIs too); never a path
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.double, "probability"),
                ColSpec(Map(DataType.double), "probabilities"),
            ]
        ),
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "classes.json").write_text(json.dumps(classes), encoding="utf-8")
        artifacts = {"keras_model": str(model_path), "classes": str(Path(tmp) / "classes.json")}
        if onnx_path is not None:
            artifacts[ONNX_ARTIFACT] = str(_checked_copy(onnx_path, str(model_config.get(ONNX_SHA256_TAG)), Path(tmp)))
        return mlflow.pyfunc.log_model(
            name=PYFUNC_NAME,
            python_model=str(SERVING_MODEL),
            artifacts=artifacts,
            code_paths=[str(code_package(Path(tmp)))],
            model_config=model_config,
            signature=signature,
            input_example=example,
            pip_requirements=pyfunc_requirements(),
            metadata={"classes": classes, "image_size": model_config["image_size"]},
        )


def _checked_copy(onnx_path: Path, expected_sha256: str, tmp: Path) -> Path:
    """A private copy of the ONNX file, hashed after copying: what is logged is the file that was checked
    against Keras, even if the shared cache folder changes while the model uploads."""
    from components.hashing import file_sha256

    copy = tmp / "model.onnx"
    copy.write_bytes(Path(onnx_path).read_bytes())
    if file_sha256(copy) != expected_sha256:
        raise UnsafeModel(f"{onnx_path}: its sha256 is not the one model_config records (onnx_sha256): not logged")
    return copy


def rescore_champion(
    name: str, split: Split, limits: ImageLimits, policy: RetryPolicy
) -> tuple[str | None, ScoresRecord | None, str | None, bool]:
    """(champion version, its scores on today's test split, why it could not be scored, class set changed)."""
    version = alias_version(name, CHAMPION, policy)
    if version is None:
        return None, None, None, False
    try:
        scorer = load_scoring_model(f"models:/{name}/{version}", policy)  # verified; run by the installed code
        print(f"champion v{version}: re-scored with {scorer.engine}")
        their_classes = list(scorer.classes)
        if sorted(their_classes) != sorted(split.classes):
            return version, None, f"class set differs: champion {their_classes} vs test split {split.classes}", True
        parts = [  # decoded within today's limits, as the challenger was
            scorer.score([read_limited(p, limits.max_bytes) for p in split.paths[i : i + scorer.batch_size]], limits)
            for i in range(0, len(split), scorer.batch_size)
        ]
        probs = align_columns(np.concatenate(parts), their_classes, split.classes)
    except TrackingUnavailable:
        raise
    except Exception as exc:
        detail = getattr(exc, "reason", "") or scrub_credentials(str(exc))
        return version, None, f"could not load or run it: {type(exc).__name__}: {detail}"[:500], False
    return version, scores_from(split.labels, probs, split.classes), None, False


# --- registry calls -------------------------------------------------------------------------------


def alias_version(name: str, alias: str, policy: RetryPolicy = RetryPolicy()) -> str | None:
    """The version number an alias points at, or None (no such model or alias)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        found = with_retries(
            f"read alias {alias} of {name}", client.get_model_version_by_alias, name, alias, policy=policy
        )
        return str(found.version)
    except MlflowException as exc:
        if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
            return None
        # MLflow's basic auth answers 403, not 404, for a model that does not exist yet (it does not tell
        # a non-admin which names exist). No such model among those we may see: no champion. If it does
        # exist but is hidden from us, registering a version fails next with the same 403: fail closed.
        if exc.error_code == "PERMISSION_DENIED" and not with_retries(
            f"search {name}",
            client.search_registered_models,
            filter_string=f"name = '{name}'",
            max_results=1,
            policy=policy,
        ):
            return None
        raise


def register_version(name: str, model_uri: str, tags: dict[str, str], policy: RetryPolicy = RetryPolicy()) -> str:
    """Register `model_uri` as a new version of `name` (created if needed); no alias moves here."""
    import mlflow

    return str(
        with_retries(f"register {name}", mlflow.register_model, model_uri, name, tags=tags, policy=policy).version
    )


# The SQL registry's column for a version's description (VARCHAR(5000); PostgreSQL enforces it, SQLite does not).
DESCRIPTION_MAX_CHARS = 5000


def card_description(card: str, limit: int = DESCRIPTION_MAX_CHARS) -> str:
    """The model card as a version description: whole when it fits, else cut at a line and saying where the rest is."""
    if len(card) <= limit:
        return card
    note = "\n\n(cut to fit the registry; the whole card is the evaluation run's artifact evaluate/model_card.md)\n"
    head = card[: limit - len(note)]
    return head[: head.rfind("\n") + 1 or len(head)].rstrip() + note


def describe_version(name: str, version: str, card: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """The model card (markdown) as the registered version's description: what the registry UI shows first."""
    from mlflow import MlflowClient

    with_retries(
        "set the version's description",
        MlflowClient().update_model_version,
        name,
        version,
        description=card_description(card),
        policy=policy,
    )


def apply_decision(name: str, version: str, decision: PromotionDecision, policy: RetryPolicy = RetryPolicy()) -> None:
    """Move `champion` to `version` if it passed and the champion is still the one scored; tag the decision."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if decision.promoted:
        current = alias_version(name, CHAMPION, policy)  # re-read right before moving it
        if current != decision.champion_version:
            decision.refuse(
                f"the champion alias moved from {_shown(decision.champion_version)} to {_shown(current)} "
                "while this version was evaluated: not promoted (rerun evaluate to compare with it)"
            )
    for key, value in decision.tags().items():
        with_retries("tag the model version", client.set_model_version_tag, name, version, key, value, policy=policy)
    if decision.promoted:
        with_retries(
            "set the champion alias", client.set_registered_model_alias, name, CHAMPION, version, policy=policy
        )


def set_challenger(name: str, version: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Point `challenger` at the newest evaluated version (once its reports are logged)."""
    from mlflow import MlflowClient

    with_retries(
        "set the challenger alias", MlflowClient().set_registered_model_alias, name, CHALLENGER, version, policy=policy
    )


def _shown(version: str | None) -> str:
    return f"v{version}" if version else "no champion"
