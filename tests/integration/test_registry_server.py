"""Evaluate and register against a real `mlflow server` on loopback (one server for the module).

The tracking URI carries a user and password, as a deployment's would: they must never show up
in run params, run tags, version tags or the reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from components.core.config import parse_params
from components.core.paths import EvaluatePaths
from components.evaluate import run_evaluate
from components.scoring import scoring
from tests.evalkit import CLASSES, free_port, make_model_dir, start_mlflow_server, stop, write_manifest

pytestmark = pytest.mark.slow  # starts an MLflow server: `make test` runs it, `make test-fast` does not

NAME = "image-classifier"
SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def evaluated(server: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A good model, then a worse one, evaluated with credentials in the tracking URI."""
    ws = tmp_path_factory.mktemp("ws")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("MLFLOW_TRACKING_URI", f"http://alice:{SECRET}@{server}")
        mp.setenv("TP_PREFECT_FLOW_RUN_ID", "flow-run-42")
        params = parse_params({"evaluate": {"batch_size": 8, "worst_examples": 2, "promotion": {"min_accuracy": 0.0}}})
        manifest = write_manifest(ws)
        results = [
            run_evaluate(
                params,
                EvaluatePaths(manifest=manifest, model_dir=make_model_dir(ws / quality, quality=quality)).under(ws),
            )
            for quality in ("good", "bad")
        ]
        promotion = (ws / "reports" / "evaluate" / "promotion.json").read_text()
    mlflow.set_tracking_uri(f"http://{server}")  # the same server, without credentials, for reading back
    yield {"results": results, "promotion_json": promotion, "ws": ws}
    mlflow.set_tracking_uri(None)


def test_champion_stays_when_a_worse_model_arrives(evaluated: dict[str, Any]) -> None:
    first, second = evaluated["results"]
    assert first.promoted and not second.promoted
    client = MlflowClient()
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {
        "champion": "1",
        "challenger": "2",
    }
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.decision"] == "rejected" and "champion v1 re-scored" in tags["promotion.reasons"]
    assert tags["prefect_flow_run_id"] == "flow-run-42" and tags["params_sha256"]
    assert len(tags[scoring.SHA256_TAG]) == 64


def test_champion_from_the_server_scores_raw_images(evaluated: dict[str, Any]) -> None:
    model = scoring.load_scoring_model(f"models:/{NAME}@champion")  # pickle and sha256 checks first
    manifest = pd.read_csv(evaluated["ws"] / "validated.csv").query("split == 'test'")
    images = [Path(p).read_bytes() for p in manifest["path"]]
    labels = model.predict(pd.DataFrame({"image": images}))["label"].tolist()
    assert labels == manifest["label"].tolist()
    assert set(labels) == set(CLASSES)


def test_credentials_in_the_tracking_uri_never_reach_params_tags_or_reports(evaluated: dict[str, Any]) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("transfer-pipeline")
    recorded = []
    for run in client.search_runs([experiment.experiment_id]):
        recorded += [*run.data.params.values(), *run.data.tags.values()]
        assert run.data.params["tracking_server"].startswith("http://***@")
    for version in client.search_model_versions(f"name='{NAME}'"):
        recorded += [*version.tags.values(), version.source or ""]
    recorded.append(evaluated["promotion_json"])
    assert recorded and not [text for text in recorded if SECRET in text]
    # The user name is not a secret: MLflow records an authenticated caller as the run's user (mlflow.user).
    assert not [text for text in recorded if "alice" in text and text != "alice"]
