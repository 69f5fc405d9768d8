"""benchmarks/sizes.py's arithmetic and report: intervals, the issue's checks, sizes.md and sizes.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.core.intervals import rounded, wilson

METHODS = ("pipeline", "careful", "probe")
BASELINES = ("careful", "probe")
ROW_ORDER = ("flowers-20", "flowers-50", "flowers-100", "flowers-200", "flowers-all", "hymenoptera")


def method_summary(result: dict[str, Any], n_test: int) -> dict[str, Any]:
    """A method's final test accuracy with its 95% Wilson interval, its best at any epoch, its seconds."""
    accuracy = float(result["test_accuracy_final"])
    return {
        "final": round(accuracy, 4),
        "interval": rounded(wilson(round(accuracy * n_test), n_test)),
        "best_any_epoch": round(float(result["best_test_accuracy"]), 4),
        "seconds": result["total_seconds"],
    }


def judge(methods: dict[str, dict[str, Any]], n_test: int) -> dict[str, Any]:
    """The issue's "done when" columns: the pipeline's final against each baseline's final, and against
    the 95% interval of the best test accuracy any baseline reached at any epoch."""
    final = methods["pipeline"]["final"]
    best_name = max(BASELINES, key=lambda n: methods[n]["best_any_epoch"])
    best = methods[best_name]["best_any_epoch"]
    low, high = wilson(round(best * n_test), n_test)
    return {
        "pipeline_ge_careful": final >= methods["careful"]["final"],
        "pipeline_ge_probe": final >= methods["probe"]["final"],
        "best_baseline": {"method": best_name, "accuracy": best, "interval": rounded((low, high))},
        "pipeline_within_best_baseline_interval": final >= round(low, 4),
    }


def _ordered(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    known = [rows[n] for n in ROW_ORDER if n in rows]
    return known + [r for n, r in sorted(rows.items()) if n not in ROW_ORDER]


def _acc(m: dict[str, Any]) -> str:
    return f"{m['final']:.3f} [{m['interval'][0]:.3f}, {m['interval'][1]:.3f}]"


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def to_markdown(result: dict[str, Any]) -> str:
    rows = _ordered(result["rows"])
    lines = [
        "# Benchmark: accuracy against data size",
        "",
        f"{result.get('machine', '')}. `make benchmark-sizes` (benchmarks/sizes.py). flower_photos at k images per "
        "class from one training pool, against one fixed test split (the images the content hash puts in test); "
        "hymenoptera_data: train/ to train, val/ as test. The pipeline's defaults (params.yaml); careful: the Keras "
        "guide's recipe (benchmarks/run.py); probe: logistic regression on the frozen backbone's pooled features, "
        "C chosen on val. All three read the pipeline's validated manifest (train/val/test below: ingest carves val "
        "from train and tops it up to `ingest.min_val_per_class`). The subsets take the pool in the hash order that "
        "ingest also carves val by, so their val comes almost all from the top-up: 30 images per class, at most "
        "30% of a class's; for the whole set ingest's carve gives about 1% of the pool, not 11%.",
        "",
        "Final: test accuracy of the model each method ends with, with its 95% Wilson interval. Best: the best "
        "test accuracy at any epoch (probe: at any C): chosen on test, a ceiling. Seconds: pipeline ingest to "
        "registered model; careful and probe: training only. Load: the 1-minute load average before and after "
        "the row (2 cores).",
        "",
        *(
            [f"Run with these settings over params.yaml: `{'`, `'.join(result['settings'])}`.", ""]
            if result.get("settings")
            else []
        ),
        "![accuracy against images per class](sizes.png)",
        "",
        "| data | train/val/test | pipeline | careful | probe | best any epoch p/c/probe | seconds p/c/probe "
        "| load | p >= careful | p >= probe | p within best baseline's interval |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, c, counts = r["methods"], r["checks"], r["counts"]
        best = c["best_baseline"]
        lines.append(
            f"| {r['name']} | {counts['train']}/{counts['val']}/{counts['test']} | "
            + " | ".join(_acc(m[n]) for n in METHODS)
            + " | "
            + "/".join(f"{m[n]['best_any_epoch']:.3f}" for n in METHODS)
            + " | "
            + "/".join(f"{m[n]['seconds']:.0f}" for n in METHODS)
            + f" | {r['load_average_before'][0]:.1f}/{r['load_average_after'][0]:.1f} | "
            f"{_yes(c['pipeline_ge_careful'])} | {_yes(c['pipeline_ge_probe'])} | "
            f"{_yes(c['pipeline_within_best_baseline_interval'])} ({best['method']} {best['accuracy']:.3f}, "
            f"from {best['interval'][0]:.3f}) |"
        )
    reused = [
        f"{r['name']} (from {r['details']['careful_reused_from']})"
        for r in rows
        if r.get("details", {}).get("careful_reused_from")
    ]
    if reused:
        lines += [
            "",
            "Careful baseline reused from an earlier run of the row, not rerun (`--reuse-careful`: the probe scored "
            f"every C exactly as then, so the split is the same): {', '.join(reused)}.",
        ]
    lines += choice_lines(rows)
    missing = [n for n in ROW_ORDER if n not in result["rows"]]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)} (`python -m benchmarks.sizes --sizes ...`)."]
    return "\n".join(lines) + "\n"


def choice_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The pipeline's val decision and test calibration per row (rows run before these were recorded: -)."""

    def num(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}"

    def temperature(choice: dict[str, Any]) -> str:
        if choice.get("temperature_fitted") is None:
            return num(choice.get("temperature"))
        fitted, p_value = choice["temperature_fitted"], choice["temperature_p_value"]
        return f"{choice['temperature']:.3f} (fitted {fitted:.3f}, p {p_value:.2g})"

    def ece(choice: dict[str, Any]) -> str:
        low_high = choice.get("test_ece_interval")
        return num(choice.get("test_ece")) + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "")

    lines = [
        "",
        "The pipeline's choice on val (head: the head train_head kept, Adam by default (`train_head.solver`); "
        "rows run before the linear head existed (Adam): -; fine-tuned weights only when they beat the head there "
        "beyond noise; the "
        "temperature applied, the NLL-optimal one on val and the likelihood-ratio p-value against T = 1: "
        "`finetune.calibrate: auto` applied the fit only below p 0.05 until 2026-12-07, and since then the most "
        "probable T under a prior centred on T = 1) and its test ECE (10 bins, 95% bootstrap interval). "
        "Floor: the mean ECE a perfectly "
        "calibrated model with the same confidences shows on as many test images, the estimator's own noise.",
        "",
        "| data | head | kept | val accuracy head | val accuracy fine-tuned | temperature | test ECE | floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    heads = {"adam": "Adam", "lbfgs": "linear"}
    for r in rows:
        choice = r.get("details", {}).get("pipeline_choice", {})
        lines.append(
            f"| {r['name']} | {heads.get(choice.get('head_solver'), '-')} | {choice.get('kept') or '-'} | "
            f"{num(choice.get('val_accuracy_head'))} | "
            f"{num(choice.get('val_accuracy_finetuned'))} | {temperature(choice)} | {ece(choice)} | "
            f"{num(choice.get('test_ece_calibrated_floor'))} |"
        )
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Final test accuracy against images per class (log x), a line per method with interval bars;
    hymenoptera in its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _ordered(result["rows"])
    flowers = sorted((r for r in rows if r.get("data") == "flowers"), key=lambda r: r["images_per_class_given"])
    others = [r for r in rows if r.get("data") != "flowers"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    for i, name in enumerate(METHODS):
        spread = 1 + 0.03 * (i - 1)  # nudge the methods apart so their bars do not hide each other
        if flowers:
            x = [r["images_per_class_given"] * spread for r in flowers]
            y = [r["methods"][name]["final"] for r in flowers]
            err = [
                [v - r["methods"][name]["interval"][0] for v, r in zip(y, flowers, strict=True)],
                [r["methods"][name]["interval"][1] - v for v, r in zip(y, flowers, strict=True)],
            ]
            left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
        for j, r in enumerate(others):
            m = r["methods"][name]
            right.errorbar(
                [j + 0.15 * (i - 1)],
                [m["final"]],
                yerr=[[m["final"] - m["interval"][0]], [m["interval"][1] - m["final"]]],
                marker="s",
                capsize=3,
                color=f"C{i}",
                linestyle="none",
            )
    left.set(xscale="log", xlabel="flower_photos: training images per class given", ylabel="final test accuracy")
    if flowers:  # ticks at the sizes run, not at powers of ten
        given = [r["images_per_class_given"] for r in flowers]
        left.set_xticks(given, [f"{g:g}" for g in given])
        left.minorticks_off()
    left.set_title("flower_photos (5 classes)")
    left.grid(alpha=0.3, which="both")
    left.legend(loc="lower right")
    right.set_xticks(range(len(others)), [r["name"] for r in others])
    right.set_xlim(-0.6, max(len(others), 1) - 0.4)
    right.set_title("other data sets")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], results: Path) -> None:
    (results / "sizes.md").write_text(to_markdown(result))
    plot(result, results / "sizes.png")
