"""Suspect labels: rank images of every split whose given label is likely wrong (confident learning).

Each image's class probabilities come from a head that did not see it: k-fold logistic regression on
the frozen-backbone features train_head already caches (seconds, no extra backbone pass but one over
the test split). Train and val images are scored out of fold; test images by the mean of the fold
heads, which never fit a test label. The folds read the cached features a chunk of rows at a time
(components/quality/streamed_logistic.py: scikit-learn's scaler + logistic regression without the whole
matrix in memory), so memory grows with images x classes, not images x features.
`cleanlab.filter.find_label_issues` flags the images whose probabilities contradict their label beyond the
per-class noise rates it estimates (the confident joint), ranked by self-confidence, the probability of the
given label (low = suspect).

Test labels never move a decision: they fit no head, the train/val flags are computed without them
(a second cleanlab call over train+val+test only decides the test flags), and the test flags are only
reported (evaluate shows accuracy with and without them; promotion stays on the headline accuracy).

Outputs: `label_issues.csv` (path, split, given_label, suggested_label, score, flagged, excluded) over
every flagged image, most suspect first, and a gallery PNG of the top suspects of each split. With
`train_head.label_issues.action: exclude` the flagged TRAINING images (at most `max_excluded_fraction` of
the training set, most suspect first) are left out of head training and listed in the model folder's
`label_exclusions.csv`; val and test images are never excluded (val decides early stopping, test is the
reported test). Nothing in the source or the manifest changes, so the choice is versioned with the model
and undone by setting the action back to `report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.core import figures, files
from components.core.array_rows import StackedRows, stacked
from components.core.progress import progress
from components.ingestion.images import ImageLimits, UnusableImage, decode_rgb
from components.quality import streamed_logistic

REPORT_FILE = "label_issues.csv"
GALLERY_FILE = "label_issues.png"
EXCLUSIONS_FILE = "label_exclusions.csv"
COLUMNS = ["path", "split", "given_label", "suggested_label", "score", "flagged", "excluded"]
# Labels come from the source: plain text, so a '$' in one is not matplotlib mathtext (or LaTeX).
PLAIN_TEXT = {"parse_math": False, "usetex": False}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelIssues:
    table: pd.DataFrame  # COLUMNS, flagged images first (most suspect first)
    excluded: np.ndarray  # bool per image, in the order given (only training images are ever True)
    folds: int
    checked_splits: tuple[str, ...] = ()  # splits whose images were ranked (empty: too few images to rank)


def out_of_fold_probabilities(
    features: np.ndarray | StackedRows,
    labels: np.ndarray,
    num_classes: int,
    folds: int = 5,
    seed: int = 0,
    unseen: np.ndarray | None = None,
    fit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(len(fit), num_classes) probabilities of the `fit` rows of `features` (default: all), each from a logistic
    regression fitted on the other folds (`labels`: one per fit row), and the mean of the fold models'
    probabilities for the `unseen` rows (row indices no fold was fitted on).

    `features` is read a chunk of rows at a time (a memory map stays on disk): memory grows with
    rows x classes, not with rows x features."""
    from sklearn.model_selection import StratifiedKFold

    source = stacked(features)
    fit = np.arange(len(source)) if fit is None else np.asarray(fit, dtype=np.int64)
    unseen = np.zeros(0, dtype=np.int64) if unseen is None else np.asarray(unseen, dtype=np.int64)
    probs = np.zeros((len(fit), num_classes), dtype=np.float64)
    unseen_probs = np.zeros((len(unseen), num_classes), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    folds_of = splitter.split(np.zeros((len(labels), 0)), labels)  # the folds depend on the labels alone
    for fit_rows, held_rows in progress(folds_of, folds, "label issues: folds", "fold"):
        # Strong L2 and a loose tolerance: ~15 lbfgs steps on 1280-d features, out-of-fold accuracy
        # within 0.2 points of a tight fit (benchmarks/data_quality.py), 5x faster.
        model = streamed_logistic.fit(source, fit[fit_rows], labels[fit_rows], C=0.03, tol=1e-3, max_iter=200)
        # A class absent from a fold's training rows gets probability 0 there (columns follow model.classes).
        probs[np.ix_(held_rows, model.classes)] = model.probabilities(source, fit[held_rows])
        if len(unseen):
            unseen_probs[:, model.classes] += model.probabilities(source, unseen) / folds
    return probs, unseen_probs


def usable_folds(labels: np.ndarray, folds: int) -> int:
    """Folds that every class can fill (stratified k-fold needs k members per class); 0 = too few to rank."""
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=int)
    smallest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    k = min(folds, smallest)
    return k if k >= 2 else 0


def empty_table() -> pd.DataFrame:
    """The report with no suspects (also what train_head writes when the check does not run)."""
    return pd.DataFrame(columns=COLUMNS)


def _cleanlab_flags(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices cleanlab flags, most suspect (lowest self-confidence) first."""
    from cleanlab.filter import find_label_issues as cleanlab_find

    # n_jobs=1: cleanlab would fork a pool from a process that holds TensorFlow/JAX threads, which can
    # deadlock the child (it hung the test suite once); thresholding probabilities takes milliseconds anyway.
    return np.asarray(
        cleanlab_find(labels, probs, return_indices_ranked_by="self_confidence", min_examples_per_class=1, n_jobs=1),
        dtype=np.int64,
    )


def find_label_issues(
    features: np.ndarray | StackedRows,
    labels: np.ndarray,
    classes: list[str],
    paths: list[str],
    folds: int = 5,
    seed: int = 0,
    max_excluded_fraction: float = 0.0,
    splits: list[str] | None = None,
) -> LabelIssues:
    """Probabilities from heads that did not see each image -> cleanlab's flagged images, ranked; the top
    training images marked for exclusion. `splits` names each image's split (default: all train).
    `features` (one row per image) may be memory maps stacked without copying: they are read in chunks."""
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    split_of = np.asarray(splits if splits is not None else ["train"] * len(labels), dtype=object)
    fit = np.flatnonzero(split_of != "test")  # train and val fit the fold heads; test labels fit nothing
    test = np.flatnonzero(split_of == "test")
    k = usable_folds(labels[fit], folds)
    excluded = np.zeros(len(labels), dtype=bool)
    if k == 0:
        return LabelIssues(empty_table(), excluded, 0)
    probs = np.zeros((len(labels), len(classes)), dtype=np.float64)
    probs[fit], probs[test] = out_of_fold_probabilities(features, labels[fit], len(classes), k, seed, test, fit)
    scores = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = fit[_cleanlab_flags(labels[fit], probs[fit])]
    if len(test):
        # With the train/val rows, so the noise rates come from them (a small test split alone estimates
        # none); only the test flags are taken from this call, so test labels move no train/val flag.
        both = np.concatenate([fit, test])
        flagged_test = both[_cleanlab_flags(labels[both], probs[both])]
        flagged = np.concatenate([flagged, flagged_test[split_of[flagged_test] == "test"]])
    ranked = flagged[np.argsort(scores[flagged], kind="stable")]
    train_ranked = ranked[split_of[ranked] == "train"]
    budget = int(np.floor(max_excluded_fraction * int((split_of == "train").sum())))
    excluded[train_ranked[:budget]] = True
    table = pd.DataFrame(
        {
            "path": [paths[i] for i in ranked],
            "split": split_of[ranked].astype(str),
            "given_label": [classes[labels[i]] for i in ranked],
            "suggested_label": [classes[int(probs[i].argmax())] for i in ranked],
            "score": np.round(scores[ranked], 6),
            "flagged": True,
            "excluded": excluded[ranked],
        },
        columns=COLUMNS,
    )
    checked = tuple(name for name in SPLITS if (split_of == name).any())
    return LabelIssues(table, excluded, k, checked)


def suspects_of(report: str | Path, split: str) -> list[str] | None:
    """Paths flagged in `split` by a label_issues.csv (None: the file is absent, so nothing was checked)."""
    path = Path(report)
    if not path.is_file():
        return None
    table = files.read_csv(path, dtype={"path": str, "split": str}, keep_default_na=False)
    if "split" not in table.columns:  # a report from before every split was checked: train only
        return None if split != "train" else table["path"].tolist()
    return table.loc[table["split"] == split, "path"].tolist()


def write_reports(
    issues: LabelIssues, report_dir: str | Path, limits: ImageLimits, gallery_images: int = 16
) -> list[Path]:
    """label_issues.csv and label_issues.png under report_dir."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    files.write_csv(issues.table, report_dir / REPORT_FILE)
    return [report_dir / REPORT_FILE, plot_gallery(issues.table, report_dir / GALLERY_FILE, limits, gallery_images)]


def write_exclusions(issues: LabelIssues, model_dir: str | Path) -> Path:
    """The model folder's list of training images left out (empty with action `report`)."""
    path = Path(model_dir) / EXCLUSIONS_FILE
    excluded = issues.table[issues.table["excluded"].astype(bool)]
    return files.write_csv(excluded[["path", "given_label", "suggested_label", "score"]], path)


def score_text(score: float) -> str:
    """Two significant digits: suspects' scores are often near 1e-4, which two decimals print as 0.00."""
    return f"{score:.2g}"


def gallery_rows(table: pd.DataFrame, count: int) -> pd.DataFrame:
    """The top `count` suspects taken in turn from each split (train's many would crowd out test's few)."""
    if table.empty or "split" not in table.columns:
        return table.head(count)
    rank_in_split = table.groupby("split", sort=False).cumcount()
    order = [SPLITS.index(s) if s in SPLITS else len(SPLITS) for s in table["split"]]
    turns = pd.DataFrame({"rank": rank_in_split.to_numpy(), "split": order}, index=table.index)
    return table.loc[turns.sort_values(["rank", "split"], kind="stable").index].head(count)


def plot_gallery(table: pd.DataFrame, path: str | Path, limits: ImageLimits, count: int = 16, thumb: int = 128) -> Path:
    """The top `count` suspects of every split, captioned split, given -> suggested label and score."""
    top = gallery_rows(table, count)
    cols = 4
    rows = max(1, -(-len(top) // cols))
    fig, axes = figures.pyplot().subplots(rows, cols, figsize=(cols * 2.2, rows * 2.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row in zip(axes.ravel(), top.to_dict("records")):
        try:
            ax.imshow(decode_rgb(row["path"], thumb, limits))
        except UnusableImage:
            pass
        split = f"[{row['split']}] " if "split" in row else ""
        ax.set_title(
            f"{split}given {row['given_label']}\nlikely {row['suggested_label']} ({score_text(row['score'])})",
            fontsize=8,
            **PLAIN_TEXT,
        )
    if top.empty:
        axes[0][0].text(0.5, 0.5, "no suspect labels", ha="center", va="center")
    fig.suptitle(
        "Suspect labels of every split (confidence in the given label, from heads that did not see it)", fontsize=9
    )
    return figures.save_png(fig, path, dpi=90)


def read_exclusions(model_dir: str | Path) -> set[str]:
    """Paths the head left out of training (empty when none were excluded or the file is absent)."""
    path = Path(model_dir) / EXCLUSIONS_FILE
    if not path.is_file():
        return set()
    return set(files.read_csv(path, dtype={"path": str}, keep_default_na=False)["path"])
