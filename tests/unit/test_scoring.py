"""Our own processes never run a registered model's stored code; serving runs it only once every file is verified.

The attacker is an artifact-store writer (docs/security.md): they can change any file of a logged model,
but not the registry's tags. Each tamper below makes the stored code write a marker file if it ever runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components import serve
from components.core.config import Params, parse_params
from components.core.paths import EvaluatePaths
from components.evaluate import run_evaluate
from components.lifecycle import model_packaging
from components.predict import run_predict
from components.scoring import scoring, serving_model
from tests.conftest import COLORS, write_image
from tests.evalkit import CLASSES, empty_tracking_store, make_model_dir, write_manifest

NAME = "image-classifier"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return empty_tracking_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Path:
    """cwd = a fresh workspace whose MLflow store (sqlite + ./mlruns, the artifact store) lives inside it."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def settings(**promotion: Any) -> Params:
    return parse_params(
        {
            "evaluate": {"batch_size": 8, "worst_examples": 2, "inference_engine": "keras", "promotion": promotion},
            "tracking": {"retry_attempts": 2, "retry_backoff_s": 0},
        }
    )


def evaluate_model(ws: Path, model_dir: Path, params: Params | None = None) -> Any:
    manifest = ws / "validated.csv" if (ws / "validated.csv").exists() else write_manifest(ws)
    return run_evaluate(params or settings(), EvaluatePaths(manifest=manifest, model_dir=model_dir).under(ws))


def stored_files(ws: Path, version: str, pattern: str) -> list[Path]:
    """A registered version's files as the artifact store (./mlruns) holds them."""
    model_id = MlflowClient().get_model_version(NAME, version).source.removeprefix("models:/")  # the logged model
    found = [p for p in (ws / "mlruns").rglob(pattern) if model_id in p.parts]
    assert found, pattern
    return found


def plant_marker(files: list[Path], marker: Path) -> None:
    """Append a line that writes `marker` when the module runs (what the attacker would do)."""
    for path in files:
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")


def tags(version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(NAME, version).tags


# --- the folder digest ------------------------------------------------------------------------------


def test_the_tree_digest_covers_every_file_and_refuses_links(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "code" / "components").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "code" / "components" / "serving_model.py").write_text("x = 1\n")
    base = scoring.tree_digest(folder)
    (folder / "registered_model_meta").write_text("model_name: m\n")  # the MLflow client writes it on download
    assert scoring.tree_digest(folder) == base
    changes = {
        "changed": lambda: (folder / "MLmodel").write_text("flavors: {a: 1}\n"),
        "added": lambda: (folder / "code" / "components" / "extra.py").write_text(""),
        "renamed": lambda: (folder / "code" / "components" / "serving_model.py").rename(folder / "code" / "s.py"),
    }
    for what, change in changes.items():
        change()
        assert scoring.tree_digest(folder) != base, what
    (folder / "link").symlink_to("/etc/hostname")
    with pytest.raises(scoring.UnsafeModel, match="not a regular file"):
        scoring.tree_digest(folder)


def test_an_artifact_path_outside_the_model_folder_is_refused(tmp_path: Path) -> None:
    """A version without the tree digest has an unverified MLmodel: it may not point our loader elsewhere."""
    folder = tmp_path / "m"
    folder.mkdir()
    flavor = {
        "loader_module": scoring.CODE_LOADER,
        "config": {"keras_sha256": "a" * 64},
        "artifacts": {"keras_model": {"path": "../../../etc/hostname"}, "classes": {"path": "classes.json"}},
    }
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": flavor}}))
    with pytest.raises(scoring.UnsafeModel, match="not a file inside the model folder"):
        scoring.installed_classifier(folder)


# --- evaluate registers the digest; tampered stored code never runs -------------------------------------


def test_evaluate_records_the_digest_of_the_whole_logged_folder(workspace: Path, tmp_path: Path) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    recorded = tags(result.model_version)[scoring.TREE_SHA256_TAG]
    (tmp_path / "dl").mkdir()
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{result.model_version}", dst_path=str(tmp_path / "dl"))
    assert scoring.tree_digest(local) == recorded
    assert {"MLmodel", "serving_model.py"} <= {p.name for p in Path(local).iterdir()}


def test_batch_scoring_refuses_a_version_whose_stored_code_changed(workspace: Path) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    marker = workspace / "marker"
    plant_marker(stored_files(workspace, result.model_version, "serving_model.py"), marker)
    images = workspace / "incoming"
    write_image(images / "a.png", color=COLORS[0], fmt="PNG")
    with pytest.raises(scoring.UnsafeModel, match="differ from those recorded at registration"):
        run_predict(f"models:/{NAME}@champion", images, workspace / "preds.csv")
    assert not marker.exists()
    assert not (workspace / "preds.csv").exists()


def test_evaluate_never_runs_a_tampered_champions_stored_code_and_keeps_it(workspace: Path) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    marker = workspace / "marker"
    plant_marker(stored_files(workspace, "1", "*.py"), marker)  # serving_model.py and every code/components module
    result = evaluate_model(workspace, make_model_dir(workspace / "good2"), settings(promote_on_tie=True))

    assert not marker.exists()
    assert not result.promoted  # fails closed: a champion that cannot be verified keeps its place
    assert "differ from those recorded at registration" in tags("2")["promotion.champion_problem"]
    assert str(MlflowClient().get_registered_model(NAME).aliases["champion"]) == "1"


def test_a_champion_registered_before_the_digest_is_rescored_by_the_installed_code(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No tree digest: its stored code is still never run; the Keras hash is checked and the gap is printed."""
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    MlflowClient().delete_model_version_tag(NAME, "1", scoring.TREE_SHA256_TAG)  # as registered before this change
    marker = workspace / "marker"
    plant_marker(stored_files(workspace, "1", "*.py"), marker)
    result = evaluate_model(workspace, make_model_dir(workspace / "good2"), settings(promote_on_tie=True))

    assert not marker.exists()
    assert "promotion.champion_problem" not in tags("2")
    assert float(tags("2")["promotion.champion_accuracy"]) == 1.0
    assert result.promoted
    assert "class names and their order and its model_config (batch and image size) are unverified" in (
        capsys.readouterr().out
    )


# How a champion registered before the move to layers imports its code (those modules now live in subpackages).
FLAT_LAYOUT = (
    "from components.data import load_split  # noqa\nfrom components.serving_model import ImageClassifier  # noqa\n"
)


def test_a_champion_from_an_older_module_layout_is_still_rescored(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stored code imports modules from before components/ moved into layers (components.data,
    components.serving_model): MLflow could not load it any more, our code re-scores it."""
    logged = model_packaging.log_pyfunc

    def older_layout(*args: Any, **kwargs: Any) -> Any:
        info = logged(*args, **kwargs)
        for path in (workspace / "mlruns").rglob("*.py"):
            if info.model_id in path.parts:
                path.write_text(FLAT_LAYOUT + path.read_text())
        return info  # evaluate then records the digest of this layout

    monkeypatch.setattr(model_packaging, "log_pyfunc", older_layout)
    evaluate_model(workspace, make_model_dir(workspace / "old"))
    monkeypatch.undo()
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace}/mlflow.db")
    assert FLAT_LAYOUT in stored_files(workspace, "1", "serving_model.py")[0].read_text()

    result = evaluate_model(workspace, make_model_dir(workspace / "new"), settings(promote_on_tie=True))
    assert "promotion.champion_problem" not in tags("2"), tags("2").get("promotion.champion_problem")
    assert float(tags("2")["promotion.champion_accuracy"]) == 1.0 and result.promoted


def test_classes_that_do_not_fit_the_model_are_refused(workspace: Path) -> None:
    """A version without the digest: its classes.json is unverified, but must still match the model's outputs."""
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    MlflowClient().delete_model_version_tag(NAME, result.model_version, scoring.TREE_SHA256_TAG)
    (classes_file,) = stored_files(workspace, result.model_version, "classes.json")
    classes_file.write_text(json.dumps([*CLASSES, "delta"]))
    with pytest.raises(scoring.UnsafeModel, match="names 4 classes but the model outputs 3"):
        scoring.load_scoring_model(f"models:/{NAME}/{result.model_version}")


# --- the verifying serve entry point ---------------------------------------------------------------


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    started: list[list[str]] = []

    def record(command: list[str]) -> int:
        local = Path(command[command.index("-m", 3) + 1])
        started.append([*command, scoring.tree_digest(local)])  # what would be served, while it exists
        return 0

    monkeypatch.setattr(serve, "run_server", record)
    return started


def serve_args(ws: Path, model: str) -> list[str]:
    return ["--model", model, "--port", "5999", "--params", str(ws / "none.yaml")]


def test_serve_verifies_every_file_then_serves_the_verified_copy(workspace: Path, no_server: list) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    assert serve.main(serve_args(workspace, f"models:/{NAME}@champion")) == 0
    (command,) = no_server
    assert command[1:5] == ["-m", "mlflow", "models", "serve"] and "--env-manager" in command
    assert command[-1] == tags(result.model_version)[scoring.TREE_SHA256_TAG]


def test_serve_refuses_a_changed_version_before_mlflow_loads_it(
    workspace: Path, no_server: list, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    marker = workspace / "marker"
    plant_marker(stored_files(workspace, "1", "serving_model.py"), marker)
    assert serve.main(serve_args(workspace, f"models:/{NAME}@champion")) == 2
    assert not no_server and not marker.exists()
    assert "differ from those recorded at registration" in capsys.readouterr().err


def test_serve_refuses_a_version_without_the_digest(
    workspace: Path, no_server: list, capsys: pytest.CaptureFixture[str]
) -> None:
    evaluate_model(workspace, make_model_dir(workspace / "good"))
    MlflowClient().delete_model_version_tag(NAME, "1", scoring.TREE_SHA256_TAG)
    assert serve.main(serve_args(workspace, f"models:/{NAME}/1")) == 2
    assert not no_server and "has no model_tree_sha256 tag" in capsys.readouterr().err


# --- what a caller is told -------------------------------------------------------------------------


def test_refusals_are_mlflow_errors_whose_message_the_scoring_server_cannot_rewrite() -> None:
    """MLflow's server prefixes an MlflowException's message with the request data; ours keep their own."""
    error = serving_model.UnusableRow(0, "cannot decode: /srv/secret/path.png")
    assert isinstance(error, MlflowException) and isinstance(error, ValueError)
    error.message = f"Failed to predict data '{pd.DataFrame({'image': ['/etc/passwd']})}'. \nError: {error.message}"
    body = json.loads(error.serialize_as_json())
    assert body["message"] == "image row 0: not a usable image" and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in body and error.get_http_status_code() == 400


def test_an_unexpected_failure_tells_the_caller_nothing_about_the_server(workspace: Path) -> None:
    result = evaluate_model(workspace, make_model_dir(workspace / "good"))
    model = scoring.load_scoring_model(f"models:/{NAME}/{result.model_version}")

    def broken(batch: Any) -> Any:
        raise RuntimeError("/srv/models/secret.keras: layer dense_1 failed in components/scoring/serving_model.py:230")

    model.classifier._forward = broken
    image = write_image(workspace / "a.png", color=COLORS[0], fmt="PNG").read_bytes()
    with pytest.raises(serving_model.ScoringFailed) as caught:
        model.predict(pd.DataFrame({"image": [image]}))
    assert json.loads(caught.value.serialize_as_json())["message"] == "the model could not score this request"
    assert caught.value.__cause__ is None
