"""prefect.yaml's deployment parameters must validate against their flows, as the server does on deploy.

The server answers `prefect deploy` with a 422 when a default no longer fits the flow's signature;
this finds that without a server (it once shipped as `overrides: []` against a settings object).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, validate

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


def flow_schema(entrypoint: str) -> dict[str, Any]:
    return parameter_schema(load_flow_from_entrypoint(str(REPO / entrypoint))).model_dump_for_openapi()


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: f"{d['flow_name']}/{d['name']}")
def test_deployment_parameters_validate_against_the_flow_signature(deployment: dict[str, Any]) -> None:
    schema = flow_schema(deployment["entrypoint"])
    validate(deployment.get("parameters") or {}, schema, raise_on_error=True, ignore_required=True)


def test_a_default_that_no_longer_fits_the_flow_is_refused() -> None:
    schema = flow_schema("flows/training.py:training_flow")
    with pytest.raises(ValidationError, match="overrides"):
        validate({"overrides": []}, schema, raise_on_error=True, ignore_required=True)
