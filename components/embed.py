"""validate's embedding pass, one shard at a time: what each work-pool worker runs when the pass is sharded.

    python -m components.embed --shard 2/4                          # shard 2 (from 0) of 4 into the cache
    python -m components.embed --shard 2/4 --export out/2            # ... and export it for the orchestrator
    python -m components.embed --merge out --shards 4                # check out/0..out/3, add them to the cache

Shard i of N holds the manifest's images with int(sha256[:8], 16) % N == i (components/modeling/
embedding_shards.py); only images not cached yet are computed. The cache is validate's (data/cache/embeddings
under the workspace root, per model key), so validate then finds the shards' embeddings cached and computes
only what is still missing. Not a DVC stage: the training flow runs it before validate
(`orchestration.embedding_shards`). Exit 2 when a merged export is refused (nothing of it is written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from components.core import errors, runtime
from components.core.config import Params, ParamsError, load_params
from components.core.paths import EMBEDDING_CACHE, INGEST_REPORT, MANIFEST, ONNX_CACHE
from components.core.settings import workspace_root
from components.ingestion.images import ImageLimits
from components.modeling import embedding_shards
from components.quality.validation_inputs import ValidateInputError, image_root, read_inputs, within


def manifest_images(manifest: Path, ingest_report: Path) -> pd.DataFrame:
    """The manifest rows validate may embed: read without error by ingest, inside its image folder."""
    frame, info = read_inputs(manifest, ingest_report)
    root = image_root(info, manifest)
    usable = (frame["error"] == "") & frame["path"].map(lambda p: within(p, root)).to_numpy(dtype=bool)
    return frame[usable.to_numpy(dtype=bool)]


def run_shard(params: Params, frame: pd.DataFrame, shard: int, shards: int, export: Path | None) -> int:
    """Cache shard `shard` of `shards` (exported to `export` when given); return its image count."""
    from components.modeling import embeddings

    root, model = workspace_root(), params.model
    key = embeddings.model_key(model)
    make_runner = embeddings.runner_factory(model, root / ONNX_CACHE)
    limits = ImageLimits.from_config(params.validate)
    cache = embedding_shards.embed_shard(
        frame, shard, shards, root / EMBEDDING_CACHE, key, make_runner, model.image_size, limits
    )
    shas = embedding_shards.shard_rows(frame, shard, shards)["sha256"].tolist()
    if export is not None:
        return embedding_shards.export_shard(cache, shas, key, shard, shards, export)
    return sum(s in cache.where for s in shas)


def run_merge(params: Params, frame: pd.DataFrame, folder: Path, shards: int) -> dict[str, int]:
    """Merge the exports folder/0 .. folder/<shards - 1> that exist into the cache."""
    from components.modeling import embeddings

    exports = {i: folder / str(i) for i in range(shards) if (folder / str(i)).exists()}
    key = embeddings.model_key(params.model)
    return embedding_shards.merge_shards(exports, shards, frame, workspace_root() / EMBEDDING_CACHE, key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="settings file (sections model and validate)")
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help="ingest's manifest")
    parser.add_argument("--ingest-report", type=Path, default=INGEST_REPORT, help="ingest's report: the image folder")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shard", help="INDEX/COUNT: embed shard INDEX (from 0) of COUNT into the cache")
    mode.add_argument("--merge", type=Path, help="a folder of exports named 0, 1, ...: check them, add to the cache")
    parser.add_argument("--shards", type=int, help="with --merge: how many shards the pass was split into")
    parser.add_argument("--export", type=Path, help="with --shard: also write the shard's embeddings to this folder")
    return parser


@errors.cli_errors("embed")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge is not None and args.shards is None:
        parser.error("--merge needs --shards")
    try:
        params = load_params(args.params)
        frame = manifest_images(args.manifest, args.ingest_report)
        if args.merge is not None:
            counts = run_merge(params, frame, args.merge, embedding_shards.parse_shard(f"0/{args.shards}")[1])
            print(
                f"embed: merged {counts['received']} embedding(s): {counts['added']} new, {counts['missing']} missing"
            )
            return 0
        shard, shards = embedding_shards.parse_shard(args.shard)
        count = run_shard(params, frame, shard, shards, args.export)
    except (ParamsError, ValidateInputError, embedding_shards.ShardRefused, ValueError) as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return 2
    print(
        f"embed: shard {shard}/{shards}: {count} image(s) embedded"
        + (f", exported to {args.export}" if args.export else "")
    )
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
