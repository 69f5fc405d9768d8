"""Near-duplicates: the same photo resized, re-encoded or lightly cropped, which byte hashes miss.

Method (measured in benchmarks/data_quality.py on flower_photos): two 64-bit perceptual hashes of a
grayscale thumbnail, `imagehash.phash` (low DCT frequencies) and `imagehash.dhash` (horizontal
gradients); two images are near-duplicates when BOTH Hamming distances are at most
`validate.near_duplicates.max_distance` (default 10). On copies of flower photos it found 100% of
those resized to 50% or 25% and re-encoded at JPEG quality 30, about a third of 10% crops and no
heavier crop, with no false pair; over all 6.7M pairs of flower_photos it paired one image across
labels, a true duplicate. phash alone at 10 paired 10 across labels (flowers centred on a dark
background look alike to it); requiring dhash to agree removes those. Backbone-embedding cosine
similarity catches crops but misses downscaled copies and needs a model pass in validate, so it is
not used here. Hashes are computed once per image and cached by the manifest's sha256 column.

Groups are the connected components of "within max_distance" pairs. `resolve` applies the policy:
  different labels         -> every member quarantined as a label conflict (as exact duplicates are);
  more than one split      -> a leak: `move` puts every member in the split of the member with the
                              smallest content hash (deterministic, independent of row order),
                              `report` only lists it, `fail` makes it a problem that fails validation;
  one split, one label     -> reported (harmless to accuracy estimates, slightly over-weights the photo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from components import files
from components.config import NearDuplicatesConfig
from components.images import ImageLimits, UnusableImage, decode_rgb
from components.progress import progress

HASH_BITS = 128  # phash (64) then dhash (64)
CACHE_VERSION = "phash8+dhash8-v1"  # bump when the fingerprint changes: old cache entries are then ignored
QUARANTINE_COLUMNS = ["path", "label", "split", "checks", "reason"]
# Labels and file names come from the source: plain text, so a '$' in one is not matplotlib mathtext (or LaTeX).
PLAIN_TEXT = {"parse_math": False, "usetex": False}
Policy = Literal["move", "report", "fail"]


def perceptual_hash(source: str | Path | bytes, limits: ImageLimits) -> np.ndarray:
    """128 bits (bool): phash then dhash of an image, decoded through the guarded loader."""
    import imagehash
    from PIL import Image

    # Both hashes squash the image to a small grayscale thumbnail; decoding at 64 px lets JPEG draft mode skip work.
    thumb = Image.fromarray(decode_rgb(source, 64, limits))
    return np.concatenate(
        [
            np.asarray(imagehash.phash(thumb).hash, dtype=bool).ravel(),
            np.asarray(imagehash.dhash(thumb).hash, dtype=bool).ravel(),
        ]
    )


def fingerprints(
    frame: pd.DataFrame, limits: ImageLimits, cache_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """((rows, 128) bool hashes, (rows,) bool decoded) of the manifest's images, by its path and sha256
    columns. Images that cannot be decoded get no hash (validate's decode check reports them).
    Reuses and extends the cache at `cache_path` (a workspace cache, keyed by content hash)."""
    cache = _read_cache(cache_path)
    out = np.zeros((len(frame), HASH_BITS), dtype=bool)
    decoded = np.zeros(len(frame), dtype=bool)
    fresh: dict[str, np.ndarray] = {}
    rows = progress(zip(frame["path"], frame["sha256"]), len(frame), "validate: perceptual hashes")
    for i, (path, sha) in enumerate(rows):
        bits = cache.get(sha, fresh.get(sha))  # byte-identical rows are hashed once
        if bits is None:
            try:
                bits = perceptual_hash(path, limits)
            except UnusableImage:
                continue  # validate's decode check reports it; it simply joins no group
            fresh[sha] = bits
        out[i], decoded[i] = bits, True
    if cache_path is not None and fresh:
        _write_cache(cache_path, {**cache, **fresh})
    return out, decoded


def _read_cache(cache_path: str | Path | None) -> dict[str, np.ndarray]:
    if cache_path is None or not Path(cache_path).is_file():
        return {}
    try:
        with np.load(cache_path, allow_pickle=False) as data:
            if str(data["version"]) != CACHE_VERSION:
                return {}
            return dict(zip(data["sha256"].tolist(), np.unpackbits(data["bits"], axis=1).astype(bool)))
    except (OSError, ValueError, KeyError):
        return {}  # a damaged cache is recomputed, never trusted


def _write_cache(cache_path: str | Path, entries: dict[str, np.ndarray]) -> None:
    keys = sorted(entries)
    with files.atomic_file(cache_path, "wb") as fh:
        np.savez(
            fh,
            version=np.array(CACHE_VERSION),
            sha256=np.array(keys, dtype="U64"),
            bits=np.packbits(np.stack([entries[k] for k in keys]), axis=1),
        )


def find_groups(hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None) -> list[list[int]]:
    """Row indices of near-duplicate groups (2+ members, each sorted), largest groups first.

    A pair belongs together when each of the two 64-bit hashes is within `max_distance`. All pairs are
    compared (XOR and popcount of packed hashes, in blocks of at most 2M pairs): O(n^2) time, O(n)
    memory; about a second for flower_photos' 3,670 images.
    """
    n = len(hashes)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    index = np.flatnonzero(valid)
    packed = np.packbits(hashes[index], axis=1).view(np.uint64) if len(index) else np.zeros((0, 2), np.uint64)
    parent = list(range(len(index)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = max(1, (1 << 21) // max(1, len(packed)))
    for start in range(0, len(packed), block):
        rows = packed[start : start + block]
        close = np.all(np.bitwise_count(rows[:, None, :] ^ packed[None, start:, :]) <= max_distance, axis=-1)
        for a, b in zip(*np.nonzero(close)):
            i, j = start + int(a), start + int(b)
            if i < j:
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for k in range(len(index)):
        groups.setdefault(root(k), []).append(int(index[k]))
    found = [sorted(g) for g in groups.values() if len(g) > 1]
    return sorted(found, key=lambda g: (-len(g), g[0]))


@dataclass
class NearDuplicateReport:
    """What `resolve` found and did; `counts` goes into the validation summary."""

    policy: str
    groups: list[dict[str, Any]] = field(default_factory=list)  # members (path, label, split, sha256), kind, action
    moved: list[dict[str, str]] = field(default_factory=list)  # path, from, to
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))
    problems: list[str] = field(default_factory=list)  # non-empty only with policy fail and a leak

    @property
    def counts(self) -> dict[str, int]:
        kinds = [g["kind"] for g in self.groups]
        return {
            "groups": len(self.groups),
            "images_in_groups": sum(len(g["members"]) for g in self.groups),
            "within_split": kinds.count("within_split"),
            "cross_split": kinds.count("cross_split"),
            "label_conflicts": kinds.count("label_conflict"),
            "moved_images": len(self.moved),
            "quarantined_images": len(self.quarantine),
        }

    def to_dict(self, max_groups: int = 50) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "counts": self.counts,
            "groups": self.groups[:max_groups],
            "moved": self.moved,
            "problems": self.problems,
        }


def resolve(frame: pd.DataFrame, groups: list[list[int]], policy: Policy) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """Apply `policy` to the groups (row positions in `frame`).

    Returns the rows to keep (label conflicts removed, leaked groups moved with policy `move`; the
    input is not modified) and the report, whose `quarantine` holds the removed rows in validate's
    quarantine.csv columns.
    """
    if policy not in ("move", "report", "fail"):
        raise ValueError(f"near-duplicate policy {policy!r}: expected move, report or fail")
    out = frame.copy()
    split_col = out.columns.get_loc("split")
    report = NearDuplicateReport(policy)
    dropped: list[dict[str, str]] = []
    for group in groups:
        members = frame.iloc[group]
        entry = {"members": members[["path", "label", "split", "sha256"]].to_dict("records")}
        if members["label"].nunique() > 1:
            entry.update(kind="label_conflict", action="quarantined")
            for row in members.itertuples():
                others = members[members["label"] != row.label]
                dropped.append(
                    {
                        "path": row.path,
                        "label": row.label,
                        "split": row.split,
                        "checks": "no_near_duplicate_label_conflict",
                        "reason": "label conflict: a near-duplicate is labelled differently in "
                        + ", ".join(f"{p} ({lab})" for p, lab in zip(others["path"], others["label"])),
                    }
                )
        elif members["split"].nunique() > 1:
            target = members.sort_values("sha256", kind="stable")["split"].iloc[0]
            entry.update(kind="cross_split", target_split=target)
            if policy == "move":
                entry["action"] = f"moved to {target}"
                for position, row in zip(group, members.itertuples()):
                    if row.split != target:
                        out.iloc[position, split_col] = target
                        report.moved.append({"path": row.path, "from": row.split, "to": target})
            elif policy == "fail":
                entry["action"] = "failed"
                report.problems.append(
                    "leak: near-duplicates in splits "
                    + ", ".join(sorted(set(members["split"])))
                    + ": "
                    + ", ".join(members["path"])
                )
            else:
                entry["action"] = "reported"
        else:
            entry.update(kind="within_split", action="reported")
        report.groups.append(entry)
    report.quarantine = pd.DataFrame(dropped, columns=QUARANTINE_COLUMNS)
    keep = ~out["path"].isin(report.quarantine["path"])
    return out[keep.to_numpy()], report


def check(
    frame: pd.DataFrame,
    config: NearDuplicatesConfig,
    limits: ImageLimits,
    cache_path: str | Path | None,
    picture_path: str | Path | None = None,
) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """validate's one call: hash (cached), group, apply `validate.near_duplicates`, draw the top groups.

    `frame` holds the rows that passed the file checks (path, label, split, sha256 columns); policy `off`
    returns it unchanged with an empty report.
    """
    if config.policy == "off":
        return frame.copy(), NearDuplicateReport("off")
    hashes, decoded = fingerprints(frame, limits, cache_path)
    kept, report = resolve(frame, find_groups(hashes, config.max_distance, decoded), config.policy)
    if picture_path is not None:
        plot_groups(frame, report, picture_path, limits)
    return kept, report


def plot_groups(
    frame: pd.DataFrame,
    report: NearDuplicateReport,
    path: str | Path,
    limits: ImageLimits,
    max_groups: int = 8,
    max_members: int = 6,
    thumb: int = 128,
) -> Path:
    """A PNG: one row per group (cross-split and conflicting groups first), thumbnails captioned label/split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"label_conflict": 0, "cross_split": 1, "within_split": 2}
    shown = sorted(report.groups, key=lambda g: (order[g["kind"]], -len(g["members"])))[:max_groups]
    rows = max(1, len(shown))
    cols = max([min(len(g["members"]), max_members) for g in shown] or [1])  # as wide as the largest group shown
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, group in enumerate(shown):
        for c, member in enumerate(group["members"][:max_members]):
            try:
                axes[r][c].imshow(decode_rgb(member["path"], thumb, limits))
            except UnusableImage:
                pass
            caption = f"{member['label']}/{member['split']}\n{Path(member['path']).name[:22]}"
            axes[r][c].set_title(caption, fontsize=7, **PLAIN_TEXT)
        axes[r][0].text(
            -0.1,
            0.5,
            f"{group['kind']}\n{group.get('action', '')}",
            transform=axes[r][0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
            rotation=90,
        )
    if not shown:
        axes[0][0].text(0.5, 0.5, "no near-duplicate groups", ha="center", va="center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
