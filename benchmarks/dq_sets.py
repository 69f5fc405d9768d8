"""Image sets and backbone features for benchmarks/data_quality.py (cached under benchmarks/work/dq/).

Every set is a list of (path, label) on disk: the real flower_photos files, plus derived copies this
module writes once (near-duplicate variants, shifted copies) so that hashes, embeddings and the
guarded loader all read files exactly as the pipeline would.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from components.core.config import ModelConfig
from components.core.hashing import file_sha256
from components.core.stage_config import SplitFractions, TrainHeadConfig
from components.ingestion.manifest_rows import assign_split

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TP_SHARED_DIR", REPO.parent / "shared"))
FLOWERS = SHARED / "datasets" / "flower_photos"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
WORK = REPO / "benchmarks" / "work" / "dq"
MODEL = ModelConfig(backbone="mobilenet_v2", alpha=0.5, image_size=224, weights="imagenet")
SEED = 42

# Near-duplicate variants: what a copy of a photo typically went through.
VARIANTS = ("resize_50", "resize_25", "jpeg_q30", "crop_90", "crop_75", "crop_offset_80", "combo")


def flower_rows() -> list[dict[str, str]]:
    """Every flower_photos image with its label, content hash and the pipeline's default split."""
    rows = []
    for class_dir in sorted(p for p in FLOWERS.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.jpg")):
            sha = file_sha256(path)
            rows.append(
                {
                    "path": str(path),
                    "label": class_dir.name,
                    "sha256": sha,
                    "split": assign_split(sha, SEED, SplitFractions()),
                }
            )
    return rows


def hymenoptera_rows() -> list[dict[str, str]]:
    return [
        {"path": str(p), "label": p.parent.name, "sha256": file_sha256(p), "split": "new"}
        for p in sorted(HYMENOPTERA.glob("*/*/*.jpg"))
    ]


def _save(img: Image.Image, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, "JPEG", quality=quality)
    path.write_bytes(buffer.getvalue())


def _crop(img: Image.Image, fraction: float, centre: bool = True) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * fraction), int(h * fraction)
    left, top = ((w - cw) // 2, (h - ch) // 2) if centre else (0, 0)
    return img.crop((left, top, left + cw, top + ch))


def make_variant(img: Image.Image, kind: str) -> tuple[Image.Image, int]:
    """(image, JPEG quality) of one copy kind."""
    w, h = img.size
    if kind == "resize_50":
        return img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), 90
    if kind == "resize_25":
        return img.resize((max(32, w // 4), max(32, h // 4)), Image.Resampling.LANCZOS), 90
    if kind == "jpeg_q30":
        return img, 30
    if kind == "crop_90":
        return _crop(img, 0.9), 90
    if kind == "crop_75":
        return _crop(img, 0.75), 90
    if kind == "crop_offset_80":
        return _crop(img, 0.8, centre=False), 90
    if kind == "combo":  # crop, shrink, re-encode
        c = _crop(img, 0.85)
        return c.resize((int(c.width * 0.6), int(c.height * 0.6)), Image.Resampling.LANCZOS), 50
    raise ValueError(kind)


def near_duplicate_test_rows(rows: list[dict[str, str]], per_class: int = 60) -> list[dict[str, str]]:
    """`per_class` originals per class (fixed sample) plus every variant of each, written once."""
    rng = np.random.default_rng(SEED)
    out = []
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["label"], []).append(r)
    for label, members in sorted(by_class.items()):
        for i in sorted(rng.choice(len(members), size=min(per_class, len(members)), replace=False)):
            original = members[i]
            source = Path(original["path"]).stem
            out.append({**original, "source": source, "variant": "original"})
            with Image.open(original["path"]) as img:
                img = img.convert("RGB")
                for kind in VARIANTS:
                    path = WORK / "variants" / label / f"{source}__{kind}.jpg"
                    if not path.is_file():
                        copy, quality = make_variant(img, kind)
                        _save(copy, path, quality)
                    out.append(
                        {
                            "path": str(path),
                            "label": label,
                            "sha256": file_sha256(path),
                            "split": "variant",
                            "source": source,
                            "variant": kind,
                        }
                    )
    return out


def shift(img: Image.Image) -> Image.Image:
    """The 'shifted copy' of drift comparison (a): blur, a warm colour cast, a lower resolution."""
    w, h = img.size
    small = img.resize((w // 3, h // 3), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(small, dtype=np.float32) * np.array([1.15, 1.0, 0.8])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def shifted_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    out = []
    for r in rows:
        path = WORK / "shifted" / r["label"] / Path(r["path"]).name
        if not path.is_file():
            with Image.open(r["path"]) as img:
                _save(shift(img.convert("RGB")), path, 85)
        out.append({**r, "path": str(path), "sha256": file_sha256(path), "split": "shifted"})
    return out


def _extractor():
    from components.modeling import backbones

    model, _ = backbones.build_classifier(MODEL, 2, TrainHeadConfig())
    return backbones.feature_extractor(model)


_EXTRACTOR = None


def features(rows: list[dict[str, str]], name: str) -> tuple[np.ndarray, float]:
    """Pooled backbone features of `rows` (cached on disk by the rows' hashes); (features, seconds it took)."""
    global _EXTRACTOR
    from components.core import runtime
    from components.modeling.data import image_batches

    key = hashlib.sha256(("\n".join(r["sha256"] for r in rows) + repr(MODEL)).encode()).hexdigest()[:16]
    path = WORK / "features" / f"{name}-{key}.npz"
    if path.is_file():
        with np.load(path) as cache:
            return cache["x"], float(cache["seconds"])
    started = time.perf_counter()
    if _EXTRACTOR is None:
        runtime.configure_tensorflow(SEED)
        _EXTRACTOR = _extractor()
    batches = image_batches([r["path"] for r in rows], MODEL.image_size, 32)
    x = np.asarray(_EXTRACTOR.predict(batches, verbose=0), dtype=np.float32)
    seconds = time.perf_counter() - started
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, seconds=seconds)
    print(f"features {name}: {len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:.0f}/s)", flush=True)
    return x, seconds


def build_parser() -> argparse.ArgumentParser:
    """No options: the parser gives --help and refuses stray arguments."""
    return argparse.ArgumentParser(
        prog="python -m benchmarks.dq_sets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def main() -> None:
    build_parser().parse_args()
    os.environ.setdefault("KERAS_HOME", str(REPO / ".keras"))
    flowers = flower_rows()
    features(flowers, "flowers")
    features(near_duplicate_test_rows(flowers), "neardup_test")
    held_out = [r for r in flowers if r["split"] != "train"]
    features(shifted_rows(held_out), "shifted")
    features(hymenoptera_rows(), "hymenoptera")


if __name__ == "__main__":
    main()
