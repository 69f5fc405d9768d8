"""Deployment run forms are untrusted: every parameter is checked against the workspace's settings first.

Each test calls the deployment entry point that prefect.yaml names (the `*_deployment` flows and
`stage_flow`, their bodies, as a worker runs them) with a form a caller could send, in a workspace
whose `deployments:` section says what is allowed, and checks the refusal comes before anything runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.core.config import ParamsError, load_params
from components.core.overrides import overrides_from_strings
from components.lifecycle.run_forms import RunFormRefused, check_batch_predict_form, check_training_form

REPO = Path(__file__).resolve().parents[2]


def write_params(path: Path, **sections: dict[str, Any]) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A worker's workspace (the current directory): images under inputs/, scores go to predictions/."""
    ws = tmp_path / "ws"
    (ws / "inputs" / "batch").mkdir(parents=True)
    (ws / "inputs" / "batch" / "a.jpg").write_bytes(b"not scored here")
    (ws / "predictions").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.jpg").write_bytes(b"secret")
    write_params(ws / "params.yaml", deployments={"input_roots": ["inputs"], "output_dir": "predictions"})
    monkeypatch.chdir(ws)
    return ws


def files_under(root: Path) -> dict[str, bytes]:
    """Every file below `root` but git's own (a stage run fetches from origin before it checks the commit)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(root).parts
    }


def refused_before_anything_runs(call, monkeypatch: pytest.MonkeyPatch, root: Path, match: str) -> None:
    """`call()` is refused with a message matching `match`, and nothing was scored, run or written."""
    import flows.dvc_workspace
    import flows.predict
    import flows.training

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"ran before the form was checked: {args} {kwargs}")

    monkeypatch.setattr(flows.predict, "score_images", must_not_run)
    monkeypatch.setattr(flows.dvc_workspace, "run_command", must_not_run)
    monkeypatch.setattr(flows.training, "_run_pipeline", must_not_run)
    before = files_under(root.parent)
    with pytest.raises(RunFormRefused, match=match):
        call()
    assert files_under(root.parent) == before


# --- batch prediction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "out_csv",
    [
        "../escaped.csv",
        "/tmp/site-packages/evil.pth",
        "predictions.pth",
        "{tmp}/outside/out.csv",
        "{ws}/params.csv",
        "link/out.csv",  # a link inside the output folder that leads out of it
        "two\nlines.csv",  # inside the folder, but a control character in the name
    ],
)
def test_batch_predict_refuses_an_out_csv_outside_the_output_folder(workspace, monkeypatch, out_csv):
    from flows.predict import batch_predict_deployment

    (workspace / "predictions" / "link").symlink_to(workspace.parent / "outside")
    out_csv = out_csv.format(tmp=workspace.parent, ws=workspace)
    refused_before_anything_runs(
        lambda: batch_predict_deployment.fn(inputs="inputs/batch", out_csv=out_csv),
        monkeypatch,
        workspace,
        "out_csv .* refused: must be a .csv file inside deployments.output_dir",
    )


def test_batch_predict_writes_only_inside_the_output_folder(workspace):
    form = check_batch_predict_form("inputs/batch", "nightly/scores.csv", None, "params.yaml", 64)
    assert form["out_csv"] == str(workspace.resolve() / "predictions" / "nightly" / "scores.csv")
    assert form["inputs"] == str(workspace.resolve() / "inputs" / "batch")
    assert form["model_uri"] == "models:/image-classifier@champion"


@pytest.mark.parametrize(
    "inputs",
    ["/etc", "{tmp}/outside", "inputs/../../outside", "inputs/link", "{tmp}/outside/list.csv", "/"],
)
def test_batch_predict_refuses_inputs_outside_the_allowed_roots(workspace, monkeypatch, inputs):
    from flows.predict import batch_predict_deployment

    (workspace / "inputs" / "link").symlink_to(workspace.parent / "outside")
    (workspace.parent / "outside" / "list.csv").write_text("path\nsecret.jpg\n")
    refused_before_anything_runs(
        lambda: batch_predict_deployment.fn(inputs=inputs.format(tmp=workspace.parent), out_csv="p.csv"),
        monkeypatch,
        workspace,
        "inputs .* refused: not under deployments.input_roots",
    )


def test_no_input_is_allowed_until_the_workspace_names_a_root(workspace, monkeypatch):
    from flows.predict import batch_predict_deployment

    write_params(workspace / "params.yaml", deployments={"input_roots": []})
    refused_before_anything_runs(
        lambda: batch_predict_deployment.fn(inputs="inputs/batch"),
        monkeypatch,
        workspace,
        "deployments.input_roots is empty",
    )


@pytest.mark.parametrize(
    "model_uri",
    [
        "{ws}/inputs",  # a local folder: its python_model code would run
        "file://{ws}/inputs",
        "runs:/0123456789abcdef/model",
        "s3://bucket/models/evil",
        "models:/other-model@champion",
        "models:/image-classifier@champion/../../x",
        "models:/image-classifier",
    ],
)
def test_batch_predict_refuses_a_model_that_is_not_an_allowed_registered_name(workspace, monkeypatch, model_uri):
    from flows.predict import batch_predict_deployment

    refused_before_anything_runs(
        lambda: batch_predict_deployment.fn(inputs="inputs/batch", model_uri=model_uri.format(ws=workspace)),
        monkeypatch,
        workspace,
        "model_uri .* refused",
    )


def test_allowed_model_names_and_uri_forms(workspace):
    assert check_batch_predict_form("inputs", "p.csv", "models:/image-classifier/3", "params.yaml", 8)["model_uri"]
    write_params(workspace / "params.yaml", deployments={"input_roots": ["inputs"], "model_names": ["flowers"]})
    assert check_batch_predict_form("inputs", "p.csv", "models:/flowers@challenger", "params.yaml", 8)
    with pytest.raises(RunFormRefused, match="not in deployments.model_names"):
        check_batch_predict_form("inputs", "p.csv", None, "params.yaml", 8)  # the default model is not allowed here


def test_batch_predict_refuses_another_settings_file(workspace, monkeypatch):
    from flows.predict import batch_predict_deployment

    evil = write_params(workspace.parent / "evil.yaml", deployments={"input_roots": ["/"], "output_dir": "/"})
    refused_before_anything_runs(
        lambda: batch_predict_deployment.fn(inputs="/etc", out_csv="/etc/cron.d/x.csv", params_path=str(evil)),
        monkeypatch,
        workspace,
        "params_path .* refused",
    )


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ("ingest.allow_private_hosts=true", "ingest is a limit"),
        ("ingest.allowed_roots=['/']", "ingest is a limit"),
        ("ingest.allow_http=true", "ingest is a limit"),
        ("ingest.max_bytes=1099511627776", "ingest is a limit"),
        ("tracking.uri=http://attacker.example", "tracking is a limit"),
        ("validate.max_pixels=999999999", "validate is a limit"),
        ("evaluate.serving.max_request_bytes=2147483648", "evaluate.serving is a limit"),
        ("evaluate.promotion.min_accuracy=0.0", "evaluate.promotion is a limit"),
        ("evaluate.experiments.promote=true", "evaluate.experiments is a limit"),
        ("model.weights=/tmp/evil.h5", "model.weights is a limit"),
        ("drift.policy=alert", "not in deployments.override_keys"),
        ("orchestration.flow_timeout_s=604800", "orchestration is a limit"),
        ("orchestration.stage_retries.finetune=10", "orchestration is a limit"),
    ],
)
def test_training_refuses_overrides_of_keys_that_are_not_allow_listed(workspace, monkeypatch, override, why):
    from flows.training import training_deployment

    refused_before_anything_runs(
        lambda: training_deployment.fn(overrides=overrides_from_strings(["finetune.epochs=2", override])),
        monkeypatch,
        workspace,
        f"overrides refused:\n  - {override.partition('=')[0]}: {why}",
    )
    assert not (workspace / ".tp").exists()  # not even the workspace lock was taken


def test_allow_listed_overrides_pass_the_form_check(workspace):
    check_training_form("params.yaml", ".", ["finetune.epochs=2", "train_head.learning_rate=0.01"], None, "lr-2")
    write_params(workspace / "params.yaml", deployments={"override_keys": ["finetune"]})
    check_training_form("params.yaml", ".", ["finetune.calibrate=false"], None, None)
    with pytest.raises(RunFormRefused, match="train_head.epochs: not in deployments.override_keys"):
        check_training_form("params.yaml", ".", ["train_head.epochs=2"], None, None)


@pytest.mark.parametrize(
    ("form", "match"),
    [
        ({"workdir": "/"}, "workdir = '/' refused"),
        ({"workdir": "{tmp}/outside"}, "workdir .* refused"),
        ({"params_path": "{tmp}/evil.yaml"}, "params_path .* refused"),
        ({"params_path": "../ws/params.yaml"}, "params_path .* refused"),
        ({"source": "/etc"}, "source = '/etc' refused: not under deployments.input_roots"),
        ({"source": "http://169.254.169.254/latest/"}, "source .* refused"),
        ({"experiment": "--force"}, "experiment = '--force' refused"),
    ],
)
def test_training_refuses_another_workspace_settings_file_or_source(workspace, monkeypatch, form, match):
    from flows.training import training_deployment

    form = {k: v.format(tmp=workspace.parent) for k, v in form.items()}
    refused_before_anything_runs(lambda: training_deployment.fn(**form), monkeypatch, workspace, match)


def test_a_source_under_an_input_root_is_accepted(workspace):
    write_params(workspace / "params.yaml", deployments={"input_roots": ["inputs", "s3://bucket/images"]})
    check_training_form("params.yaml", ".", [], "inputs/batch", None)
    check_training_form("params.yaml", ".", [], "s3://bucket/images/2026-11", None)
    for source in ("s3://bucket/images/../private", "s3://bucket/images-other", "s3://other/images"):
        with pytest.raises(RunFormRefused, match="not under deployments.input_roots"):
            check_training_form("params.yaml", ".", [], source, None)


def test_an_allow_list_that_names_a_limit_is_refused_when_settings_load(tmp_path):
    for keys, match in (
        (["ingest.allow_http"], "would let a run form change ingest"),
        (["evaluate"], "would let a run form change evaluate.promotion"),
        (["tracking.uri"], "would let a run form change tracking"),
        (["finetune.epochz"], "'finetune.epochz' is not a setting"),
    ):
        path = write_params(tmp_path / "params.yaml", deployments={"override_keys": keys})
        with pytest.raises(ParamsError, match=match):
            load_params(path)


# --- the GPU stage -----------------------------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, str]:
    """A worker's clone of an origin repository; (clone, a commit on origin's branch, a commit only local)."""
    origin = tmp_path / "origin"
    origin.mkdir()
    git(origin, "init", "-q", "-b", "main")
    write_params(origin / "params.yaml")
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "settings")
    clone = tmp_path / "worker"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    pushed = git(clone, "rev-parse", "HEAD")
    (clone / "stray.txt").write_text("not on any remote branch")
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "local only")
    local_only = git(clone, "rev-parse", "HEAD")
    git(clone, "reset", "-q", "--hard", pushed)
    monkeypatch.chdir(clone)
    return clone, pushed, local_only


def stage(**form: Any) -> Any:
    from flows.training import stage_flow

    return stage_flow.fn(stage="finetune", **form)


@pytest.mark.parametrize("git_rev", ["main", "--upload-pack=touch /tmp/pwned", "HEAD~1", "abc123", "{local_only}"])
def test_stage_refuses_a_git_rev_that_is_not_a_commit_on_an_allowed_branch(worker, monkeypatch, git_rev):
    clone, _, local_only = worker
    head = git(clone, "rev-parse", "HEAD")
    refused_before_anything_runs(
        lambda: stage(git_rev=git_rev.format(local_only=local_only)), monkeypatch, clone, "git_rev .* refused"
    )
    assert git(clone, "rev-parse", "HEAD") == head


@pytest.mark.parametrize(
    ("change", "refused_key"),
    [
        ({"ingest": {"allow_private_hosts": True}}, "ingest.allow_private_hosts"),
        ({"ingest": {"allowed_roots": ["/"]}}, "ingest.allowed_roots"),
        ({"tracking": {"uri": "http://attacker.example"}}, "tracking.uri"),
        ({"validate": {"max_image_bytes": 2147483648}}, "validate.max_image_bytes"),
        ({"deployments": {"input_roots": ["/"]}}, "deployments.input_roots"),
        ({"ingest": {"source": "/etc"}}, "ingest.source"),
        ({"orchestration": {"flow_timeout_s": 604800}}, "orchestration.flow_timeout_s"),
    ],
)
def test_stage_refuses_params_yaml_that_changes_a_limit(worker, monkeypatch, change, refused_key):
    clone, pushed, _ = worker
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for section, values in {"finetune": {"epochs": 3}, **change}.items():
        params[section].update(values)
    before = (clone / "params.yaml").read_bytes()
    refused_before_anything_runs(
        lambda: stage(git_rev=pushed, params_yaml=yaml.safe_dump(params)), monkeypatch, clone, refused_key
    )
    assert (clone / "params.yaml").read_bytes() == before


def test_stage_form_accepts_a_pushed_commit_and_allow_listed_changes(worker):
    from components.lifecycle.run_forms import check_git_rev, check_received_params, check_stage_form

    clone, pushed, _ = worker
    rules = check_stage_form("finetune", ("train_head", "finetune"), pushed, None, ".")
    check_git_rev(clone, pushed, rules)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["finetune"]["epochs"] = 3
    check_received_params(yaml.safe_dump(params), (clone / "params.yaml").read_text(), clone, rules)
    with pytest.raises(RunFormRefused, match="workdir"):
        check_stage_form("finetune", ("finetune",), pushed, None, str(clone.parent))
    with pytest.raises(RunFormRefused, match="dvc_lock"):
        check_stage_form("finetune", ("finetune",), None, "schema: '2.0'\nstages:\n  evil: {}\n", ".")


# --- sweeps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "match"),
    [
        ({"grid": {"ingest.allow_http": [True, False]}}, "ingest.allow_http: ingest is a limit"),
        ({"points": [{"finetune.epochs": 2}, {"tracking.uri": "file:///tmp"}]}, "tracking.uri: tracking is a limit"),
        ({"grid": {"finetune.epochs": [2]}, "name": "../../../tmp/x"}, "name .* refused"),
        ({"grid": {"finetune.epochs": [2]}, "jobs": 10_000}, "jobs .* refused"),
        ({"grid": {"finetune.epochs": [2]}, "workdir": "/"}, "workdir .* refused"),
    ],
)
def test_sweep_refuses_non_allow_listed_keys_and_names_that_are_paths(workspace, monkeypatch, form, match):
    import flows.sweep

    monkeypatch.setattr(flows.sweep, "queue_points", lambda *a, **k: pytest.fail("queued before the check"))
    refused_before_anything_runs(lambda: flows.sweep.sweep_deployment.fn(**form), monkeypatch, workspace, match)


# --- prefect.yaml wires every deployment to a checking entry point ---------------------------------------


def test_every_deployment_runs_an_entry_point_that_checks_its_run_form():
    checking = {
        "flows/training.py:training_deployment",
        "flows/training.py:stage_flow",
        "flows/embedding_shards.py:embed_shard_flow",  # tests/unit/test_embedding_shards.py: its form's checks
        "flows/predict.py:batch_predict_deployment",
        "flows/sweep.py:sweep_deployment",
    }
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["entrypoint"] for d in deployments} <= checking, [d["entrypoint"] for d in deployments]
    # The CLI flows stay trusted and unchecked; a form's defaults must pass the checks as written.
    assert all(
        (d.get("parameters") or {}).get("params_path", "params.yaml") == "params.yaml"
        and (d.get("parameters") or {}).get("workdir", ".") == "."
        for d in deployments
    )


def test_the_workspace_settings_document_every_rule():
    rules = load_params(REPO / "params.yaml").deployments
    assert rules.input_roots == [] and rules.output_dir == "predictions" and rules.model_names is None
    assert "finetune.epochs" in rules.override_keys and not any(k.startswith("ingest") for k in rules.override_keys)
