"""Running validate's suites: an ephemeral Great Expectations context, one Checkpoint per suite, failures by name.

Each suite runs as a GX Checkpoint whose actions (`checkpoint_actions`: UpdateDataDocsAction, and any
Slack or e-mail action added there) write the Data Docs; `collect_failures` turns a GX result into
failures that name each file (or class) and why, in the words of its `Check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from components.quality.validation_checks import Check

DATA_DOCS_SITE = "pipeline"  # the context's only Data Docs site: reports/validation/data_docs


def checkpoint_actions() -> list[Any]:
    """What every suite's Checkpoint does after validating: update the Data Docs site.

    GX runs UpdateDataDocsAction before any other action, so an action added here (GX's
    SlackNotificationAction, EmailAction, ...) can link to the pages it built.
    """
    from great_expectations.checkpoint import UpdateDataDocsAction

    return [UpdateDataDocsAction(name="update_data_docs", site_names=[DATA_DOCS_SITE])]


class Suites:
    """An ephemeral GX context whose Data Docs site is a folder we choose; each suite runs as a Checkpoint.

    The suites run one after another (the dataset and class checks count only the files the file
    checks kept), so each has its own Checkpoint, named like its suite.
    """

    def __init__(self, docs_dir: Path) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        from components.quality.data_docs import site_config

        self.gx = gx
        site = site_config(docs_dir)  # names from the source are shown as text, never as HTML
        config = DataContextConfig(
            # No default site: it would write into a fresh temporary folder on every run.
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites={DATA_DOCS_SITE: site},
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,  # no usage statistics from an offline pipeline
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.source = self.context.data_sources.add_pandas("images")

    def run(self, name: str, frame: pd.DataFrame, checks: list[Check], key: str) -> Any:
        """Run one suite through its Checkpoint; the checkpoint's actions update the Data Docs."""
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for check in checks:
            suite.add_expectation(check.expectation)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=checkpoint_actions(),
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [key]},
            )
        )
        # Only the columns the checks read: GX copies its batch's rows for every expectation (issue 24).
        read = [key, *(c.expectation.column for c in checks if getattr(c.expectation, "column", None))]
        batch_frame = frame[list(dict.fromkeys(read))].reset_index(drop=True)
        outcome = checkpoint.run(batch_parameters={"dataframe": batch_frame})
        (result,) = outcome.run_results.values()
        return result

    def failures(self, name: str, frame: pd.DataFrame, checks: list[Check], key: str) -> list[Failure]:
        """Run one suite and name what failed: each row by its `key` column (path or label), and why."""
        return collect_failures(self.run(name, frame, checks, key), checks, frame, key)


@dataclass
class Failure:
    """One failed check: every file (or class) it flagged, each with its reason."""

    check: str
    scope: str
    expectation: str
    items: list[dict[str, str]] = field(default_factory=list)  # {subject..., reason}


def _exception_message(info: Any) -> str | None:
    """GX reports an expectation that crashed either flat or keyed by metric: find the message."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    return next((m for v in info.values() if (m := _exception_message(v))), None)


def collect_failures(result: Any, checks: list[Check], table: pd.DataFrame, key: str) -> list[Failure]:
    """Turn a GX validation result into failures that name each file (or class) and why."""
    by_name = {c.name: c for c in checks}
    failures = []
    for outcome in result.results:
        if outcome.success:
            continue
        check = by_name[outcome.expectation_config.meta["check"]]
        failure = Failure(check.name, check.scope, outcome.expectation_config.type)
        crash = _exception_message(outcome.exception_info)
        if crash:
            failure.items.append({"subject": check.name, "reason": f"check {check.name} could not run: {crash}"})
        elif "unexpected_index_list" in outcome.result:
            for hit in outcome.result["unexpected_index_list"]:
                row = table.loc[hit[key]]
                failure.items.append({key: hit[key], "reason": check.explain(row)})
        else:
            failure.items.append({"subject": check.name, "reason": check.explain(outcome.result.get("observed_value"))})
        failures.append(failure)
    return failures
