"""The champion served by our verifying entry point (`python -m components.serve`, which runs MLflow's
scoring server on the verified copy) answers HTTP requests carrying base64 images (docs/serving.md).

The server gets its limits from the model's stored model_config (no params.yaml in its folder), a
string that names a file on the server is just invalid image data (the same reply as for a missing
file), and a refused request is answered with our message alone: no stack trace, path or module name.
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

from components.core.config import parse_params
from components.core.paths import EvaluatePaths
from components.evaluate import run_evaluate
from tests.evalkit import CLASSES, free_port, make_model_dir, migrated_store, stop, wait_until_healthy, write_manifest

pytestmark = pytest.mark.slow
STARTUP_S = 240  # the scoring server imports TensorFlow and loads the model before answering


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = tmp_path_factory.mktemp("serve")
    uri = migrated_store(ws / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ws)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        manifest = write_manifest(ws)
        params = parse_params(
            {
                "evaluate": {
                    "batch_size": 8,
                    "worst_examples": 2,
                    "serving": {
                        "max_images_per_request": 3,
                        "max_request_bytes": 60_000,
                        "max_pixels": 2_000,  # the test images are (40 + 8 i) x 36: test_3 (2,304) is over
                        "max_request_pixels": 4_500,  # three test_0 (1,440 each) fit, three test_1 (1,728) not
                    },
                }
            }
        )
        paths = EvaluatePaths(manifest=manifest, model_dir=make_model_dir(ws / "model"), report_dir=Path("reports"))
        run_evaluate(params, paths.under(ws))
    mlflow.set_tracking_uri(None)
    port = free_port()
    log = ws / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "components.serve",
        "--model",
        "models:/image-classifier@champion",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # components.serve puts the venv's bin (uvicorn) on PATH
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


def test_served_model_has_its_own_pixel_cap_and_request_budget(served: dict[str, Any]) -> None:
    def encoded(name: str) -> str:
        return base64.b64encode((served["ws"] / "images" / "alpha" / name).read_bytes()).decode()

    over_cap = requests.post(served["url"], json={"inputs": {"image": [encoded("test_3.jpg")]}}, timeout=60)
    assert over_cap.status_code == 400 and over_cap.json()["message"] == "image row 0: not a usable image"
    over_budget = requests.post(served["url"], json={"inputs": {"image": [encoded("test_1.jpg")] * 3}}, timeout=60)
    assert over_budget.status_code == 400
    assert over_budget.json()["message"] == "a request may decode at most 4500 pixels of images in all"


def test_a_refused_request_is_answered_without_trace_path_or_module_names(served: dict[str, Any]) -> None:
    """MLflow's server attaches a traceback to other errors and echoes the request into its own message."""
    bodies = {
        "a server file": {"inputs": {"image": ["/etc/passwd"]}},
        "not an image": {"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8="]]}},
        "too many": {"inputs": {"image": ["aGVsbG8="] * 4}},
    }
    for what, body in bodies.items():
        reply = requests.post(served["url"], json=body, timeout=60)
        assert reply.status_code == 400, what
        answer = reply.json()
        assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}, (what, answer)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", what
        leaks = ("Traceback", "stack_trace", ".py", "components", "site-packages", "UnusableRow", "passwd", "/tmp")
        assert not [leak for leak in leaks if leak in reply.text], (what, reply.text)
        assert str(served["ws"]) not in reply.text and "Failed to predict" not in reply.text, what
    assert requests.post(served["url"], json=bodies["a server file"], timeout=60).json()["message"] == (
        "image row 0: not a usable image"
    )


def test_plain_mlflow_models_serve_is_not_what_the_docs_tell_you_to_run() -> None:
    docs = (Path(__file__).parents[2] / "docs" / "serving.md").read_text()
    assert "python -m components.serve --model models:/image-classifier@champion" in docs
    assert "skips" in docs and "mlflow models serve" in docs


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
