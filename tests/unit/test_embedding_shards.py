"""validate's embedding pass sharded over workers (issue 24): the shard rule, exports, the checked merge, the flow.

The backbone is faked at its boundary (the image batches and the runner): a vector per image path.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from components.core.stage_config import ValidateConfig
from components.ingestion.images import ImageLimits
from components.modeling import embedding_shards as shards_mod
from components.modeling import embeddings
from components.modeling.embedding_shards import ShardRefused

LIMITS = ImageLimits.from_config(ValidateConfig())
KEY = "model-key-1"


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def frame_of(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {"path": [f"img/{i}.jpg" for i in range(start, start + n)], "sha256": [sha(i) for i in range(start, start + n)]}
    )


def vector_of(path: str) -> np.ndarray:
    seed = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


class FakeRunner:
    engine = "fake"

    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    def predict_batches(self, batches, batch_size, verbose=0):
        self.calls.append(len(batches))
        yield np.stack([vector_of(p) for p in batches])


@pytest.fixture
def fake_backbone(monkeypatch) -> list[int]:
    """image_batches hands the paths through; the runner embeds each path. Returns the batch sizes seen."""
    from components.modeling import data

    monkeypatch.setattr(data, "image_batches", lambda paths, size, batch, limits=None: list(paths))
    calls: list[int] = []
    monkeypatch.setattr(embeddings, "model_key", lambda model: KEY)
    monkeypatch.setattr(embeddings, "runner_factory", lambda model, onnx_dir, engine="auto": lambda: FakeRunner(calls))
    return calls


def test_the_shard_rule_partitions_the_manifest_and_new_images_move_none():
    frame = frame_of(300)
    frame.loc[len(frame)] = ["img/bad.jpg", "not-a-hash"]  # never sharded: validate embeds it itself
    frame.loc[len(frame)] = ["img/copy.jpg", sha(7)]  # a byte-identical copy: embedded once
    for n in (1, 3, 4):
        parts = [set(shards_mod.shard_rows(frame, i, n)["sha256"]) for i in range(n)]
        assert sum(map(len, parts)) == 300 and set().union(*parts) == {sha(i) for i in range(300)}
        grown = pd.concat([frame, frame_of(100, start=300)], ignore_index=True)
        for i, part in enumerate(parts):
            assert part <= set(shards_mod.shard_rows(grown, i, n)["sha256"])  # adding images moves none
    assert shards_mod.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1/0", "a/b", "1/999"):
        with pytest.raises(ValueError, match="shard"):
            shards_mod.parse_shard(bad)


def _exports(frame: pd.DataFrame, n: int, root: Path) -> dict[int, Path]:
    """Each shard embedded in its own worker cache and exported, as workers without a shared disk do."""
    make_runner = embeddings.runner_factory(None, root)
    out = {}
    for i in range(n):
        cache = shards_mod.embed_shard(frame, i, n, root / f"worker{i}", KEY, make_runner, 32, LIMITS)
        shas = shards_mod.shard_rows(frame, i, n)["sha256"].tolist()
        out[i] = root / "exports" / str(i)
        assert shards_mod.export_shard(cache, shas, KEY, i, n, out[i]) == len(shas)
    return out


def test_merged_shards_equal_the_single_pass_cache(fake_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "CHUNK_ROWS", 16)  # several chunks per shard
    frame = frame_of(100)
    single = embeddings.cached_embeddings(frame, tmp_path / "single", KEY, lambda: FakeRunner([]), 32, LIMITS)
    counts = shards_mod.merge_shards(_exports(frame, 3, tmp_path), 3, frame, tmp_path / "merged", KEY)
    assert counts == {"received": 100, "added": 100, "missing": 0}
    merged = embeddings.EmbeddingCache(tmp_path / "merged" / KEY)
    assert set(merged.where) == set(single.where)
    shas = frame["sha256"].tolist()
    np.testing.assert_array_equal(merged.rows(shas).take(np.arange(100)), single.rows(shas).take(np.arange(100)))
    again = shards_mod.merge_shards(_exports(frame, 3, tmp_path / "again"), 3, frame, tmp_path / "merged", KEY)
    assert again == {"received": 100, "added": 0, "missing": 0}  # merged twice: nothing duplicated


def _corrupt(folder: Path, how: str) -> None:
    keys_file = next(folder.glob("*.keys.npy"))
    rows_file = keys_file.with_name(keys_file.name.replace(".keys", ""))
    keys, rows = np.load(keys_file), np.load(rows_file)
    if how == "other model":
        (folder / shards_mod.SHARD_FILE).write_text('{"model_key": "other", "shard": 1, "shards": 2}')
    elif how == "float64":
        np.save(rows_file, rows.astype(np.float64))
    elif how == "short rows":
        np.save(rows_file, rows[:-1])
    elif how == "nan":
        rows[0, 0] = np.nan
        np.save(rows_file, rows)
    elif how == "foreign key":
        keys[0] = sha(10**6)  # not an image of the manifest
        np.save(keys_file, keys)
    elif how == "pickle":
        np.save(keys_file, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    elif how == "stray file":
        (folder / "run_me.py").write_text("print('hi')")
    elif how == "link":
        (folder / "aaaa.npy").symlink_to(rows_file)


REFUSALS = {
    "other model": "another model",
    "float64": "expected float32",
    "short rows": "expected float32",
    "nan": "NaN",
    "foreign key": "not images of this shard",
    "pickle": "not a readable .npy",
    "stray file": "unexpected entries",
    "link": "unexpected entries",
}


@pytest.mark.parametrize("how", list(REFUSALS))
def test_a_corrupt_or_mismatched_shard_is_refused_and_nothing_is_merged(fake_backbone, tmp_path, how):
    frame = frame_of(40)
    exports = _exports(frame, 2, tmp_path)
    _corrupt(exports[1], how)
    with pytest.raises(ShardRefused, match=REFUSALS[how]) as refused:
        shards_mod.merge_shards(exports, 2, frame, tmp_path / "cache", KEY)
    assert "shard 1/2" in str(refused.value)
    assert not (tmp_path / "cache" / KEY).exists() or not any((tmp_path / "cache" / KEY).iterdir())  # shard 0 too


def _workspace(tmp_path: Path, monkeypatch) -> tuple[Path, pd.DataFrame]:
    """An ingested workspace (12 tiny images) whose params.yaml asks for 2 shards; the cwd and DVC root."""
    import yaml

    from components.core.paths import IngestPaths
    from components.embed import manifest_images
    from components.ingest import run_ingest
    from tests.datakit import ingest_params, make_classes, validate_config

    source, ws = tmp_path / "src", tmp_path / "ws"
    for split, seed in (("train", 0), ("val", 5000)):
        make_classes(source / split, {"a": 3, "b": 3}, start_seed=seed)
    params = ingest_params(source, validate_config(min_images_per_class=3))
    run_ingest(params, IngestPaths().under(ws))
    settings = yaml.safe_load(Path("params.yaml").read_text())
    settings["orchestration"]["embedding_shards"] = 2
    (ws / "params.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.chdir(ws)
    monkeypatch.setenv("DVC_ROOT", str(ws))
    return ws, manifest_images(ws / "data/manifest.csv", ws / "reports/ingest.json")


def test_the_flow_runs_two_shard_tasks_before_validate_which_finds_every_embedding_cached(
    fake_backbone, tmp_path, monkeypatch
):
    """training._run_stages with embedding_shards: 2 and no pool: two shard tasks (components.embed, in-process
    here), then validate, whose embedding pass computes nothing."""
    from components import embed
    from components.core.paths import EMBEDDING_CACHE
    from flows import embedding_shards, training

    ws, images = _workspace(tmp_path, monkeypatch)
    order: list[str] = []

    def shard_task(workdir, shard, shards, timeout_s):
        order.append(f"shard {shard}/{shards}")
        assert embed.main(["--shard", f"{shard}/{shards}"]) == 0

    def stage_task(stage, limits):
        def run(workdir, timeout_s, known_current):
            if known_current:  # the flow's one `dvc status` said so
                return {"stage": stage, "ran": False, "seconds": 0.0}
            order.append(stage)
            if stage == "validate":  # its pass finds every image cached: the runner is never built
                embeddings.cached_embeddings(images, ws / EMBEDDING_CACHE, KEY, pytest.fail, 32, LIMITS)
            return {"stage": stage, "ran": True, "seconds": 0.0}

        return run

    monkeypatch.setattr(embedding_shards, "embed_shard_here", SimpleNamespace(with_options=lambda **kw: shard_task))
    monkeypatch.setattr(training, "stage_task", stage_task)
    monkeypatch.setattr(training, "step_task", lambda step, limits: lambda *args: None)  # the drift check
    monkeypatch.setattr(training, "start_progress", lambda description: None)
    monkeypatch.setattr(training, "report_progress", lambda progress, done, stage: None)
    monkeypatch.setattr(training, "get_run_logger", lambda: SimpleNamespace(info=lambda *a: None))
    monkeypatch.delenv("TP_GPU_DEPLOYMENT", raising=False)
    monkeypatch.delenv("TP_EMBED_DEPLOYMENT", raising=False)
    limits = training.load_params(ws / "params.yaml").orchestration
    training._run_stages(ws, ws / "params.yaml", limits, {"ingest", "validate"})
    assert order[:4] == ["ingest", "shard 0/2", "shard 1/2", "validate"]
    assert sum(fake_backbone) == len(images) == 12  # each image embedded once, by its shard

    order.clear()  # validate up to date: no shards
    training._run_stages(ws, ws / "params.yaml", limits, set())
    assert not any(step.startswith("shard") for step in order)


def test_the_cli_exports_a_shard_and_merges_exports_refusing_a_bad_one(fake_backbone, tmp_path, monkeypatch, capsys):
    from components import embed

    ws, images = _workspace(tmp_path, monkeypatch)
    for i in range(2):
        assert embed.main(["--shard", f"{i}/2", "--export", f"out/{i}"]) == 0
    shutil.rmtree(ws / "data/cache")  # the orchestrator's side: nothing cached
    assert embed.main(["--merge", "out", "--shards", "2"]) == 0
    assert "12 embedding(s): 12 new, 0 missing" in capsys.readouterr().out
    (ws / "out/1/notes.txt").write_text("x")
    assert embed.main(["--merge", "out", "--shards", "2"]) == 2
    assert "shard 1/2: unexpected entries" in capsys.readouterr().err


def test_a_worker_refuses_a_run_form_with_a_bad_job_or_shard(monkeypatch):
    from components.lifecycle.run_forms import RunFormRefused
    from flows.embedding_shards import embed_shard_flow

    for shard, shards, job in ((0, 2, "../../etc"), (2, 2, "a" * 32), (0, 999, "a" * 32)):
        with pytest.raises(RunFormRefused, match="job|shard"):
            embed_shard_flow.fn(shard=shard, shards=shards, job=job)


def test_exports_travel_through_the_dvc_remote_and_only_export_names_come_back(tmp_path):
    """upload_export (worker) -> fetch_export (orchestrator) -> remove_exports, over a local-folder DVC remote."""
    import subprocess

    from flows import embedding_shards
    from flows.limits import StageFailed

    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    from dvc.repo import Repo

    Repo.init(str(ws)).close()
    (ws / ".dvc" / "config").write_text(
        f"[core]\n    remote = store\n['remote \"store\"']\n    url = {tmp_path / 'remote'}\n"
    )
    export = tmp_path / "export"
    export.mkdir()
    np.save(export / "ab12.keys.npy", np.array([sha(1)]))
    np.save(export / "ab12.npy", np.ones((1, 4), np.float32))
    (export / "shard.json").write_text("{}")
    job = "f" * 32
    assert embedding_shards.upload_export(ws, export, job, 1) == 3
    local = embedding_shards.fetch_export(ws, job, 1)
    assert local == ws / embedding_shards.SHARD_EXPORTS / job / "1"
    assert sorted(p.name for p in local.iterdir()) == ["ab12.keys.npy", "ab12.npy", "shard.json"]
    (tmp_path / "remote" / embedding_shards.REMOTE_FOLDER / job / "1" / "run_me.sh").write_text("x")
    with pytest.raises(StageFailed, match="unexpected files"):
        embedding_shards.fetch_export(ws, job, 1)
    embedding_shards.remove_exports(ws, job)
    assert not (tmp_path / "remote" / embedding_shards.REMOTE_FOLDER / job).exists()
