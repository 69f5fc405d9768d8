"""`mlflow models serve` of the champion answers HTTP requests carrying base64 images (docs/serving.md).

The server gets its limits from the model's stored model_config (no params.yaml in its folder), and a
string that names a file on the server is just invalid image data: the same reply as for a missing file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests

from components.config import parse_params
from components.evaluate import run_evaluate
from tests.evalkit import CLASSES, free_port, make_model_dir, stop, wait_until_healthy, write_manifest

pytestmark = pytest.mark.slow
STARTUP_S = 240  # the scoring server imports TensorFlow and loads the model before answering


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{ws}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        manifest = write_manifest(ws)
        params = parse_params(
            {
                "evaluate": {
                    "batch_size": 8,
                    "worst_examples": 2,
                    "serving": {"max_images_per_request": 3, "max_request_bytes": 60_000},
                }
            }
        )
        run_evaluate(params, manifest, make_model_dir(ws / "model"), None, ws / "reports", ws / "metrics.json", ws)
    mlflow.set_tracking_uri(None)
    port = free_port()
    log = ws / "serve.log"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/image-classifier@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    # The scoring server runs `uvicorn` by name: the virtualenv's bin must be on PATH, as when activated.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ws, env=env, start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/ping", proc, log, STARTUP_S)
        yield {"url": f"http://127.0.0.1:{port}/invocations", "ws": ws}
    finally:
        stop(proc)


def test_served_champion_labels_base64_images(served: dict[str, Any]) -> None:
    """The request bodies documented in docs/serving.md: `dataframe_split` and `inputs`."""
    images = sorted((served["ws"] / "images").glob("*/test_0.jpg"))
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
    bodies = {
        "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
        "inputs": {"inputs": {"image": encoded}},
    }
    for form, body in bodies.items():
        reply = requests.post(served["url"], json=body, timeout=60)
        assert reply.status_code == 200, (form, reply.text[:500] + reply.text[-1500:])
        predictions = reply.json()["predictions"]
        assert [p["label"] for p in predictions] == [p.parent.name for p in images], form
        assert all(set(p["probabilities"]) == set(CLASSES) for p in predictions), form


def test_served_model_rejects_a_non_image_with_a_readable_error(served: dict[str, Any]) -> None:
    reply = requests.post(
        served["url"], json={"dataframe_split": {"columns": ["image"], "data": [["hello"]]}}, timeout=60
    )
    assert reply.status_code == 400
    assert "image row 0: not a usable image" in reply.text


def test_a_server_file_path_gets_the_generic_error_whether_or_not_it_exists(served: dict[str, Any]) -> None:
    existing_image = sorted((served["ws"] / "images").glob("*/test_0.jpg"))[0]
    replies = []
    for value in (
        str(existing_image),
        str(served["ws"] / "images" / "missing.jpg"),
        "/etc/passwd",
        "/etc/nothing-here",
    ):
        reply = requests.post(served["url"], json={"inputs": {"image": [value]}}, timeout=60)
        replies.append((reply.status_code, reply.text))
    assert len(set(replies)) == 1, replies  # byte-identical: nothing tells what exists on the server
    status, text = replies[0]
    assert status == 400 and "image row 0: not a usable image" in text
    assert str(existing_image) not in text and "passwd" not in text


def test_served_model_enforces_the_stored_request_limits(served: dict[str, Any]) -> None:
    image = base64.b64encode(sorted((served["ws"] / "images").glob("*/test_0.jpg"))[0].read_bytes()).decode()
    reply = requests.post(served["url"], json={"inputs": {"image": [image] * 4}}, timeout=60)
    assert reply.status_code == 400 and "at most 3 images" in reply.text
    assert requests.post(served["url"], json={"inputs": {"image": [image] * 3}}, timeout=60).status_code == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_documented_curl_request_answers(served: dict[str, Any], tmp_path: Path) -> None:
    """The two commands of docs/serving.md, as written there (port and file swapped in)."""
    image = served["ws"] / "images" / "beta" / "test_1.jpg"
    script = (
        f"""printf '{{"dataframe_split": {{"columns": ["image"], "data": [["%s"]]}}}}' "$(base64 -w0 {image})" """
        f"""> request.json\ncurl -s -X POST {served["url"]} -H 'Content-Type: application/json' --data @request.json"""
    )
    assert "--data @request.json" in (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    reply = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(reply.stdout)["predictions"][0]["label"] == "beta"
