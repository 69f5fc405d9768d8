"""Drift: do new images still look like the champion's training data? The answer can decide a retrain.

Reference (`drift_reference.npz`, saved in the model folder by the stage that trains the model): a
seeded sample of at most `drift.reference_per_class` training-image embeddings per class, the
per-class means, an 8-byte digest of every training image's sha256 (to tell which images are new) and
the model's mean top-class probability on its validation images (the means are over all training
images when their features are cached, as in train_head, else over the sample). Embeddings are the model's own
pooled features (what its head sees), so one pass over new images gives both their embeddings and
the champion's confidence on them.

Statistic: the squared maximum mean discrepancy (MMD^2, unbiased, Gaussian kernel with the median
pairwise squared distance as bandwidth) between the reference sample and a sample of at most
`drift.sample_per_class` new images per class, with a permutation p-value (`drift.permutations`
relabellings, at least 2 x tests / significance). It is computed over all classes and per class; a
test fires when p < significance / number of tests (Bonferroni), so a same-distribution sample
fires with probability <= significance.
A drop of the champion's mean confidence by more than `drift.max_confidence_drop` also counts.
Labels in the new data that the champion does not know are reported as new classes.

Policy (`drift.policy`): `always` retrains whenever there are new images (the behaviour before this
check), `on_drift` only on drift or new classes, `alert` never retrains because of this check (it
only reports).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from components.core import array_rows, files, runtime
from components.core.config import Params
from components.core.contracts import Contract, ContractError
from components.core.evaluate_config import DriftConfig
from components.ingestion.images import ImageLimits

REFERENCE_FILE = "drift_reference.npz"
REFERENCE_META = ("run_id", "stage", "backbone", "alpha", "image_size", "data_version")  # of the model's run.json
MIN_SAMPLE = 5  # fewer images than this on either side: the test is skipped (no power)
MAX_SIDE = 1000  # the overall test draws at most this many per side: the kernel matrix stays under 32 MB


@dataclass(frozen=True)
class Reference:
    classes: list[str]
    features: np.ndarray  # (m, d) float32 sample of training embeddings
    labels: np.ndarray  # (m,) int class index of each sampled row
    means: np.ndarray  # (classes, d) mean embedding of every training image of each class
    known: np.ndarray  # sorted uint64: an 8-byte digest of each training image's sha256
    confidence: float  # the model's mean top-class probability on its validation images
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        with files.atomic_file(path, "wb") as fh:
            np.savez_compressed(
                fh,
                features=self.features.astype(np.float32),
                labels=self.labels.astype(np.int32),
                means=self.means.astype(np.float32),
                known=self.known,
                classes=np.array(self.classes, dtype=str),
                confidence=np.float64(self.confidence),
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        try:
            with np.load(path, allow_pickle=False) as data:  # never unpickle
                return cls(
                    data["classes"].tolist(),
                    data["features"],
                    data["labels"],
                    data["means"],
                    data["known"],
                    float(data["confidence"]),
                    json.loads(str(data["meta"])),
                )
        except FileNotFoundError:
            raise ContractError(f"{path} not found: the model folder has no drift reference (retrain it)") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ContractError(f"{path}: not a drift reference ({type(exc).__name__})") from None


def reference_meta(run_info: dict[str, Any]) -> dict[str, Any]:
    """What a reference records of the model it belongs to (shown in the drift report)."""
    return {key: run_info[key] for key in REFERENCE_META}


def sha_prefixes(sha256: list[str] | pd.Series) -> np.ndarray:
    """8-byte digests of the manifest's content hashes (any text: the column is not trusted to be hex)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(h).encode(), digest_size=8).digest(), "big") for h in sha256],
        dtype=np.uint64,
    )


def sample_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted row indices: at most `per_class` of each label, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=int)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, d) mean row of each class (zeros where a class has none), summed a chunk of rows at a time:
    `features` may be the feature cache's memory map, which is never read whole."""
    sums = np.zeros((num_classes, features.shape[1]))
    for start in range(0, len(features), array_rows.CHUNK_ROWS):
        block = array_rows.take(features, slice(start, start + array_rows.CHUNK_ROWS)).astype(np.float64)
        chunk_labels = labels[start : start + len(block)]
        sums += (chunk_labels[None, :] == np.arange(num_classes)[:, None]).astype(np.float64) @ block
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    return sums / np.maximum(counts, 1)[:, None]


def build_reference(
    features: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    sha256: list[str] | pd.Series,
    confidence: float,
    per_class: int,
    seed: int,
    meta: dict[str, Any] | None = None,
) -> Reference:
    """The compact reference of one model's training data (all `features` rows are training images)."""
    labels = np.asarray(labels, dtype=np.int32)
    means = class_means(features, labels, len(classes))
    rows = sample_per_class(labels, per_class, seed)
    return Reference(
        list(classes),
        array_rows.take(features, rows).astype(np.float32),
        labels[rows],
        means.astype(np.float32),
        np.unique(sha_prefixes(sha256)),
        float(confidence),
        dict(meta or {}),
    )


# --- the two-sample test ----------------------------------------------------------------------------


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """(MMD^2, permutation p-value) of samples x and y (rows are embeddings)."""
    z = np.vstack([x, y]).astype(np.float64)
    sq = np.sum(z * z, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    positive = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(positive[positive > 0])) if np.any(positive > 0) else 1.0
    kernel = np.exp(-d2 / bandwidth)
    np.fill_diagonal(kernel, 0.0)  # unbiased estimate: no self-similarity terms
    n, m = len(x), len(y)
    rng = np.random.default_rng(seed)
    first = np.zeros(n + m, dtype=bool)
    first[:n] = True
    # Column 0 is the observed split, the others relabellings; all statistics in one matrix product.
    a = np.stack([first] + [rng.permutation(first) for _ in range(permutations)], axis=1).astype(np.float64)
    b = 1.0 - a
    ka, kb = kernel @ a, kernel @ b
    stats = (a * ka).sum(0) / (n * (n - 1)) + (b * kb).sum(0) / (m * (m - 1)) - 2 * (a * kb).sum(0) / (n * m)
    observed = float(stats[0])
    return observed, float((1 + np.sum(stats[1:] >= observed)) / (1 + permutations))


def permutations_needed(config: DriftConfig, tests: int) -> int:
    """`drift.permutations`, raised where needed so the smallest p-value can pass the corrected level."""
    return max(config.permutations, int(np.ceil(2 * tests / config.significance)))


class DriftReport(Contract):
    """reports/drift.json: the tests, the champion's confidence and the policy's decision."""

    WRITER: ClassVar[str] = "drift"

    policy: str
    retrain: bool
    reason: str
    drifted: bool
    statistic: str = (
        "MMD^2 (unbiased, Gaussian kernel, median-distance bandwidth) between the reference sample and "
        "the new images' embeddings; permutation p-value; Bonferroni over the tests run"
    )
    significance: float
    corrected_significance: float | None = None
    new_images: int
    sampled_images: int
    new_classes: list[str] = Field(default_factory=list)
    overall: dict[str, Any] | None = None
    per_class: dict[str, dict[str, Any]] = Field(default_factory=dict)
    confidence: dict[str, Any] | None = None
    reference: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0


def compare(
    reference: Reference,
    features: np.ndarray,
    labels: list[str],
    probabilities: np.ndarray | None,
    config: DriftConfig,
    seed: int = 0,
    new_images: int | None = None,
) -> DriftReport:
    """Test the new images' embeddings (and the champion's probabilities on them) against the reference."""
    started = time.perf_counter()
    labels = list(labels)
    known = set(reference.classes)
    new_classes = sorted(set(labels) - known)
    rng = np.random.default_rng(seed)
    overall_x = reference.features[np.sort(rng.permutation(len(reference.features))[:MAX_SIDE])]
    overall_y = features[np.sort(rng.permutation(len(features))[:MAX_SIDE])]
    tests: dict[str, tuple[np.ndarray, np.ndarray]] = {"overall": (overall_x, overall_y)}
    for c, name in enumerate(reference.classes):
        tests[name] = (reference.features[reference.labels == c], features[[lab == name for lab in labels]])
    runnable = [k for k, (x, y) in tests.items() if len(x) >= MIN_SAMPLE and len(y) >= MIN_SAMPLE]
    corrected = config.significance / len(runnable) if runnable else None
    results: dict[str, dict[str, Any]] = {}
    for offset, (name, (x, y)) in enumerate(tests.items()):
        entry: dict[str, Any] = {"n_reference": len(x), "n_new": len(y)}
        if name in runnable:
            mmd2, p = mmd_test(x, y, permutations_needed(config, len(runnable)), seed + offset)
            entry.update(mmd2=round(mmd2, 6), p_value=round(p, 6), drift=bool(p < corrected))
        else:
            entry.update(mmd2=None, p_value=None, drift=False, skipped=f"fewer than {MIN_SAMPLE} images on a side")
        if name != "overall" and len(y):
            c = reference.classes.index(name)
            mean, ref = y.mean(0), reference.means[c]
            entry["mean_cosine_to_reference"] = round(
                float(mean @ ref / (np.linalg.norm(mean) * np.linalg.norm(ref) + 1e-12)), 4
            )
        results[name] = entry
    confidence = None
    if probabilities is not None and len(probabilities):
        mean_conf = float(np.mean(np.max(probabilities, axis=1)))
        drop = reference.confidence - mean_conf
        confidence = {
            "champion_mean_top_probability": round(mean_conf, 4),
            "reference_mean_top_probability": round(reference.confidence, 4),
            "drop": round(drop, 4),
            "drift": bool(drop > config.max_confidence_drop),
        }
    drifted = any(r["drift"] for r in results.values()) or bool(confidence and confidence["drift"])
    count = len(labels) if new_images is None else new_images
    retrain, reason = decide(config.policy, count, drifted, new_classes)
    return DriftReport(
        policy=config.policy,
        retrain=retrain,
        reason=reason,
        drifted=drifted,
        significance=config.significance,
        corrected_significance=corrected,
        new_images=count,
        sampled_images=len(labels),
        new_classes=new_classes,
        overall=results.pop("overall"),
        per_class=results,
        confidence=confidence,
        reference=reference.meta,
        seconds=round(time.perf_counter() - started, 2),
    )


def decide(policy: str, new_images: int, drifted: bool, new_classes: list[str]) -> tuple[bool, str]:
    """Whether to retrain, and why, under `drift.policy`."""
    if not new_images:
        return False, "no new images since the champion's training data"
    found = "drift" if drifted else "no drift"
    if new_classes:
        found += f", new classes {new_classes}"
    if policy == "always":
        return True, f"policy always: {new_images} new images ({found})"
    if policy == "alert":
        return False, f"policy alert: {found} reported, retraining is left to a person"
    if drifted or new_classes:
        return True, f"policy on_drift: {found}"
    return False, f"policy on_drift: {new_images} new images, {found}: the champion still fits"


# --- embeddings through a model ---------------------------------------------------------------------


def embed(
    model: Any, paths: list[str], image_size: int, batch_size: int, limits: ImageLimits
) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, class probabilities) of images through a project classifier, in one pass."""
    import keras

    from components.modeling.backbones import POOL_LAYER, plain_classifier
    from components.modeling.data import image_batches

    # One view, even for a flip-TTA model: the reference and every later check embed the same way.
    model = plain_classifier(model)
    both = keras.Model(model.inputs, [model.get_layer(POOL_LAYER).output, model.output])
    batches = image_batches(paths, image_size, batch_size, limits=limits)
    print(f"drift: embedding {len(paths)} images")
    features, probs = both.predict(batches, verbose=runtime.progress_verbosity())
    return np.asarray(features, np.float32), np.asarray(probs, np.float32)


def reference_from_model(
    model: Any, frame: pd.DataFrame, classes: list[str], params: Params, meta: dict[str, Any] | None = None
) -> Reference:
    """A reference for a model whose features are not cached (e.g. after finetune): a sample of its
    training images (and its validation images, for the confidence baseline) through the model."""
    per_class, limits = params.drift.reference_per_class, ImageLimits.from_config(params.validate)
    size, batch = params.model.image_size, params.train_head.batch_size
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    labels = train["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int32)
    rows = sample_per_class(labels, per_class, params.project.seed)
    features, _ = embed(model, train["path"].iloc[rows].tolist(), size, batch, limits)
    val = frame[frame["split"] == "val"]
    val = val.iloc[sample_per_class(val["label"].to_numpy(), per_class, params.project.seed)]
    _, val_probs = embed(model, val["path"].tolist(), size, batch, limits) if len(val) else (None, np.ones((1, 1)))
    return build_reference(
        features,
        labels[rows],
        classes,
        train["sha256"],
        float(val_probs.max(1).mean()),
        per_class,
        params.project.seed,
        meta,
    )
