"""Telling people about runs: failures and promotions, to a Prefect notification block or a webhook.

Where to send is the machine's setting (TP_NOTIFY_BLOCK / TP_NOTIFY_WEBHOOK_URL, see
components/core/settings.py); flows call `notify` from their hooks and after a promotion.
"""

from __future__ import annotations

import logging
from typing import Any

from components.core.settings import environment

NOTIFY_TIMEOUT_S = 10.0
logger = logging.getLogger(__name__)


def notify(event: str, message: str, **details: Any) -> bool:
    """Tell people about a run (`failed`, `promoted`, ...). Never raises; True when delivered.

    TP_NOTIFY_BLOCK names a Prefect notification block (`slack-webhook/ml-alerts`); otherwise
    TP_NOTIFY_WEBHOOK_URL receives a JSON POST {"event", "text", **details}. Neither set: no-op.
    """
    text = f"[transfer-pipeline] {event}: {message}"
    env = environment()
    block_slug = (env.notify_block or "").strip()
    webhook_url = (env.notify_webhook_url or "").strip()
    try:
        if block_slug:
            from prefect.blocks.core import Block

            Block.load(block_slug).notify(body=text, subject=f"transfer-pipeline {event}")
            return True
        if webhook_url:
            import requests

            response = requests.post(
                webhook_url, json={"event": event, "text": text, **details}, timeout=NOTIFY_TIMEOUT_S
            )
            response.raise_for_status()
            return True
    except Exception as error:  # a notification must never fail the run it reports on
        # The URL may embed a token: log only the error type and the event.
        logger.warning("notification %r not delivered: %s", event, type(error).__name__)
    return False


def notify_flow_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """A Prefect `on_failure` / `on_crashed` hook: `@flow(on_failure=[notify_flow_failure])`."""
    notify(
        "failed",
        f"{flow.name} run {flow_run.name!r} ended {state.name}: {state.message or ''}".strip(),
        flow=flow.name,
        flow_run=flow_run.name,
        flow_run_id=str(flow_run.id),
        state=state.name,
    )
