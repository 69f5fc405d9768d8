"""The workspace the training flow drives: its DVC stages, their status, the DVC remote, experiments, and git.

Every DVC and git command of the training flow is here, DVC's through flows/commands.py's `run_command`:
`dvc status` to skip unchanged stages, `dvc repro --single-item` to run one, `dvc push`/`pull` with the
default remote, `dvc exp run --temp` for experiments, and a GPU worker's checkout of the orchestrator's
revision. The Prefect tasks around them are in flows/stage_tasks.py, flows/remote_stage.py and
flows/experiments.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from components.core.contracts import RUN_INFO_FILE, ModelRunInfo
from components.core.paths import FINETUNE_DIR, HEAD_DIR
from flows.commands import Finished, run_command
from flows.limits import StageFailed

# The pipeline's stages in order (dvc.yaml); a Literal, so Prefect's run form offers exactly these.
Stage = Literal["ingest", "validate", "augment", "train_head", "finetune", "evaluate"]
STAGES: tuple[str, ...] = get_args(Stage)
LOCK_FILE = Path(".tp") / "training.lock"  # one run per workspace (flows/limits.py's workspace_slot)
STAGE_MODEL_DIRS = {"train_head": HEAD_DIR, "finetune": FINETUNE_DIR}


def changed_stages(root: Path, stage: str | None = None) -> set[str]:
    """DVC's own answer: the stages (all, or `stage` alone) whose deps, params, code or outs changed."""
    done = run_command(["dvc", "status", "--json", *([stage] if stage else [])], root)
    if done.code != 0:
        raise StageFailed(f"dvc status {stage or ''} failed:\n" + done.tail(15))
    return {key.removeprefix("dvc.yaml:") for key in json.loads("".join(done.lines) or "{}")}


def stages_reading(root: Path, keys: list[str]) -> set[str]:
    """The stages whose `params:` in dvc.yaml cover any of these settings (its section, the key, or a key in it)."""

    def covers(entry: Any, key: str) -> bool:
        if not isinstance(entry, str):
            return True  # another params file's keys: assume the stage reads the setting
        return key == entry or key.startswith(entry + ".") or entry.startswith(key + ".")

    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name for name, stage in stages.items() if any(covers(e, k) for e in stage.get("params", []) for k in keys)}


def needs_preflight(changed: set[str]) -> bool:
    """Preflight checks what augment, train_head and finetune will build (it imports TensorFlow and builds the
    backbone: seconds). They run only when one of them, or a stage before them, changed: not for an
    evaluate-only rerun, nor when nothing changed."""
    last_checked = STAGES.index("finetune")
    return any(STAGES.index(stage) <= last_checked for stage in changed)


def stage_is_current(stage: str, root: Path) -> bool:
    """Is the stage unchanged since its last run (its deps, params, code and outs)?"""
    return stage not in changed_stages(root, stage)


def reproduce(stage: str, root: Path, logger: Any, timeout_s: float | None) -> Finished:
    """`dvc repro --single-item STAGE`, with the outcome the stage's process recorded."""
    return run_command(["dvc", "repro", "--single-item", stage], root, logger, timeout_s=timeout_s, outcome_of=stage)


def default_remote(root: Path) -> str | None:
    """The workspace's default DVC remote, if one is configured (.dvc/config or config.local)."""
    done = run_command(["dvc", "remote", "default"], root)
    return done.lines[-1].strip() if done.code == 0 and done.lines else None


def push_data(root: Path, logger: Any, timeout_s: float | None = None) -> dict[str, Any]:
    """Send data and models to the default DVC remote, so other machines (and the registry's lineage) can fetch them."""
    remote = default_remote(root)
    if remote is None:
        logger.info("no default DVC remote configured: data and models stay in the local DVC cache")
        return {"remote": None, "pushed": False}
    done = run_command(["dvc", "push", "--run-cache"], root, logger, timeout_s=timeout_s)
    if done.code != 0:
        raise StageFailed(
            f"dvc push to remote '{remote}' failed (its URL is in `dvc remote list`); "
            "the run's outputs are complete locally and the next run pushes them:\n" + done.tail(10),
            retryable=True,  # a remote that did not answer
        )
    return {"remote": remote, "pushed": True}


def push_stage_inputs(root: Path, stage: str, logger: Any) -> None:
    """Send what `stage` reads (the stages before it, with their run-cache entries) to the DVC remote."""
    upstream = STAGES[STAGES.index(stage) - 1]
    done = run_command(["dvc", "push", "--with-deps", "--run-cache", upstream], root, logger)
    if done.code != 0:
        raise StageFailed(
            "dvc push failed: sending the stage's inputs to the DVC remote:\n" + done.tail(15), retryable=True
        )


def pull_stage_result(root: Path, stage: str, logger: Any) -> None:
    """Check out a stage that another machine ran, from the DVC remote's run-cache.

    `repro --pull` fetches the run-cache entry and its outputs, then checks them out. (`dvc pull <stage>`
    cannot: this dvc.lock has no hashes for the stage yet.) A miss makes DVC run the stage here instead.
    """
    done = run_command(["dvc", "repro", "--pull", "--single-item", stage], root, logger)
    if done.code != 0:
        raise StageFailed(
            "dvc repro --pull failed: fetching the result of the remote stage:\n" + done.tail(15), retryable=True
        )


def reproduce_on_worker(root: Path, stage: str, pull_s: float, repro_s: float, logger: Any) -> None:
    """A GPU worker's part: pull the stage's inputs, reproduce it, push its outputs with the run-cache entry."""
    upstream = STAGES[: STAGES.index(stage)]
    for args, timeout_s in ([(["pull", "--with-deps", upstream[-1]], pull_s)] if upstream else []) + [
        (["repro", "--single-item", stage], repro_s),
        (["push", "--run-cache", stage], pull_s),
    ]:
        done = run_command(["dvc", *args], root, logger, timeout_s=timeout_s)
        if done.code != 0:
            raise StageFailed(f"dvc {' '.join(args)} failed on the worker:\n" + done.tail(25))
    push_uncached_outputs(root, stage)


def push_uncached_outputs(root: Path, stage: str) -> int:
    """Push the stage's `cache: false` outputs (plots, metrics) to the DVC remote; return how many.

    DVC's run-cache restores a stage only when all its outputs are in the cache, and it saves the
    uncached ones there too, but `dvc push --run-cache` never sends those: without this the
    orchestrator's `repro --pull` misses and trains the stage a second time.
    """
    # DVC internals on purpose: dvc.api has no push (only reads: open, read, DVCFileSystem, exp_show, ...),
    # and the `dvc push` command skips `cache: false` outputs whatever its targets. Pinned by the lock file;
    # tests/integration/test_remote_stage.py fails if these calls change.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.stage.collect(f"{root / 'dvc.yaml'}:{stage}")  # an address: targets resolve against the cwd
        objects = {out.hash_info for one in found for out in one.outs if not out.use_cache and out.hash_info}
        result = repo.cloud.push(objects)
    if result.failed:
        raise StageFailed(
            f"could not push the uncached outputs of stage '{stage}': {sorted(h.value for h in result.failed)}"
        )
    return len(objects)


def made_by_flow_run(root: Path, stage: str) -> str | None:
    """The Prefect flow run recorded in a training stage's model folder (its declared output)."""
    folder = STAGE_MODEL_DIRS.get(stage)
    if folder is None or not (root / folder / RUN_INFO_FILE).is_file():
        return None
    return ModelRunInfo.read(root / folder / RUN_INFO_FILE).prefect_flow_run_id


def run_experiment_in_copy(root: Path, name: str, changes: list[str], logger: Any, timeout_s: float | None) -> Finished:
    """`dvc exp run --temp -n NAME -S ...`: the whole pipeline in DVC's temporary copy, saved as an experiment."""
    args = ["dvc", "exp", "run", "--temp", "--name", name]
    for path in copied_into_experiments(root):
        args += ["--copy-paths", path]
    for change in changes:
        args += ["--set-param", change]
    return run_command(args, root, logger, timeout_s=timeout_s)


def copied_into_experiments(root: Path) -> list[str]:
    """What DVC's temporary copy needs from the workspace to skip unchanged stages: dvc.lock (also when
    uncommitted) and the `cache: false` outputs, which DVC cannot check out from its cache.

    DVC copies a file only into a folder that exists there, so an uncached file goes with its folder
    (cached outputs copied along are checked out again by DVC anyway).
    """
    # DVC internals on purpose: no public API (dvc.api, the CLI's --json outputs) lists a stage's outputs
    # with their `cache` flag; dvc.yaml alone would miss the `metrics:` and `plots:` outputs DVC adds.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        uncached = {Path(out.fs_path) for stage in repo.index.stages for out in stage.outs if not out.use_cache}
    folders = {p if p.is_dir() or p.parent == root else p.parent for p in uncached if p.exists()}
    outermost = sorted(f for f in folders if not any(other in f.parents for other in folders))
    return [str(p.relative_to(root)) for p in [root / "dvc.lock", *outermost] if p.exists()]


# --- git ----------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def git_revision(root: Path) -> str:
    """HEAD of the workspace; a remote worker runs exactly this code, so it must be committed."""
    head = _git(root, "rev-parse", "HEAD")
    head.check_returncode()
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", "components", "flows", "dvc.yaml")
    if dirty.stdout.strip():
        raise RuntimeError(
            "stage code has uncommitted changes; a GPU worker runs the committed revision, so commit first "
            f"(changed: {dirty.stdout.strip().splitlines()[:5]})"
        )
    return head.stdout.strip()


def fetch_origin(root: Path) -> None:
    """`git fetch origin`, so a worker knows the branches a run form's revision must be on (its error is the
    check's to report: an unknown revision is refused there)."""
    _git(root, "fetch", "--quiet", "origin")


def committed_text(root: Path, git_rev: str, path: str) -> str | None:
    """A file as `git_rev` has it, None if that revision has no such file."""
    shown = _git(root, "show", f"{git_rev}:{path}")
    return shown.stdout if shown.returncode == 0 else None


def check_out(root: Path, git_rev: str) -> None:
    """Make the worker's clone `git_rev` (a checked revision), whatever it held before."""
    done = _git(root, "checkout", "--quiet", "--force", git_rev)
    if done.returncode != 0:
        raise StageFailed(f"git checkout {git_rev} failed on the worker: {done.stderr.strip()}")
