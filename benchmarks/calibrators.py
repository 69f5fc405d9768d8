"""Benchmark: which calibration map to fit on val, judged by cross-validation within val (test is never read).

    python -m benchmarks.calibrators [--rows flowers=benchmarks/work/flowers/workspace,...]

Reads the model each row's finetune saved (its kept weights and test-time augmentation views) and takes its val
probabilities with the folded temperature taken back out (softmax(T * log p) is the model before scaling). Each
map is fitted on one half of val and scored on the other, both ways, over many random halvings stratified by
class:
- `none`: the model as trained;
- `temperature`: one T, NLL-optimal on the fitting half (`finetune.calibrate: on`);
- `likelihood-ratio test`: that T only when the fitting half rejects T = 1 at 5% (`auto` until 2026-12-07);
- `temperature, auto`: the most probable T under the prior log T ~ Normal(0, 0.25^2) (`finetune.calibrate: auto`,
  the default: calibration.PRIOR_SD), and the same with a prior sd of 0.5 and 1, to show the choice of 0.25;
- `vector scaling` (Guo et al. 2017): a scale and a bias per class on the log-probabilities, NLL-optimal
  (2 x classes parameters against temperature's one). It can change the argmax, so its accuracy is scored too.

Every map is applied per view and the views' probabilities averaged, as the saved model does. Scores on the held
out half: NLL, ECE (10 bins, as evaluate reports) and accuracy, averaged over the halvings; and how often each map's
NLL is below the default's on the same half. The halvings overlap, so these are means, not independent samples.
Results: benchmarks/results/calibrators.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.levers import score, view_probabilities
from benchmarks.run import RESULTS
from benchmarks.workspace import REPO

SIZES_WORK = REPO / "benchmarks/work/sizes"
# make benchmark's flowers workspace (benchmarks/run.py): 386 val images, more than any sizes row. (Its hymenoptera
# workspace has the sizes row's split and val.)
BENCHMARK_WORK = {"flowers (make benchmark)": REPO / "benchmarks/work/flowers/workspace"}
HALVINGS = 50
N_BINS = 10

Calibrator = Callable[[np.ndarray], np.ndarray]  # (views, n, classes) raw logits -> (n, classes) probabilities


def vector_scaling_nll(params: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """NLL of the views' mean of softmax(w * z + b) and its gradient in (w, b) (`params` = w then b)."""
    from scipy.special import log_softmax

    classes = logits.shape[-1]
    w, b = params[:classes], params[classes:]
    log_p = log_softmax(logits * w + b, axis=-1)  # (views, n, classes)
    rows = np.arange(logits.shape[1])
    p_true = np.exp(log_p[:, rows, labels])  # (views, n)
    mean_true = p_true.mean(axis=0)
    onehot = np.eye(classes)[labels]
    # d(-log mean_v p_v[y]) / du_v = p_v[y] / (V * mean) * (p_v - onehot)
    d_u = (p_true / (len(logits) * mean_true))[..., None] * (np.exp(log_p) - onehot)
    n = len(labels)
    grad_w, grad_b = (d_u * logits).sum(axis=(0, 1)) / n, d_u.sum(axis=(0, 1)) / n
    return float(-np.log(np.clip(mean_true, 1e-300, None)).mean()), np.concatenate([grad_w, grad_b])


def fit_vector_scaling(logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Per-class scale and bias, NLL-optimal on these rows (L-BFGS from the identity map)."""
    from scipy.optimize import minimize

    classes = logits.shape[-1]
    start = np.concatenate([np.ones(classes), np.zeros(classes)])
    found = minimize(vector_scaling_nll, start, args=(logits, labels), jac=True, method="L-BFGS-B")
    w, b = found.x[:classes], found.x[classes:]
    from components.modeling.calibration import softmax

    return lambda z: softmax(z * w + b).mean(axis=0)


def fit_temperature_map(mode: str, prior_sd: float | None = None) -> Callable[[np.ndarray, np.ndarray], Calibrator]:
    """A temperature chosen as finetune's `calibrate: mode` does, or with another prior sd."""
    from components.modeling import calibration

    def fit(logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        if prior_sd is None:
            temperature = calibration.choose_temperature(logits, labels, mode).temperature
        else:
            temperature = calibration.fit_temperature(logits, labels, prior_sd=prior_sd)
        return lambda z: calibration.apply_temperature(z, temperature)

    return fit


def fit_likelihood_ratio_rule(logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    """The NLL-optimal T, applied only when the fitting rows reject T = 1 at LIKELIHOOD_RATIO_LEVEL."""
    from components.modeling import calibration

    fitted = calibration.fit_temperature(logits, labels)
    rejected = calibration.no_scaling_p_value(logits, labels, fitted) < LIKELIHOOD_RATIO_LEVEL
    temperature = fitted if rejected else 1.0
    return lambda z: calibration.apply_temperature(z, temperature)


LIKELIHOOD_RATIO_LEVEL = 0.05


def calibrators() -> dict[str, Callable[[np.ndarray, np.ndarray], Calibrator]]:
    return {
        "none": fit_temperature_map("off"),
        "temperature": fit_temperature_map("on"),
        "likelihood-ratio test": fit_likelihood_ratio_rule,
        "temperature, auto": fit_temperature_map("auto"),
        "prior sd 0.5": fit_temperature_map("auto", 0.5),
        "prior sd 1": fit_temperature_map("auto", 1.0),
        "vector scaling": fit_vector_scaling,
    }


DEFAULT = "temperature, auto"


def held_out_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NLL and accuracy as benchmarks.levers scores them, and ECE as evaluate reports it."""
    from components.modeling.metrics import top_label_ece

    found = score(probs, labels)
    return {
        "nll": found["log_loss"],
        "ece": top_label_ece(probs.max(axis=1), found["correct"], N_BINS),
        "accuracy": found["accuracy"],
    }


def stratified_halves(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask: half of each class's rows (the odd one out falls to either side at random)."""
    first = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        first[rows[: (len(rows) + rng.integers(0, 2)) // 2]] = True
    return first


def cross_validate(logits: np.ndarray, labels: np.ndarray, halvings: int = HALVINGS, seed: int = 0) -> dict[str, Any]:
    """Each map fitted on one half of val and scored on the other, both ways, over `halvings` random halvings."""
    rng = np.random.default_rng(seed)
    maps = calibrators()
    scores: dict[str, list[dict[str, float]]] = {name: [] for name in maps}
    for _ in range(halvings):
        first = stratified_halves(labels, rng)
        for fit_rows in (first, ~first):
            for name, fit in maps.items():
                calibrated = fit(logits[:, fit_rows], labels[fit_rows])
                scores[name].append(held_out_scores(calibrated(logits[:, ~fit_rows]), labels[~fit_rows]))
    default_nll = np.array([s["nll"] for s in scores[DEFAULT]])
    return {
        name: {
            **{key: round(float(np.mean([s[key] for s in found])), 4) for key in ("nll", "ece", "accuracy")},
            "nll_below_default": round(float(np.mean(np.array([s["nll"] for s in found]) < default_nll)), 3),
        }
        for name, found in scores.items()
    }


def raw_val_logits(workspace: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(views, n, classes) log-probabilities of the saved model's views with its temperature taken out, labels,
    and what finetune decided (run.json)."""
    views, labels = view_probabilities(workspace)
    info = json.loads((workspace / "models/finetune/run.json").read_text())
    kept = 4 if info.get("crop_tta") else 2 if info.get("flip_tta") else 1
    chosen = np.stack(list(views.values())[:kept])
    from components.modeling.calibration import logits_from_probabilities

    return info["temperature"] * logits_from_probabilities(chosen), labels, info


def write_report(rows: dict[str, Any], results: Path) -> None:
    (results / "calibrators.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Calibration maps, cross-validated within val",
        "",
        "x86_64, 2 CPU cores. `python -m benchmarks.calibrators`: each row's saved model (its views, temperature "
        f"taken out); each map fitted on half of val and scored on the other half, both ways, {HALVINGS} random "
        "halvings stratified by class. Means over the held-out halves; NLL below default: the share of halves "
        f"where the map's NLL is below `{DEFAULT}`'s (the pipeline's default). ECE: {N_BINS} bins, on half of "
        "val, so its own noise floor is high. Test is never read.",
        "",
        "| data | val images | kept (views, T applied) | map | NLL | ECE | accuracy | NLL below default |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for row, found in rows.items():
        for name, r in found["maps"].items():
            lines.append(
                f"| {row} | {found['val_images']} | {found['kept']} | {name} | {r['nll']:.4f} | {r['ece']:.4f} | "
                f"{r['accuracy']:.4f} | {r['nll_below_default']:.2f} |"
            )
    lines += ["", "Mean over the rows (each row weighs the same):", ""]
    lines += ["| map | NLL | ECE |", "|---|---:|---:|"]
    for name in next(iter(rows.values()))["maps"]:
        nll = np.mean([found["maps"][name]["nll"] for found in rows.values()])
        ece = np.mean([found["maps"][name]["ece"] for found in rows.values()])
        lines.append(f"| {name} | {nll:.4f} | {ece:.4f} |")
    lines += ["", "Lowest mean held-out NLL on each row:"]
    for row, found in rows.items():
        best = min(found["maps"], key=lambda name: found["maps"][name]["nll"])
        lines.append(f"- {row}: {best}" + (" (the default)" if best == DEFAULT else f", not the default `{DEFAULT}`"))
    (results / "calibrators.md").write_text("\n".join(lines) + "\n")


def _rows(text: str | None) -> dict[str, Path]:
    """name -> workspace: those given, or every sizes row and make benchmark workspace that holds a finetune model."""
    if not text:
        sizes = {path.parent.name: path for path in sorted(SIZES_WORK.glob("*/workspace"))}
        found = {**sizes, **BENCHMARK_WORK}
        return {name: path for name, path in found.items() if (path / "models/finetune/run.json").is_file()}
    return {name: Path(path) for name, _, path in (item.partition("=") for item in text.split(",") if item)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrators", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", default=None, help="name=workspace,... (default: every sizes row and make benchmark workspace)"
    )
    parser.add_argument("--halvings", type=int, default=HALVINGS, help="random stratified halvings of val")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for calibrators.json/.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    rows: dict[str, Any] = {}
    for name, workspace in _rows(args.rows).items():
        logits, labels, info = raw_val_logits(workspace)
        kept = f"{info['kept']}, {len(logits)} view{'s' * (len(logits) > 1)}, T {info['temperature']:.3f}"
        maps = cross_validate(logits, labels, args.halvings)
        rows[name] = {"val_images": len(labels), "kept": kept, "maps": maps}
        write_report(rows, args.results)
        print(f"{name}: {json.dumps(maps)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
