"""Benchmark of the data-quality checks (issue 13) on flower_photos, with the wall time each adds to a run.

    KERAS_HOME=.keras nice -n 10 python -m benchmarks.data_quality

1. Near-duplicate method: 60 originals per class, each also resized (50%, 25%), re-encoded (JPEG q30),
   cropped (90%, 75%, 80% from a corner) and all three at once; every pair of the 2,400 images is a
   positive (same source photo) or a negative. Perceptual hashes (phash, dhash, whash) vs cosine
   distance of MobileNetV2 (alpha 0.5, 224) embeddings, recall per kind of copy and precision.
2. Near-duplicates on all of flower_photos with the chosen method, under the pipeline's default split.
3. Suspect labels on the training split (the default split), from the cached as-is features.
4. Drift of (a) a shifted copy of the held-out images (blur, colour cast, a third of the resolution),
   (b) a different image set (hymenoptera_data) and a class the reference never saw (tulips),
   (c) a fresh random split of the same data and the held-out images as they are (both must stay quiet).

Features come from benchmarks/dq_sets.py, cached under benchmarks/work/dq/. Results:
benchmarks/results/data_quality.{json,md} and data_quality_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks import dq_sets as sets

RESULTS = sets.REPO / "benchmarks" / "results"
FULL_RUN_SECONDS = 520.1  # benchmarks/results/flowers.json: the whole pipeline on flower_photos, this machine
MAX_DISTANCE = 10  # validate.near_duplicates.max_distance


def _limits() -> Any:
    from components.core.stage_config import ValidateConfig
    from components.ingestion.images import ImageLimits

    return ImageLimits.from_config(ValidateConfig())


# --- 1. which method catches copies -----------------------------------------------------------------


def _hash_bits(rows: list[dict[str, str]]) -> tuple[dict[str, np.ndarray], float]:
    """phash, dhash and whash bits of every image (one decode each); seconds per image for all three."""
    import imagehash
    from PIL import Image

    from components.ingestion.images import decode_rgb

    out: dict[str, list[np.ndarray]] = {"phash": [], "dhash": [], "whash": []}
    started = time.perf_counter()
    for r in rows:
        thumb = Image.fromarray(decode_rgb(r["path"], 64, _limits()))
        for kind, fn in (("phash", imagehash.phash), ("dhash", imagehash.dhash), ("whash", imagehash.whash)):
            out[kind].append(np.asarray(fn(thumb).hash, dtype=bool).ravel())
    return {k: np.stack(v) for k, v in out.items()}, (time.perf_counter() - started) / len(rows)


def _hamming(bits: np.ndarray) -> np.ndarray:
    packed = np.packbits(bits, axis=1).view(np.uint64).ravel()
    return np.bitwise_count(packed[:, None] ^ packed[None, :]).astype(np.int16)


def _cosine(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1.0 - unit @ unit.T


def _scores(distance: np.ndarray, rows: list[dict[str, str]], threshold: float) -> dict[str, Any]:
    source = np.array([r["source"] for r in rows])
    variant = np.array([r["variant"] for r in rows])
    upper = np.triu_indices(len(rows), 1)
    positive = (source[:, None] == source[None, :])[upper]
    flagged = distance[upper] <= threshold
    tp, fp = int((flagged & positive).sum()), int((flagged & ~positive).sum())
    original = variant == "original"
    per_kind = {}
    for kind in sets.VARIANTS:
        copies = variant == kind
        pairs = source[original][:, None] == source[copies][None, :]
        per_kind[kind] = round(float((distance[np.ix_(original, copies)][pairs] <= threshold).mean()), 3)
    return {
        "threshold": threshold,
        "recall": round(tp / positive.sum(), 3),
        "precision": round(tp / max(1, tp + fp), 4),
        "false_pairs": fp,
        "negative_pairs": int((~positive).sum()),
        "recall_by_copy": per_kind,
    }


def _full_scale(distance: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Pairs flagged over all of flower_photos, and how many of them cross labels (nearly all false)."""
    upper = np.triu_indices(len(labels), 1)
    flagged = distance[upper] <= threshold
    return {
        "pairs": int(flagged.sum()),
        "cross_label_pairs": int((flagged & (labels[:, None] != labels[None, :])[upper]).sum()),
    }


def compare_methods(flowers: list[dict[str, str]], flower_x: np.ndarray) -> dict[str, Any]:
    rows = sets.near_duplicate_test_rows(flowers)
    labels = np.array([r["label"] for r in flowers])
    results: dict[str, Any] = {
        "images": len(rows),
        "originals": sum(r["variant"] == "original" for r in rows),
        "copies": list(sets.VARIANTS),
        "full_set_images": len(flowers),
        "methods": {},
    }
    test_bits, per_image = _hash_bits(rows)
    full_bits, _ = _hash_bits(flowers)
    test = {k: _hamming(v) for k, v in test_bits.items()}
    full = {k: _hamming(v) for k, v in full_bits.items()}
    # phash+dhash: both distances within the threshold, i.e. the larger of the two.
    test["phash+dhash"], full["phash+dhash"] = (
        np.maximum(test["phash"], test["dhash"]),
        np.maximum(full["phash"], full["dhash"]),
    )
    for kind in ("phash", "dhash", "whash", "phash+dhash"):
        results["methods"][kind] = {
            "ms_per_image": round(per_image * 1000, 2),
            "note": "all three hashes from one decode",
            "thresholds": [
                {**_scores(test[kind], rows, t), "full_set": _full_scale(full[kind], labels, t)}
                for t in (6, 8, 10, 12, 14)
            ],
        }
    x, seconds = sets.features(rows, "neardup_test")
    test["embedding"], full["embedding"] = _cosine(x), _cosine(flower_x)
    results["methods"]["embedding"] = {
        "ms_per_image": round(seconds / len(rows) * 1000, 2),
        "distance": "cosine distance of pooled backbone features",
        "thresholds": [
            {**_scores(test["embedding"], rows, t), "full_set": _full_scale(full["embedding"], labels, t)}
            for t in (0.08, 0.10, 0.12, 0.15, 0.20)
        ],
    }
    return results


# --- 2. near-duplicates in flower_photos ------------------------------------------------------------


def near_duplicates_in_flowers(flowers: list[dict[str, str]]) -> dict[str, Any]:
    from components.quality import hamming_search as hs
    from components.quality import near_duplicates as nd
    from components.quality import perceptual_hashes as ph

    frame = pd.DataFrame(flowers)
    cache = sets.WORK / "phash_cache.npz"
    cache.unlink(missing_ok=True)
    started = time.perf_counter()
    hashes, decoded = ph.fingerprints(frame, _limits(), cache)  # cold: every image hashed
    hashing_s = time.perf_counter() - started
    started = time.perf_counter()
    ph.fingerprints(frame, _limits(), cache)  # warm: the next run, same images
    cached_s = time.perf_counter() - started
    started = time.perf_counter()
    groups = hs.find_groups(hashes, MAX_DISTANCE, decoded)
    kept, report = nd.resolve(frame, groups, "move")
    grouping_s = time.perf_counter() - started
    nd.plot_groups(frame, report, RESULTS / "data_quality_near_duplicates.png", _limits(), max_groups=10)
    counts = report.counts
    return {
        "method": "phash+dhash",
        "max_distance": MAX_DISTANCE,
        "images": len(frame),
        "counts": counts,
        "moved": report.moved,
        "groups": report.to_dict(max_groups=25)["groups"],
        "seconds": {
            "hash_all_images_cold": round(hashing_s, 2),
            "hash_from_cache": round(cached_s, 2),
            "groups_and_policy": round(grouping_s, 2),
        },
        "picture": "data_quality_near_duplicates.png",
    }


# --- 3. suspect labels --------------------------------------------------------------------------------


def label_issues_in_flowers(flowers: list[dict[str, str]], x: np.ndarray) -> dict[str, Any]:
    from components.quality import label_issues

    train = [i for i, r in enumerate(flowers) if r["split"] == "train"]
    classes = sorted({r["label"] for r in flowers})
    labels = np.array([classes.index(flowers[i]["label"]) for i in train])
    started = time.perf_counter()
    issues = label_issues.find_label_issues(
        x[train],
        labels,
        classes,
        [flowers[i]["path"] for i in train],
        folds=5,
        seed=sets.SEED,
        max_excluded_fraction=0.02,
    )
    seconds = time.perf_counter() - started
    label_issues.plot_gallery(issues.table, RESULTS / "data_quality_label_issues.png", _limits(), 16)
    top = issues.table.head(20).copy()
    top["path"] = top["path"].map(lambda p: str(Path(p).relative_to(sets.FLOWERS)))
    return {
        "training_images": len(train),
        "flagged": len(issues.table),
        "excluded_with_action_exclude": int(issues.excluded.sum()),
        "folds": issues.folds,
        "seconds": round(seconds, 2),
        "flagged_by_given_label": issues.table["given_label"].value_counts().to_dict(),
        "top": top.to_dict("records"),
        "picture": "data_quality_label_issues.png",
    }


# --- 4. drift -------------------------------------------------------------------------------------------


def _champion_head(x: np.ndarray, y: np.ndarray) -> Any:
    """A softmax head on the same features (what train_head trains), standing in for the champion."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=0.1, max_iter=500).fit(x, y)


def _embed_seconds(rows: list[dict[str, str]]) -> float:
    """Wall time of one backbone pass over `rows` (the drift check's embedding cost), uncached."""
    from components.modeling.data import image_batches

    extractor = sets._extractor()
    extractor.predict(image_batches([r["path"] for r in rows[:32]], sets.MODEL.image_size, 32), verbose=0)  # trace
    started = time.perf_counter()
    extractor.predict(image_batches([r["path"] for r in rows], sets.MODEL.image_size, 32), verbose=0)
    return time.perf_counter() - started


def drift_comparisons(flowers: list[dict[str, str]], x: np.ndarray) -> dict[str, Any]:
    from components.core.stage_config import DriftConfig, SplitFractions
    from components.ingestion.manifest_rows import assign_split
    from components.modeling import drift

    config = DriftConfig()
    classes = sorted({r["label"] for r in flowers})
    y = np.array([classes.index(r["label"]) for r in flowers])
    split = np.array([r["split"] for r in flowers])
    sha = np.array([r["sha256"] for r in flowers])
    train, held = split == "train", split != "train"

    def reference(keep: np.ndarray, names: list[str]) -> tuple[Any, Any, float]:
        index = [classes.index(n) for n in names]
        remap = {c: i for i, c in enumerate(index)}
        labels = np.array([remap[v] for v in y[keep]])
        head = _champion_head(x[keep], labels)
        val = (split == "val") & np.isin(y, index)
        started = time.perf_counter()  # what train_head adds: the head's val confidence and the sample
        confidence = float(head.predict_proba(x[val]).max(1).mean())
        ref = drift.build_reference(
            x[keep], labels, names, sha[keep].tolist(), confidence, config.reference_per_class, sets.SEED
        )
        return ref, head, time.perf_counter() - started

    def compare(ref: Any, head: Any, feats: np.ndarray, labels: list[str]) -> dict[str, Any]:
        rows = drift.sample_per_class(np.array(labels), config.sample_per_class, sets.SEED)
        report = drift.compare(
            ref,
            feats[rows],
            [labels[i] for i in rows],
            head.predict_proba(feats[rows]),
            config,
            sets.SEED,
            new_images=len(labels),
        )
        return report.model_dump(exclude={"statistic", "reference", "schema_version"})

    ref, head, ref_seconds = reference(train, classes)
    held_rows = [r for r in flowers if r["split"] != "train"]
    shifted, _ = sets.features(sets.shifted_rows(held_rows), "shifted")
    hymenoptera_rows = sets.hymenoptera_rows()
    hymenoptera, _ = sets.features(hymenoptera_rows, "hymenoptera")
    fresh = np.array([assign_split(h, 7, SplitFractions()) for h in sha]) == "test"
    held_labels = [r["label"] for r in held_rows]
    out: dict[str, Any] = {
        "settings": config.model_dump(),
        "reference_seconds": round(ref_seconds, 2),
        "reference_images": int(len(ref.features)),
        "comparisons": {},
    }
    c = out["comparisons"]
    c["a_shifted_copy"] = compare(ref, head, shifted, held_labels)
    c["b_hymenoptera"] = compare(ref, head, hymenoptera, [r["label"] for r in hymenoptera_rows])
    c["b_hymenoptera_labelled_as_known"] = compare(
        ref, head, hymenoptera, [classes[i % 5] for i in range(len(hymenoptera))]
    )
    four = [n for n in classes if n != "tulips"]
    ref4, head4, _ = reference(train & (y != classes.index("tulips")), four)
    c["b_held_out_class_tulips"] = compare(ref4, head4, x[held], held_labels)
    c["c_fresh_random_split"] = compare(ref, head, x[fresh], [r["label"] for r, f in zip(flowers, fresh) if f])
    c["c_held_out_as_is"] = compare(ref, head, x[held], held_labels)
    sample = [held_rows[i] for i in drift.sample_per_class(np.array(held_labels), config.sample_per_class, sets.SEED)]
    out["embed_sample_images"] = len(sample)
    out["embed_sample_seconds"] = round(_embed_seconds(sample), 2)
    return out


# --- report ---------------------------------------------------------------------------------------------


def write_markdown(result: dict[str, Any], path: Path) -> None:
    nd, li, dr, t = result["near_duplicate_method"], result["label_issues"], result["drift"], result["timing"]
    lines = [
        "# Benchmark: data quality (issue 13) on flower_photos",
        "",
        f"{result['machine']}; load average (1, 5, 15 min) {result.get('load_average_at_start')} at the start, "
        f"{result.get('load_average_at_end')} at the end (the machine is shared: wall times include contention).",
        "",
        "## 1. Which method catches copies",
        f"{nd['originals']} originals (60 per class) and {len(nd['copies'])} copies of each: "
        f"{nd['images']} images, every pair labelled same-photo or not. Recall per kind of copy at each "
        "threshold; precision and false pairs over all pairs.",
        "",
        f"Last two columns: pairs flagged over all {nd['full_set_images']} flower_photos images and how many of "
        "them cross labels (nearly all false: one true cross-label duplicate exists).",
        "",
        "| method | threshold | ms/image | precision | false pairs | "
        + " | ".join(nd["copies"])
        + " | all flowers: pairs | across labels |",
        "|---|---|---|---|---|" + "---|" * len(nd["copies"]) + "---|---|",
    ]
    for name, m in nd["methods"].items():
        for s in m["thresholds"]:
            lines.append(
                f"| {name} | {s['threshold']} | {m.get('ms_per_image', '')} | {s['precision']} | {s['false_pairs']} | "
                + " | ".join(str(s["recall_by_copy"][k]) for k in nd["copies"])
                + f" | {s['full_set']['pairs']} | {s['full_set']['cross_label_pairs']} |"
            )
    c = result["near_duplicates"]["counts"]
    lines += [
        "",
        f"Chosen: phash+dhash (both Hamming distances <= {result['near_duplicates']['max_distance']}).",
        "",
        "## 2. Near-duplicates in flower_photos (default split, seed 42)",
        f"{result['near_duplicates']['images']} images: {c['groups']} groups ({c['images_in_groups']} images): "
        f"{c['within_split']} within one split and label, {c['cross_split']} across splits "
        f"({c['moved_images']} images moved by policy move), {c['label_conflicts']} under two labels "
        f"({c['quarantined_images']} images quarantined). Picture: data_quality_near_duplicates.png",
        "",
    ]
    for g in result["near_duplicates"]["groups"][:12]:
        members = ", ".join(
            f"{Path(m['path']).parent.name}/{Path(m['path']).name} ({m['split']})" for m in g["members"]
        )
        lines.append(f"- {g['kind']}, {g['action']}: {members}")
    lines += [
        "",
        "## 3. Suspect labels (training split)",
        f"{li['training_images']} training images, {li['folds']}-fold heads: {li['flagged']} flagged "
        f"({li['excluded_with_action_exclude']} would be excluded with action exclude); by given label: "
        f"{li['flagged_by_given_label']}. Gallery: data_quality_label_issues.png",
        "",
        "| path | given | likely | score |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['path']} | {r['given_label']} | {r['suggested_label']} | {r['score']:.3f} |" for r in li["top"]]
    lines += [
        "",
        "## 4. Drift (MMD^2, permutation p-value, Bonferroni; champion confidence)",
        "Statistic: MMD^2 (unbiased, Gaussian kernel, bandwidth = median squared distance of the pooled "
        "sample) between the reference and the new embeddings, overall and per class; permutation p-value; a "
        f"test fires when p < drift.significance ({dr['settings']['significance']}) / number of tests "
        "(Bonferroni), so a same-distribution sample fires with probability at most 1%. A drop of the "
        f"champion's mean top-class probability by more than {dr['settings']['max_confidence_drop']} also "
        "counts; labels the champion does not know are new classes.",
        f"Reference: {dr['reference_images']} training embeddings (100 per class); new: at most 100 per class. "
        "Confidence from a softmax head on the same features. Comparisons: (a) the 770 val+test images "
        "blurred, colour-cast and at a third of the resolution; (b) hymenoptera_data (ants, bees) under its "
        "own labels and under flower labels, and a reference without tulips against val+test of all five "
        "classes; (c) the test split of a fresh random split (seed 7) and the val+test images as they are.",
        "",
        "| comparison | drifted | overall MMD^2 | overall p | classes fired | new classes | confidence (drop) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in dr["comparisons"].items():
        fired = [k for k, v in r["per_class"].items() if v["drift"]]
        conf = r["confidence"] or {}
        lines.append(
            f"| {name} | {r['drifted']} | {r['overall']['mmd2']} | {r['overall']['p_value']} | {fired} | "
            f"{r['new_classes']} | {conf.get('champion_mean_top_probability')} ({conf.get('drop')}) |"
        )
    lines += ["", "## Wall time added to a run (this machine)", "", "| check | where | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['where']} | {v['seconds']} |" for k, v in t["parts"].items()]
    lines += [
        "",
        f"Total {t['total_seconds']} s = {t['fraction_of_full_run']:.1%} of a full run ({FULL_RUN_SECONDS} s, "
        "benchmarks/results/flowers.json); target under 10%.",
    ]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """No options: the parser gives --help and refuses stray arguments."""
    return argparse.ArgumentParser(
        prog="python -m benchmarks.data_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main() -> None:
    build_parser().parse_args()
    os.environ.setdefault("KERAS_HOME", str(sets.REPO / ".keras"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    flowers = sets.flower_rows()
    x, _ = sets.features(flowers, "flowers")
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    result["near_duplicate_method"] = compare_methods(flowers, x)
    result["near_duplicates"] = near_duplicates_in_flowers(flowers)
    result["label_issues"] = label_issues_in_flowers(flowers, x)
    result["drift"] = drift_comparisons(flowers, x)
    nd, li, dr = result["near_duplicates"]["seconds"], result["label_issues"], result["drift"]
    tests = max(r["seconds"] for r in dr["comparisons"].values())
    parts = {
        "near-duplicates (all images hashed, cold cache)": {
            "where": "validate",
            "seconds": round(nd["hash_all_images_cold"] + nd["groups_and_policy"], 2),
        },
        "suspect labels (5-fold heads + cleanlab)": {"where": "train_head", "seconds": li["seconds"]},
        "drift reference": {"where": "train_head", "seconds": dr["reference_seconds"]},
        "drift check (embed sample + tests)": {
            "where": "flow, before training",
            "seconds": round(dr["embed_sample_seconds"] + tests, 2),
        },
    }
    total = round(sum(p["seconds"] for p in parts.values()), 2)
    result["timing"] = {
        "parts": parts,
        "total_seconds": total,
        "full_run_seconds": FULL_RUN_SECONDS,
        "fraction_of_full_run": round(total / FULL_RUN_SECONDS, 4),
    }
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    (RESULTS / "data_quality.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_markdown(result, RESULTS / "data_quality.md")
    print((RESULTS / "data_quality.md").read_text())


if __name__ == "__main__":
    main()
