"""Near-duplicates by backbone embeddings (issue 24): crops and small rotations the perceptual hashes miss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.core.hashing import file_sha256
from components.core.stage_config import NearDuplicatesConfig, ValidateConfig
from components.ingestion.images import ImageLimits
from components.quality import embedding_search as es
from components.quality import near_duplicates
from tests.conftest import FLOWERS
from tests.modelkit import tiny_params

LIMITS = ImageLimits.from_config(ValidateConfig())
# A daisy whose 10% border crop and 5-degree rotation no perceptual hash pairs (checked below), and two other photos.
PHOTO, OTHERS = (
    "daisy/10172636503_21bededa75_n.jpg",
    ["daisy/100080576_f52e8ee070_n.jpg", "roses/102501987_3cdb8e5394_n.jpg"],
)


def planted_vectors(n: int = 1500, dims: int = 48, copies: int = 60) -> np.ndarray:
    """Random vectors with near copies of some, from cosine ~0.99 down to ~0.9."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((n, dims)).astype(np.float32)
    originals, copied = rng.choice(n, size=(2, copies), replace=False)
    for k, (o, c) in enumerate(zip(originals, copied)):
        noise = rng.standard_normal(dims).astype(np.float32)
        vectors[c] = vectors[o] / np.linalg.norm(vectors[o]) + (0.1 + 0.4 * k / copies) * noise / np.linalg.norm(noise)
    return vectors


class CountedReads(es.ArrayEmbeddings):
    """ArrayEmbeddings that count the rows read by index."""

    read = 0

    def take(self, rows: np.ndarray) -> np.ndarray:
        self.read += len(rows)
        return super().take(rows)


def test_index_finds_the_brute_force_cosine_pairs_reading_each_embedding_a_few_times():
    vectors = planted_vectors()
    expected_a, expected_b = es.exhaustive_pairs(vectors, 0.92)
    expected = set(zip(expected_a.tolist(), expected_b.tolist()))
    assert len(expected) > 30  # the threshold cuts through the planted pairs: some in, some out
    embeddings = CountedReads(vectors, block=256)
    a, b, cosine = es.near_pairs(embeddings, 0.92, probes=8)
    assert set(zip(a.tolist(), b.tolist())) == expected
    assert np.all(cosine >= 0.92) and np.all(a < b)
    np.testing.assert_allclose(
        cosine, np.einsum("ij,ij->i", es.normalised(vectors[a]), es.normalised(vectors[b])), atol=1e-5
    )
    # the k-means sample, then each image once where it lives and once per cell it probes: not all n per image
    assert embeddings.read <= len(vectors) * (1 + 1 + 8)
    again = es.near_pairs(es.ArrayEmbeddings(vectors), 0.92, probes=8)  # seeded: the same pairs every run
    assert all(np.array_equal(x, y) for x, y in zip((a, b, cosine), again))


def test_index_is_exact_when_every_cell_is_probed():
    vectors = planted_vectors(n=400)
    expected_a, expected_b = es.exhaustive_pairs(vectors, 0.2)  # a low threshold: thousands of pairs across cells
    a, b, _ = es.near_pairs(es.ArrayEmbeddings(vectors), 0.2, probes=es.cell_count(400))
    assert len(expected_a) > 1000
    assert set(zip(a.tolist(), b.tolist())) == set(zip(expected_a.tolist(), expected_b.tolist()))
    few_a, _, _ = es.near_pairs(es.ArrayEmbeddings(vectors), 0.2, probes=1)  # one cell each: the index does skip
    assert len(few_a) < len(expected_a)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The photo in train, its 10% border crop in val, its 5-degree rotation in test, two distinct photos."""
    if not FLOWERS.is_dir():
        pytest.skip(f"{FLOWERS} not found")
    folder = tmp_path_factory.mktemp("planted")
    with Image.open(FLOWERS / PHOTO) as opened:
        photo = opened.convert("RGB")
    w, h = photo.size
    photo.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(folder / "crop.jpg", quality=90)
    photo.rotate(5, resample=Image.Resampling.BICUBIC).save(folder / "rotated.jpg", quality=90)
    paths = [FLOWERS / PHOTO, folder / "crop.jpg", folder / "rotated.jpg", *(FLOWERS / p for p in OTHERS)]
    return pd.DataFrame(
        {
            "path": [str(p) for p in paths],
            "label": ["daisy"] * 4 + ["roses"],
            "split": ["train", "val", "test", "train", "val"],
            "sha256": [file_sha256(p) for p in paths],
        }
    )


class CountingEmbedder:
    """validate's embedding pass on the 64 px test backbone (Keras: no ONNX export).

    Counts the backbone passes: each writes one cache chunk."""

    def __init__(self, cache: Path, alpha: float = 0.35) -> None:
        self.cache, self.model, self.passes = cache, tiny_params(model={"alpha": alpha}).model, 0

    def __call__(self, rows: pd.DataFrame) -> es.Embeddings:
        from components.modeling import embeddings

        before = sum(1 for _ in (self.cache).glob("*/*.keys.npy"))
        out = embeddings.embed_frame(rows, self.model, LIMITS, self.cache, self.cache / "onnx", engine="keras")
        self.passes += sum(1 for _ in (self.cache).glob("*/*.keys.npy")) - before
        return out


def test_a_crop_and_a_rotation_across_splits_are_grouped_by_embeddings_not_by_hashes(planted, tmp_path: Path):
    # 0.9: the 64 px test backbone's copies sit at 0.91-0.93, its distinct photos below 0.65; candidate_cosine
    # 0.9: no geometric verification (tests/unit/test_geometric_verify.py), the embeddings alone
    config = NearDuplicatesConfig(min_cosine=0.9, candidate_cosine=0.9)
    hashes_only, report = near_duplicates.check(planted, config.model_copy(update={"embeddings": False}), LIMITS, None)
    assert report.groups == [] and hashes_only["split"].tolist() == planted["split"].tolist()

    embed = CountingEmbedder(tmp_path / "embeddings")
    kept, report = near_duplicates.check(planted, config, LIMITS, None, tmp_path / "picture.png", embed=embed)
    (group,) = report.groups  # the three copies, not the distinct photos
    assert sorted(m["path"] for m in group["members"]) == sorted(planted["path"][:3])
    assert group["kind"] == "cross_split" and group["found_by"] == ["embedding"]
    assert all(p["methods"] == ["embedding"] and p["cosine"] >= 0.9 for p in group["pairs"])
    assert kept["split"][:3].nunique() == 1 and kept["split"][3:].tolist() == ["train", "val"]
    assert (tmp_path / "picture.png").is_file()

    # Rerun: every embedding comes from the cache; another model is another cache entry.
    assert embed.passes == 1
    near_duplicates.check(planted, config, LIMITS, None, embed=embed)
    assert embed.passes == 1
    other = CountingEmbedder(tmp_path / "embeddings", alpha=0.5)
    near_duplicates.check(planted, config, LIMITS, None, embed=other)
    assert other.passes == 1 and len(list((tmp_path / "embeddings").glob("*/*.keys.npy"))) == 2


def test_the_embedding_cache_skips_a_damaged_chunk_and_recomputes_it(planted, tmp_path: Path):
    from components.modeling import embeddings

    cache = embeddings.EmbeddingCache(tmp_path / "key")
    cache.write_chunk(["a", "b"], np.ones((2, 3), np.float32))
    assert set(embeddings.EmbeddingCache(tmp_path / "key").where) == {"a", "b"}
    (tmp_path / "key" / next(p.name for p in (tmp_path / "key").glob("*.npy") if ".keys" not in p.name)).write_bytes(
        b"not numpy"
    )
    assert embeddings.EmbeddingCache(tmp_path / "key").where == {}


def test_cached_embeddings_are_read_by_index_across_chunks_in_the_order_asked(tmp_path: Path, monkeypatch):
    from components.core import array_rows
    from components.modeling import embeddings

    cache = embeddings.EmbeddingCache(tmp_path / "key")
    cache.write_chunk(["a", "b", "c"], np.arange(9, dtype=np.float32).reshape(3, 3))
    cache.write_chunk(["d", "e"], 100 + np.arange(6, dtype=np.float32).reshape(2, 3))
    released: list[int] = []
    monkeypatch.setattr(array_rows, "release", lambda array: released.append(len(array)))
    frame = embeddings.EmbeddingCache(tmp_path / "key").rows(["e", "a", "c", "a", "d"])
    got = frame.take(np.array([0, 3, 2, 4]))  # e, a, c, d: rows of both chunk files, interleaved
    np.testing.assert_array_equal(got[:, 0], [103, 0, 6, 100])
    assert sorted(released) == [2, 3]  # one read per chunk file touched, its map's pages handed back after it
    np.testing.assert_array_equal(np.concatenate(list(frame.blocks()))[:, 0], [103, 0, 6, 0, 100])


def test_validate_runs_the_embedding_pass_of_the_model_section_and_moves_the_pair(tmp_path: Path, monkeypatch):
    """run_validate's wiring: the `model:` backbone, the workspace caches, the pair moved; the pass faked (no model)."""
    from components import validate
    from components.core.config import Params
    from components.core.paths import IngestPaths, ValidatePaths
    from components.ingest import run_ingest
    from components.modeling import embeddings
    from tests.datakit import ingest_params, make_classes, validate_config

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    source = tmp_path / "src"
    for split, seed in (("train", 0), ("val", 5000), ("test", 7000)):
        make_classes(source / split, {"a": 3, "b": 3}, start_seed=seed)
    calls = []

    def fake_embed_frame(rows, model, limits, cache_dir, onnx_dir, engine="auto"):
        calls.append((model, Path(cache_dir), Path(onnx_dir)))
        names = [Path(p).parent.parent.name + "/" + Path(p).name for p in rows["path"]]
        vectors = np.eye(len(rows), dtype=np.float32)  # every image its own direction...
        vectors[names.index("val/a_000.jpg")] = vectors[names.index("train/a_000.jpg")]  # ...but this pair
        return es.ArrayEmbeddings(vectors)

    monkeypatch.setattr(embeddings, "embed_frame", fake_embed_frame)
    config = validate_config(min_images_per_class=3, near_duplicates=NearDuplicatesConfig())
    params = Params(validate=config, model=tiny_params().model)
    ws = tmp_path / "ws"
    ingested = run_ingest(ingest_params(source, config), IngestPaths().under(ws))
    paths = ValidatePaths(
        manifest=ingested.manifest_path,
        ingest_report=ws / "reports" / "ingest.json",
        out_manifest=ws / "data" / "validated.csv",
        report_dir=ws / "reports" / "validation",
    )
    result = validate.run_validate(params, paths)
    assert calls == [(params.model, tmp_path / validate.EMBEDDING_CACHE, tmp_path / validate.ONNX_CACHE)]
    assert result.passed and result.near_duplicates["cross_split"] == 1 and result.near_duplicates["moved_images"] == 1
    (group,) = validate.files.read_json(result.summary_path)["near_duplicates"]["groups"]
    assert group["found_by"] == ["embedding"] and group["pairs"][0]["cosine"] == 1.0
