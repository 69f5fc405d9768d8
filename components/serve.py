"""Serve a registered version over HTTP, only once every file of it is verified (docs/serving.md).

The registered model runs its stored code (`serving_model.py`, `code/components/*`) when MLflow
loads it. This entry point downloads the version into a private temporary folder, checks every file
against the digest the pipeline recorded at registration (`model_tree_sha256`, a registry tag the
artifact store cannot change) and the Keras/ONNX hashes, refuses a version without that digest, and
only then starts MLflow's scoring server on the verified copy. Plain `mlflow models serve -m models:/...`
skips all of this and runs whatever the artifact store holds.

CLI: python -m components.serve --model models:/image-classifier@champion --host 127.0.0.1 --port 5001
     (or `tp-serve ...`; the tracking store from MLFLOW_TRACKING_URI or params.yaml's `tracking`)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import FrameType

from components.core import errors, runtime
from components.core.tracking_connection import RetryPolicy
from components.scoring import scoring


def server_command(local: Path, host: str, port: int, workers: int, timeout_s: int) -> list[str]:
    """MLflow's scoring server on a verified local folder, in this environment (--env-manager local)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        str(local),
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
        "-t",
        str(timeout_s),
    ]


def run_server(command: list[str]) -> int:
    """Run the server until it exits or this process is told to stop (then it is stopped too)."""
    bin_dir = str(Path(sys.executable).parent)  # the scoring server starts `uvicorn` by name
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(command, env=env)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds: the server is stopped and the verified copy removed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tp-serve", description="Verify a registered model's files, then serve it over HTTP."
    )
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5001, help="port to listen on")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--timeout", type=int, default=60, help="seconds one request may take")
    parser.add_argument("--params", default="params.yaml", help="tracking URI (MLFLOW_TRACKING_URI wins)")
    return parser


@errors.cli_errors("serve")
def main(argv: list[str] | None = None) -> int:
    import mlflow

    from components.core.config import ParamsError, load_params
    from components.core.tracking_connection import resolve_tracking_uri, shown_uri, use_tracking_uri

    args = build_parser().parse_args(argv)
    if not args.model.startswith("models:/"):
        print(
            "serve: --model must name a registered version (models:/NAME@ALIAS or models:/NAME/VERSION)",
            file=sys.stderr,
        )
        return errors.EXIT_USER_ERROR
    try:
        params = load_params(args.params) if Path(args.params).exists() else None
    except ParamsError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return errors.EXIT_USER_ERROR
    uri = resolve_tracking_uri(params.tracking) if params else None
    if uri:
        use_tracking_uri(uri)
    policy = RetryPolicy.from_config(params.tracking) if params else RetryPolicy.default()
    signal.signal(signal.SIGTERM, _stop)
    with tempfile.TemporaryDirectory(prefix="tp-serve-") as tmp:
        try:
            local, _, verified = scoring.download_verified(args.model, Path(tmp), policy, require_tree=True)
        except scoring.UnsafeModel as exc:
            print(f"serve: {args.model}: {exc}", file=sys.stderr)
            return errors.EXIT_USER_ERROR
        except mlflow.exceptions.MlflowException as exc:
            print(f"serve: could not load {args.model} from {shown_uri()}: {exc.message}", file=sys.stderr)
            return errors.EXIT_USER_ERROR
        print(f"serve: {args.model} verified ({verified}); serving it on http://{args.host}:{args.port}", flush=True)
        return run_server(server_command(local, args.host, args.port, args.workers, args.timeout))


if __name__ == "__main__":
    runtime.exit_process(main())
