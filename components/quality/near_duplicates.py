"""Near-duplicates: the same photo resized, re-encoded, mirrored or lightly cropped, which byte hashes miss.

Each image gets a perceptual fingerprint (components/quality/perceptual_hashes.py: phash and dhash of a thumbnail
and of its mirror image, cached by content hash); images within `validate.near_duplicates.max_distance`
bits on both hashes are paired (components/quality/hamming_search.py: an exact sub-quadratic search).
With `validate.near_duplicates.embeddings`, images whose frozen-backbone embeddings have cosine similarity
of at least `min_cosine` are paired too (components/quality/embedding_search.py; validate computes the
embeddings): they see crops and small rotations the hashes miss, the hashes see downscaled copies they miss.
Crops and rotations also sit below `min_cosine`, among distinct photos, so pairs from `candidate_cosine`
(at most `max_candidates` per image) are paired when geometric verification finds enough keypoint matches
fitting one crop/resize/small rotation (components/quality/geometric_verify.py).

Groups are the connected components of the pairs of all methods (each pair in the report names its
method: perceptual_hash, embedding, geometric). `resolve` applies the policy:
  different labels         -> every member quarantined as a label conflict (as exact duplicates are);
  more than one split      -> a leak: `move` puts every member in the split of the member with the
                              smallest content hash (deterministic, independent of row order),
                              `report` only lists it, `fail` makes it a problem that fails validation;
  one split, one label     -> reported (harmless to accuracy estimates, slightly over-weights the photo).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from components.core import files
from components.core.stage_config import NearDuplicatesConfig
from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb
from components.quality import embedding_search, geometric_verify
from components.quality.hamming_search import connected_groups, find_pairs
from components.quality.perceptual_hashes import fingerprints

MAX_LISTED_PAIRS = 20  # pairs listed per group in the report (a group of k identical images has k - 1)
# validate's embedding pass: rows (path, sha256 columns) -> their embeddings (components/modeling/embeddings.py)
Embedder = Callable[[pd.DataFrame], embedding_search.Embeddings]
QUARANTINE_COLUMNS = ["path", "label", "split", "checks", "reason"]
# Labels and file names come from the source: plain text, so a '$' in one is not matplotlib mathtext (or LaTeX).
PLAIN_TEXT = {"parse_math": False, "usetex": False}
Policy = Literal["move", "report", "fail"]


@dataclass
class NearDuplicateReport:
    """What `resolve` found and did; `counts` goes into the validation summary."""

    policy: str
    groups: list[dict[str, Any]] = field(default_factory=list)  # members (path, label, split, sha256), kind, action
    moved: list[dict[str, str]] = field(default_factory=list)  # path, from, to
    quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))
    problems: list[str] = field(default_factory=list)  # non-empty only with policy fail and a leak
    verification: dict[str, Any] = field(default_factory=dict)  # candidate pairs, verified, seconds

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
            "verification": self.verification,
        }


def resolve(frame: pd.DataFrame, groups: list[list[int]], policy: Policy) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """Apply `policy` to the groups (row positions in `frame`).

    Returns the rows to keep (label conflicts removed, leaked groups moved with policy `move`; the
    input is not modified) and the report, whose `quarantine` holds the removed rows in validate's
    quarantine.csv columns.
    """
    if policy not in ("move", "report", "fail"):
        raise ValueError(f"near-duplicate policy {policy!r}: expected move, report or fail")
    out = frame.copy(deep=False)  # copy-on-write: only a column written below is copied (issue 24)
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
    keep = ~out["path"].isin(report.quarantine["path"]).to_numpy()
    return (out if keep.all() else out[keep]), report


def check(
    frame: pd.DataFrame,
    config: NearDuplicatesConfig,
    limits: ImageLimits,
    cache_path: str | Path | None,
    picture_path: str | Path | None = None,
    embed: Embedder | None = None,
) -> tuple[pd.DataFrame, NearDuplicateReport]:
    """validate's one call: hash (cached), embed, group, apply `validate.near_duplicates`, draw the top groups.

    `frame` holds the rows that passed the file checks (path, label, split, sha256 columns); policy `off`
    returns it unchanged with an empty report. With `config.embeddings` and an `embed` function, pairs of
    close embeddings join the hash pairs (components/quality/embedding_search.py); each group lists its
    pairs and the method that found each.
    """
    if config.policy == "off":
        return frame.copy(), NearDuplicateReport("off")
    hashes, decoded = fingerprints(frame, limits, cache_path)
    found: dict[tuple[int, int], dict[str, Any]] = {}
    for a, b in zip(*find_pairs(hashes, config.max_distance, decoded)):
        found[(min(a, b), max(a, b))] = {"methods": ["perceptual_hash"]}
    verification: dict[str, Any] = {}
    if config.embeddings and embed is not None:
        verification = _embedding_pairs(frame, np.flatnonzero(decoded), config, limits, embed, found)
    pairs = np.array(sorted(found), dtype=np.intp).reshape(-1, 2)
    groups = connected_groups(len(frame), pairs[:, 0], pairs[:, 1])
    kept, report = resolve(frame, groups, config.policy)
    report.verification = verification
    for group, entry in zip(groups, report.groups):
        _describe_pairs(entry, frame, group, found)
    if picture_path is not None:
        plot_groups(frame, report, picture_path, limits)
    return kept, report


def _embedding_pairs(
    frame: pd.DataFrame,
    rows: np.ndarray,
    config: NearDuplicatesConfig,
    limits: ImageLimits,
    embed: Embedder,
    found: dict[tuple[int, int], dict[str, Any]],
) -> dict[str, Any]:
    """Add the embedding pairs to `found`: at min_cosine as they are, from candidate_cosine when verified.

    `rows` are the decodable rows (the others are not embedded). Candidates the hashes already paired are
    not verified again. Returns the verification's counts and seconds (components/quality/geometric_verify.py)."""
    lowest = min(config.candidate_cosine, config.min_cosine)
    a, b, cosine = embedding_search.near_pairs(embed(frame.iloc[rows]), lowest, config.probes)
    a, b = rows[a], rows[b]
    sure = cosine >= config.min_cosine
    for i, j, c in zip(a[sure].tolist(), b[sure].tolist(), cosine[sure].tolist()):
        entry = found.setdefault((i, j), {"methods": []})
        entry["methods"].append("embedding")
        entry["cosine"] = round(c, 4)
    new = np.array([(i, j) not in found for i, j in zip(a.tolist(), b.tolist())], bool)
    check = ~sure & new & geometric_verify.cap_per_image(a, b, cosine, config.max_candidates)
    verification = geometric_verify.verify_pairs(frame["path"].tolist(), a[check], b[check], limits)
    for i, j, c, m in zip(a[check].tolist(), b[check].tolist(), cosine[check].tolist(), verification.matches):
        if m.is_copy(config):
            found[(i, j)] = {
                "methods": ["geometric"],
                "cosine": round(c, 4),
                "inliers": m.inliers,
                "scale": round(m.scale, 3),
                "rotation": round(m.rotation, 1),
            }
    return verification.summary(config)


def _describe_pairs(
    entry: dict[str, Any], frame: pd.DataFrame, group: list[int], found: dict[tuple[int, int], dict[str, Any]]
) -> None:
    """Add the group's pairs (paths, the methods that found each, embedding cosine) and their methods."""
    members = set(group)
    pairs = [(ab, info) for ab, info in found.items() if ab[0] in members]
    paths = frame["path"].iloc  # only the listed pairs' paths become Python strings, not every row's per group
    entry["found_by"] = sorted({m for _, info in pairs for m in info["methods"]})
    entry["pairs"] = [{"a": paths[a], "b": paths[b], **info} for (a, b), info in pairs[:MAX_LISTED_PAIRS]]


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
            f"{group['kind']}\n{group.get('action', '')}\n{'+'.join(group.get('found_by', []))}",
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
