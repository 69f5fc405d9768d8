"""Near-duplicate search: the multi-index (components.quality.hamming_search.index_pairs) vs all pairs.

    nice -n 10 .venv/bin/python -m benchmarks.near_duplicates

Synthetic 256-bit fingerprints (uniformly random words: phash, dhash, mirror phash, mirror dhash) at
max_distance 10, with 1% of rows planted as near copies of another row (k bits apart on both hashes,
k = 0..10, half of them against the other row's mirror view). `find_groups` is timed end to end
(search "auto": the cost model's plan, and "all_pairs" where affordable); the growth exponent is the
least-squares slope of log(seconds) on log(rows). Where both ran, the groups must be identical, and
every planted pair must be grouped. Then flower_photos (all 3,670 images, hashed here): the groups
of the index vs all pairs, and what the mirror view adds over the direct hashes. Writes
benchmarks/results/near_duplicates.{json,md}. One shared 2-core machine: timings are single runs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.core import files
from components.quality import hamming_search as hs
from components.quality import perceptual_hashes as ph

RESULTS = Path(__file__).resolve().parent / "results"
MAX_DISTANCE = 10  # validate.near_duplicates.max_distance in params.yaml


def flip(words: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    out = words.copy()
    for row in range(len(out)):
        out[row] ^= np.uint64(sum(1 << int(b) for b in rng.choice(64, bits, replace=False)))
    return out


def synthetic(n: int, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(n, 256) bool fingerprints and the planted (original, copy) pairs."""
    rng = np.random.default_rng(seed)
    words = np.frombuffer(rng.bytes(n * 32), dtype=np.uint64).reshape(n, 4).copy()
    copies = rng.choice(n, size=(n // 100, 2), replace=False)
    for k, (original, copy) in enumerate(copies):
        bits = k % (MAX_DISTANCE + 1)
        view = words[original, 2:] if k % 2 else words[original, :2]  # odd: a mirrored copy
        words[copy, :2] = flip(view, bits, rng)
    fingerprints = np.unpackbits(words.view(np.uint8), axis=1).astype(bool)
    return fingerprints, [(int(a), int(b)) for a, b in copies]


def timed(hashes: np.ndarray, search: str) -> tuple[list[list[int]], float]:
    started = time.perf_counter()
    groups = hs.find_groups(hashes, MAX_DISTANCE, search=search)
    return groups, time.perf_counter() - started


def slope(rows: list[dict[str, Any]], key: str) -> float | None:
    points = [(r["rows"], r[key]) for r in rows if r.get(key)]
    if len(points) < 2:
        return None
    x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return round(float(np.polyfit(x, y, 1)[0]), 2)


def synthetic_runs(index_sizes: list[int], all_pairs_sizes: list[int]) -> list[dict[str, Any]]:
    out = []
    hs.find_groups(synthetic(200, seed=0)[0], MAX_DISTANCE, search="index")  # imports (scipy) before timing
    for n in sorted(set(index_sizes) | set(all_pairs_sizes)):
        hashes, planted = synthetic(n, seed=n)
        row: dict[str, Any] = {"rows": n, "plan": hs.search_plan(n, MAX_DISTANCE), "planted_pairs": len(planted)}
        groups = None
        if n in index_sizes:
            groups, row["index_s"] = timed(hashes, "auto")
            member = {i: g[0] for g in groups for i in g}
            row["planted_pairs_grouped"] = sum(member.get(a, -1) == member.get(b, -2) for a, b in planted)
        if n in all_pairs_sizes:
            exact, row["all_pairs_s"] = timed(hashes, "all_pairs")
            if groups is not None:
                row["same_groups"] = groups == exact
        row["groups"] = len(groups if groups is not None else exact)
        print(row, flush=True)
        out.append(row)
    return out


def flowers() -> dict[str, Any] | None:
    from benchmarks import dq_sets
    from components.core.stage_config import ValidateConfig
    from components.ingestion.images import ImageLimits

    if not dq_sets.FLOWERS.is_dir():
        return None
    frame = pd.DataFrame(dq_sets.flower_rows())
    started = time.perf_counter()
    hashes, decoded = ph.fingerprints(frame, ImageLimits.from_config(ValidateConfig()))
    hashing_s = time.perf_counter() - started
    timings, found = {}, {}
    for search in ("auto", "all_pairs"):
        started = time.perf_counter()
        found[search] = hs.find_groups(hashes, MAX_DISTANCE, decoded, search=search)
        timings[search] = round(time.perf_counter() - started, 3)
    direct = hs.find_groups(hashes[:, : ph.HALF // 8], MAX_DISTANCE, decoded, search="all_pairs")
    paired = {tuple(g) for g in direct}
    added = [g for g in found["auto"] if tuple(g) not in paired]

    def describe(group: list[int]) -> list[str]:
        rows = frame.iloc[group]
        return [f"{r.label}/{Path(r.path).name} ({r.split})" for r in rows.itertuples()]

    return {
        "images": len(frame),
        "hash_s": round(hashing_s, 2),
        "plan": hs.search_plan(int(decoded.sum()), MAX_DISTANCE),
        "index_s": timings["auto"],
        "all_pairs_s": timings["all_pairs"],
        "same_groups": found["auto"] == found["all_pairs"],
        "groups_with_mirror": len(found["auto"]),
        "groups_direct_only": len(direct),
        "groups_changed_by_mirror": [describe(g) for g in added],
    }


def write_markdown(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# Near-duplicate search: multi-index vs all pairs",
        "",
        f"max_distance {MAX_DISTANCE}, 256-bit fingerprints (image and mirror), `find_groups` end to end; "
        f"one run each on {result['machine']}. Command: `python -m benchmarks.near_duplicates`.",
        "",
        "| rows | plan (chunks) | index s | all pairs s | same groups | planted pairs grouped |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["synthetic"]:
        grouped = f"{r['planted_pairs_grouped']} of {r['planted_pairs']}" if "planted_pairs_grouped" in r else "-"
        index_s, all_s = (f"{r[k]:.2f}" if k in r else "-" for k in ("index_s", "all_pairs_s"))
        lines.append(f"| {r['rows']:,} | {r['plan']} | {index_s} | {all_s} | {r.get('same_groups', '-')} | {grouped} |")
    g = result["growth"]
    lines += [
        "",
        f"Fitted growth exponent (seconds ~ rows^k) over all sizes: index k = {g['index']}, all pairs k = "
        f"{g['all_pairs']}; between the two largest sizes: index {g['index_last_step']}, all pairs "
        f"{g['all_pairs_last_step']}. Extrapolated to 1,000,000 rows with the steeper exponent: index "
        f"~{g['index_1m_s']:.0f} s, all pairs ~{g['all_pairs_1m_s']:.0f} s.",
        "",
    ]
    f = result.get("flowers")
    if f:
        lines += [
            f"## flower_photos ({f['images']} images)",
            "",
            f"Hashing (image and mirror, one decode): {f['hash_s']} s. Search: index ({f['plan']}) {f['index_s']} s, "
            f"all pairs {f['all_pairs_s']} s; same groups: {f['same_groups']}. Groups: {f['groups_with_mirror']} "
            f"with the mirror view, {f['groups_direct_only']} with direct hashes only. Groups new or changed by "
            "the mirror view:",
            "",
        ]
        lines += [f"- {', '.join(g)}" for g in f["groups_changed_by_mirror"]] or ["- none"]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.near_duplicates", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--index-sizes",
        type=int,
        nargs="+",
        default=[4_000, 16_000, 32_000, 64_000, 256_000],
        help="hash counts the multi-index search is timed on",
    )
    parser.add_argument(
        "--all-pairs-sizes",
        type=int,
        nargs="+",
        default=[4_000, 16_000, 32_000],
        help="hash counts the exact all-pairs search is timed on (quadratic: keep them small)",
    )
    parser.add_argument("--skip-flowers", action="store_true", help="skip the run on flower_photos' real hashes")
    parser.add_argument("--out", type=Path, default=RESULTS / "near_duplicates", help="results path; .json and .md")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    runs = synthetic_runs(args.index_sizes, args.all_pairs_sizes)
    growth: dict[str, Any] = {}
    for key, col in (("index", "index_s"), ("all_pairs", "all_pairs_s")):
        measured = [r for r in runs if r.get(col)]
        growth[key] = slope(measured, col)
        growth[f"{key}_last_step"] = slope(measured[-2:], col)  # small sizes are overhead-bound: the top step
        exponent = max(growth[key], growth[f"{key}_last_step"])  # extrapolate with the steeper of the two
        growth[f"{key}_1m_s"] = round(measured[-1][col] * (1_000_000 / measured[-1]["rows"]) ** exponent, 1)
    result: dict[str, Any] = {
        "max_distance": MAX_DISTANCE,
        "synthetic": runs,
        "growth": growth,
        "flowers": None if args.skip_flowers else flowers(),
    }
    result["machine"] = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end"
    files.write_json(args.out.with_suffix(".json"), result)
    write_markdown(result, args.out.with_suffix(".md"))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
