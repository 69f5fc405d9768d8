"""The challenger -> champion gate: scores, the decision and its reasons, moving the `champion` alias.

The gate fails closed: a challenger becomes champion only when it passes the absolute thresholds
AND beats the champion re-scored on today's test split (accuracy, per-class recall) with finite
outputs. A champion that cannot be re-scored keeps its place (a changed class set may be let
through by `evaluate.promotion.allow_class_set_change`). The champion alias moves only if it still
points at the version that was scored. The decision is a `contracts.PromotionRecord` from start to end
(promotion.json); its reasons are also tags on the registered version, which is kept either way.

Champion re-scoring loads the version through `components.scoring.scoring`: verified, and run by the
installed code, never the stored code.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.core.contracts import PromotionRecord, ScoresRecord
from components.core.credentials import scrub_credentials
from components.core.evaluate_config import PromotionConfig
from components.core.tracking_connection import RetryPolicy, TrackingUnavailable, with_retries
from components.ingestion.images import ImageLimits, read_limited
from components.lifecycle.registry import CHAMPION, alias_version
from components.modeling.data import Split
from components.modeling.metrics import align_columns, compute_metrics
from components.scoring.scoring import load_scoring_model

EPS = 1e-9  # float noise must not flip a comparison
TAG_MAX_CHARS = 5000  # a version tag's value in the SQL registry


def scores_from(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> ScoresRecord:
    """The numbers the gate compares, computed by components.modeling.metrics for challenger and champion alike."""
    return scores_of(compute_metrics(y_true, probs, classes))


def scores_of(metrics: dict[str, Any]) -> ScoresRecord:
    return ScoresRecord(
        accuracy=metrics["accuracy"],
        min_class_recall=metrics["min_class_recall"],
        n_test=metrics["n_test"],
        non_finite_rows=metrics.get("non_finite_rows", 0),
        per_class_recall={c: m["recall"] for c, m in metrics["per_class"].items()},
    )


def decide_promotion(
    config: PromotionConfig,
    challenger: ScoresRecord,
    champion: ScoresRecord | None = None,
    champion_version: str | None = None,
    champion_problem: str | None = None,
    class_set_changed: bool = False,
    *,
    registered_model: str = "",
    run_id: str = "",
    lineage: dict[str, str] | None = None,
) -> PromotionRecord:
    """Finite outputs and absolute thresholds first, then accuracy and per-class recall against the champion.

    The record's version is empty until the challenger is registered (`apply_decision` sets it)."""
    reasons: list[str] = []
    promoted = True

    def check(what: str, value: float, needed: float, against: str) -> None:
        nonlocal promoted
        ok = value >= needed - EPS
        promoted = promoted and ok
        reasons.append(f"{'pass' if ok else 'fail'}: {what} {value:.4f} {'>=' if ok else '<'} {against}")

    def refuse(reason: str) -> None:
        nonlocal promoted
        promoted = False
        reasons.append(f"fail: {reason}")

    if challenger.non_finite_rows:
        refuse(
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
        reasons.append("note: no champion yet; decided on the thresholds alone")
    elif champion is None:
        if class_set_changed and config.allow_class_set_change:
            reasons.append(
                f"note: champion v{champion_version} could not be re-scored ({champion_problem}); "
                "allow_class_set_change is on, so the thresholds alone decide"
            )
        else:
            hint = " (allow_class_set_change lets a new class set through)" if class_set_changed else ""
            refuse(f"champion v{champion_version} could not be re-scored ({champion_problem}): it stays champion{hint}")
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
            refuse(f"accuracy ties champion v{champion_version} at {champion.accuracy:.4f} (promote_on_tie is off)")
        fallen = recall_drops(config, challenger, champion, champion_version)
        if fallen:
            refuse(fallen)
        else:
            reasons.append(
                f"pass: no class recall fell more than {config.max_class_recall_drop:g} "
                f"below champion v{champion_version}"
            )
    return PromotionRecord(
        registered_model=registered_model,
        version="",
        run_id=run_id,
        lineage=lineage or {},
        promoted=promoted,
        reasons=reasons,
        challenger=challenger,
        champion_version=champion_version,
        champion=champion,
        champion_problem=champion_problem,
        thresholds=config.model_dump(),
    )


def recall_drops(
    config: PromotionConfig, challenger: ScoresRecord, champion: ScoresRecord, champion_version: str
) -> str | None:
    """The classes whose recall fell further below the champion's than `max_class_recall_drop`, as a reason."""
    drops = {
        c: champion.per_class_recall[c] - r
        for c, r in challenger.per_class_recall.items()
        if c in champion.per_class_recall and champion.per_class_recall[c] - r > config.max_class_recall_drop + EPS
    }
    if not drops:
        return None
    return (
        f"recall fell more than max_class_recall_drop {config.max_class_recall_drop:g} "
        f"below champion v{champion_version} for "
        + ", ".join(
            f"{c} ({champion.per_class_recall[c]:.4f} -> {challenger.per_class_recall[c]:.4f})" for c in sorted(drops)
        )
    )


def not_registered(
    challenger: ScoresRecord, reason: str, *, registered_model: str, run_id: str, lineage: dict[str, str]
) -> PromotionRecord:
    """The record of a challenger that was not registered, so never promoted, saying why."""
    return PromotionRecord(
        registered_model=registered_model,
        version="",
        run_id=run_id,
        lineage=lineage,
        promoted=False,
        reasons=[f"note: {reason}"],
        challenger=challenger,
    )


def refused(decision: PromotionRecord, reason: str) -> PromotionRecord:
    """The same decision, not promoted, with the reason why added."""
    return decision.model_copy(update={"promoted": False, "reasons": [*decision.reasons, f"fail: {reason}"]})


def promotion_tags(decision: PromotionRecord) -> dict[str, str]:
    """The decision as registered-version tags (`promotion.*`), credentials scrubbed, each within a tag's size."""
    tags = {
        "promotion.decision": "champion" if decision.promoted else "rejected",
        "promotion.reasons": "; ".join(decision.reasons),
        "promotion.challenger_accuracy": f"{decision.challenger.accuracy:.6f}",
        "promotion.challenger_min_class_recall": f"{decision.challenger.min_class_recall:.6f}",
        "promotion.n_test": str(decision.challenger.n_test),
        **{
            f"promotion.threshold.{k}": f"{v:g}" if not isinstance(v, bool) else str(v).lower()
            for k, v in decision.thresholds.items()
        },
    }
    if decision.champion_version:
        tags["promotion.champion_version"] = decision.champion_version
    if decision.champion:
        tags["promotion.champion_accuracy"] = f"{decision.champion.accuracy:.6f}"
    if decision.champion_problem:
        tags["promotion.champion_problem"] = decision.champion_problem
    return {k: scrub_credentials(v)[:TAG_MAX_CHARS] for k, v in tags.items()}


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


def judge_challenger(
    config: PromotionConfig,
    challenger: ScoresRecord,
    split: Split,
    limits: ImageLimits,
    policy: RetryPolicy,
    *,
    registered_model: str,
    run_id: str,
    lineage: dict[str, str],
) -> PromotionRecord:
    """The gate's decision for a challenger of `registered_model`, against its champion re-scored on `split`."""
    champion_version, champion, problem, class_set_changed = rescore_champion(registered_model, split, limits, policy)
    return decide_promotion(
        config,
        challenger,
        champion,
        champion_version,
        problem,
        class_set_changed,
        registered_model=registered_model,
        run_id=run_id,
        lineage=lineage,
    )


def apply_decision(
    name: str, version: str, decision: PromotionRecord, policy: RetryPolicy = RetryPolicy.default()
) -> PromotionRecord:
    """The decision for registered `version`: `champion` moves to it if it passed and the champion is still
    the one scored (else refused, saying so); the decision is tagged on the version either way."""
    from mlflow import MlflowClient

    client = MlflowClient()
    decision = decision.model_copy(update={"version": version})
    if decision.promoted:
        current = alias_version(name, CHAMPION, policy)  # re-read right before moving it
        if current != decision.champion_version:
            decision = refused(
                decision,
                f"the champion alias moved from {_shown(decision.champion_version)} to {_shown(current)} "
                "while this version was evaluated: not promoted (rerun evaluate to compare with it)",
            )
    for key, value in promotion_tags(decision).items():
        with_retries("tag the model version", client.set_model_version_tag, name, version, key, value, policy=policy)
    if decision.promoted:
        with_retries(
            "set the champion alias", client.set_registered_model_alias, name, CHAMPION, version, policy=policy
        )
    return decision


def _shown(version: str | None) -> str:
    return f"v{version}" if version else "no champion"
