"""Model files are data, not code: a .keras file that would run Python on loading is refused."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from components import evaluate
from components.modeling.model_folder import load_keras_model, save_model_dir
from tests.evalkit import make_model_dir, run_info

REPO = Path(__file__).resolve().parents[2]


def _lambda_model_dir(path: Path) -> Path:
    import keras

    inputs = keras.Input(shape=(None, None, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Lambda(lambda t: keras.ops.softmax(t[:, :2]))(x)  # code that would run on load
    # A complete model folder (run.json with the file's sha256): only safe mode stands in the way.
    return save_model_dir(keras.Model(inputs, outputs), ["a", "b"], run_info(["a", "b"]), path)


def test_model_with_a_lambda_layer_is_refused_with_a_clear_message(tmp_path):
    model_dir = _lambda_model_dir(tmp_path / "evil")
    with pytest.raises(ValueError) as caught:
        load_keras_model(model_dir / "model.keras")
    message = str(caught.value)
    assert message.startswith(f"refused to load {model_dir / 'model.keras'}: it holds Python code")
    assert "safe_mode=False" not in message  # we never suggest switching the protection off


def test_evaluate_cli_refuses_a_lambda_model_before_touching_mlflow(tmp_path, monkeypatch, capsys):
    model_dir = _lambda_model_dir(tmp_path / "evil")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # never created: MLflow untouched
    (tmp_path / "validated.csv").write_text("path,label,split\n")
    code = evaluate.main(
        [
            "--params",
            str(REPO / "params.yaml"),
            "--manifest",
            "validated.csv",
            "--model-dir",
            str(model_dir),
            "--report-dir",
            "reports",
            "--metrics",
            "metrics.json",
        ]
    )
    assert code == 2
    assert "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_evaluate_refuses_a_model_file_changed_since_training(tmp_path, monkeypatch, capsys):
    """run.json records model.keras's sha256; a swapped file is refused before Keras reads it (or MLflow is touched)."""
    model_dir = make_model_dir(tmp_path / "model")
    other = make_model_dir(tmp_path / "other", quality="awful")
    (model_dir / "model.keras").write_bytes((other / "model.keras").read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # never created: MLflow untouched
    (tmp_path / "validated.csv").write_text("path,label,split\n")
    code = evaluate.main(
        [
            "--params",
            str(REPO / "params.yaml"),
            "--manifest",
            "validated.csv",
            "--model-dir",
            str(model_dir),
            "--report-dir",
            "reports",
            "--metrics",
            "metrics.json",
        ]
    )
    assert code == 2
    assert "its sha256 differs from the one recorded" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


def test_keras_floor_includes_the_published_safe_mode_fixes():
    """pyproject's floor admits no Keras release with a published safe_mode bypass (3.15.1 carries the latest fixes)."""
    import tomllib

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = SpecifierSet(next(d for d in deps if d.startswith("keras"))[len("keras") :].split(";")[0])
    for vulnerable in ("3.8.0", "3.10.0", "3.11.2", "3.12.0", "3.13.1", "3.13.2", "3.14.0", "3.15.0"):
        assert Version(vulnerable) not in spec, vulnerable
    from importlib.metadata import version

    assert Version(version("keras")) in spec  # and the installed one (with TensorFlow) satisfies it


def test_no_loader_in_the_project_switches_safe_mode_off():
    """Every keras load_model call keeps the default safe_mode=True; nothing enables unsafe deserialization."""
    offenders = []
    for source in [*(REPO / "components").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name.endswith("enable_unsafe_deserialization"):
                offenders.append(f"{source.name}: {name}")
            if name.endswith("load_model") and any(
                k.arg == "safe_mode" and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                for k in node.keywords
            ):
                offenders.append(f"{source.name}: {ast.unparse(node)}")
    assert offenders == []
