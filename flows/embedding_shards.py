"""validate's embedding pass over several workers: one Prefect task per shard, merged by content hash.

With `orchestration.embedding_shards` N > 1 (and `validate.near_duplicates.embeddings` on), the training
flow runs N tasks before validate whenever validate is about to run; each runs components/embed.py for
shard i of N (the images with int(sha256[:8], 16) % N == i):

- without TP_EMBED_DEPLOYMENT: here, one after another, each a process writing into the workspace's
  embedding cache (chunk files named by their content, written atomically);
- with TP_EMBED_DEPLOYMENT (e.g. embed-shard/gpu): all at once on that deployment's work pool. As for a
  remote stage (flows/remote_stage.py), ingest's outputs go to the DVC remote and the run form carries the
  revision, params.yaml and dvc.lock; each worker pulls them, embeds its shard and uploads an export to
  `<DVC remote>/tp-embedding-shards/<job>/<i>/`. The orchestrator downloads the exports (only the file
  names an export may hold), merges them (`components.embed --merge`: checked as untrusted, all or
  nothing) and deletes them from the remote.

validate is unchanged: it finds the embeddings cached and computes any still missing, so a shard that
failed costs time (a warning here), never a result, and `dvc repro` alone stays correct. A refused
export fails the run: a worker sent something it must not.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.core.config import Params, load_params
from components.core.settings import environment
from components.lifecycle import run_forms
from components.modeling.embedding_shards import CHUNK_FILE, MAX_SHARDS, SHARD_FILE
from flows.commands import run_command
from flows.dvc_workspace import STAGES, git_revision, push_stage_inputs
from flows.limits import StageFailed, failure, flow_deadline, retry_outages
from flows.remote_stage import check_finished, check_out_received
from flows.stage_tasks import component

JOB = re.compile(r"^[0-9a-f]{32}$")  # one sharded pass: names its folder in the DVC remote
SHARD_EXPORTS = Path(".tp") / "embedding-shards"  # downloaded exports, a folder per job (removed after merging)
REMOTE_FOLDER = "tp-embedding-shards"  # under the DVC remote's path
MAX_EXPORT_FILES = 10_000


def shard_count(params: Params) -> int:
    """How many shards the pass is split into: 1 (validate alone) unless embeddings are on."""
    near = params.validate.near_duplicates
    return params.orchestration.embedding_shards if near.embeddings and near.policy != "off" else 1


def embed_before_validate(root: Path, params_file: Path, logger: Any) -> dict[str, Any] | None:
    """Run the sharded pass when the settings ask for one; None when they do not."""
    params = load_params(params_file)
    shards = shard_count(params)
    if shards == 1:
        return None
    limits, deployment = params.orchestration, environment().embed_deployment
    started = time.monotonic()
    if deployment is None:
        run = embed_shard_here.with_options(
            timeout_seconds=limits.stage_timeout_s.validate, retry_jitter_factor=limits.retry_jitter_factor
        )
        done = [run(str(root), shard, shards, limits.stage_timeout_s.validate) for shard in range(shards)]
    else:
        done = _embed_remotely(root, deployment, shards, params, logger)
    result = {"shards": shards, "done": done, "where": deployment or "here"}
    result["seconds"] = round(time.monotonic() - started, 1)
    logger.info(
        "embedding pass: %d of %d shard(s) done (%s) in %s s", len(done), shards, result["where"], result["seconds"]
    )
    return result


@task(name="embed-shard", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_outages)
def embed_shard_here(workdir: str, shard: int, shards: int, timeout_s: float | None = None) -> int:
    """One shard into this workspace's embedding cache (components.embed)."""
    done = run_command(
        component("embed", "--shard", f"{shard}/{shards}"),
        workdir,
        get_run_logger(),
        timeout_s=timeout_s,
        outcome_of="embed",
    )
    if done.code != 0:
        raise failure(f"embedding shard {shard}/{shards}", done.code, done.lines, done.outcome)
    return shard


def _embed_remotely(root: Path, deployment: str, shards: int, params: Params, logger: Any) -> list[int]:
    """Send every shard to the deployment at once, then merge what came back; a lost shard is only a warning."""
    limits = params.orchestration
    job = uuid.uuid4().hex
    push_stage_inputs(root, "validate", logger)  # ingest's outputs, which the workers pull
    form = {
        "git_rev": git_revision(root),
        "params_yaml": (root / "params.yaml").read_text(encoding="utf-8"),
        "dvc_lock": (root / "dvc.lock").read_text(encoding="utf-8") if (root / "dvc.lock").exists() else "",
    }
    send = run_shard_remotely.with_options(
        timeout_seconds=limits.remote_stage_timeout_s + limits.step_timeout_s,
        retry_jitter_factor=limits.retry_jitter_factor,
    )
    futures = [
        send.submit(str(root), deployment, shard, shards, job, form, limits.remote_stage_timeout_s)
        for shard in range(shards)
    ]
    done = []
    try:
        for shard, future in enumerate(futures):
            try:
                done.append(future.result())
            except Exception as exc:  # validate computes that shard's embeddings itself
                logger.warning(
                    "embedding shard %d/%d failed: validate embeds its images itself (%s)", shard, shards, exc
                )
        if done:
            merge = run_command(
                component("embed", "--merge", SHARD_EXPORTS / job, "--shards", str(shards)),
                root,
                logger,
                timeout_s=limits.step_timeout_s,
                outcome_of="embed",
            )
            if merge.code != 0:
                raise StageFailed(f"embedding shards of job {job} refused:\n{merge.tail(5)}")
    finally:
        shutil.rmtree(root / SHARD_EXPORTS / job, ignore_errors=True)
        remove_exports(root, job)
    return done


@task(name="embed-shard-remote", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_outages)
def run_shard_remotely(
    workdir: str, deployment: str, shard: int, shards: int, job: str, form: dict[str, str], timeout_s: float
) -> int:
    """One shard on the deployment's work pool; its export is downloaded into SHARD_EXPORTS/<job>/<shard>."""
    from prefect.deployments import run_deployment

    parameters = {"shard": shard, "shards": shards, "job": job, **form}
    remote = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    check_finished(remote, f"embedding shard {shard}/{shards}", deployment, timeout_s)
    fetch_export(Path(workdir), job, shard)
    return shard


@flow(name="embed-shard", log_prints=True)
def embed_shard_flow(
    shard: int,
    shards: int,
    job: str,
    git_rev: str | None = None,
    params_yaml: str | None = None,
    dvc_lock: str | None = None,
    workdir: str = ".",
) -> dict[str, Any]:
    """A worker's shard (the embed-shard deployment's entry point): check out, pull ingest, embed, upload.

    The run form is untrusted: checked like a GPU stage's (components/lifecycle/run_forms.py), and shard,
    shards and job only name numbers and a folder of fixed shape.
    """
    rules = run_forms.check_stage_form("validate", STAGES, git_rev, dvc_lock, workdir)
    if not 1 <= shards <= MAX_SHARDS or not 0 <= shard < shards:
        raise run_forms.refuse("shard", f"{shard}/{shards}", f"0 <= shard < shards <= {MAX_SHARDS}")
    if not JOB.match(job):
        raise run_forms.refuse("job", job, "32 lowercase hex digits")
    root = Path.cwd().resolve()
    limits = load_params(root / "params.yaml").orchestration  # the worker's trusted settings
    logger = get_run_logger()
    with flow_deadline(limits.flow_timeout_s, f"embedding shard {shard}/{shards}"):
        check_out_received(git_rev, params_yaml, dvc_lock, root, rules)
        pulled = run_command(["dvc", "pull", "ingest"], root, logger, timeout_s=limits.step_timeout_s)
        if pulled.code != 0:
            raise StageFailed("dvc pull ingest failed on the worker:\n" + pulled.tail(15), retryable=True)
        with tempfile.TemporaryDirectory(prefix="tp-shard-") as tmp:
            export = Path(tmp) / "export"
            cmd = component("embed", "--shard", f"{shard}/{shards}", "--export", export)
            done = run_command(cmd, root, logger, timeout_s=limits.stage_timeout_s.validate, outcome_of="embed")
            if done.code != 0:
                raise failure(f"embedding shard {shard}/{shards}", done.code, done.lines, done.outcome)
            upload_export(root, export, job, shard)
    return {"shard": shard, "shards": shards, "job": job}


# --- exports in the DVC remote ---------------------------------------------------------------------------
# DVC's remote is the one store both sides reach (nothing is shared on disk); these use its file system.


def _remote(root: Path) -> tuple[Any, str]:
    """The default DVC remote's file system and this workspace's exports folder in it."""
    # DVC internals on purpose: dvc.api reads tracked data only; no public API writes other files to a remote,
    # and going through DVC's config keeps one set of remote settings and credentials.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = repo.cloud.get_remote()
    return remote.fs, remote.fs.join(remote.path, REMOTE_FOLDER)


def upload_export(root: Path, export: Path, job: str, shard: int) -> int:
    """Put a shard's export files (written by this worker) into the remote; return how many."""
    fs, base = _remote(root)
    names = sorted(p.name for p in export.iterdir() if p.is_file())
    for name in names:
        fs.put_file(str(export / name), fs.join(base, job, str(shard), name))
    return len(names)


def fetch_export(root: Path, job: str, shard: int) -> Path:
    """Download one shard's export; only names an export may hold, each into a folder this side chose."""
    fs, base = _remote(root)
    remote_dir = fs.join(base, job, str(shard))
    names = [fs.name(p) for p in fs.ls(remote_dir, detail=False)]
    refused = [n for n in names if n != SHARD_FILE and not CHUNK_FILE.match(n)]
    if refused or len(names) > MAX_EXPORT_FILES:
        raise StageFailed(f"embedding shard {shard}: its export holds unexpected files {refused[:3]}")
    local = root / SHARD_EXPORTS / job / str(shard)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        fs.get_file(fs.join(remote_dir, name), str(local / name))
    return local


def remove_exports(root: Path, job: str) -> None:
    """Delete a job's exports from the remote (they are merged, or refused)."""
    try:
        fs, base = _remote(root)
        fs.rm(fs.join(base, job), recursive=True)
    except FileNotFoundError:
        pass
