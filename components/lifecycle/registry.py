"""MLflow model registry calls: read an alias, register a version, describe it, point `challenger` at it.

Aliases only (`challenger`, `champion`), never the deprecated stages. Every registered version is
kept, promoted or not. Moving `champion` is the gate's alone (`components.lifecycle.promotion.apply_decision`);
what a version is tagged with comes from `components.lifecycle.lineage`, `components.scoring.scoring` and the gate.
"""

from __future__ import annotations

from components.core.tracking_connection import RetryPolicy, with_retries

CHAMPION = "champion"
CHALLENGER = "challenger"


def alias_version(name: str, alias: str, policy: RetryPolicy = RetryPolicy.default()) -> str | None:
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


def register_version(
    name: str, model_uri: str, tags: dict[str, str], policy: RetryPolicy = RetryPolicy.default()
) -> str:
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


def describe_version(name: str, version: str, card: str, policy: RetryPolicy = RetryPolicy.default()) -> None:
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


def set_challenger(name: str, version: str, policy: RetryPolicy = RetryPolicy.default()) -> None:
    """Point `challenger` at the newest evaluated version (once its reports are logged)."""
    from mlflow import MlflowClient

    with_retries(
        "set the challenger alias", MlflowClient().set_registered_model_alias, name, CHALLENGER, version, policy=policy
    )
