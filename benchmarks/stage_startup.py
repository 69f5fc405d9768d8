"""Start-up of each stage's process: seconds to import it, and whether TensorFlow comes with it.

    .venv/bin/python -m benchmarks.stage_startup [--rounds 5]

A small run spends much of its time starting stage processes (issue 23). Each round starts a fresh
interpreter per stage, as `dvc repro` does, and times `import components.<stage>` alone (the interpreter's
own start is measured once and subtracted). Rounds interleave the stages so that load from other
processes falls on all of them alike; the median round is reported with the best. Writes
benchmarks/results/stage_startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from components.core import files

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("ingest", "validate", "augment", "train_head", "finetune", "evaluate")
# What a stage pays on top when its run needs them (train_head, finetune and evaluate import these lazily,
# inside the run; the data stages never do: tests/unit/test_runtime.py).
LIBRARIES = ("tensorflow", "keras", "mlflow", "albumentations", "great_expectations")
PROBE = (
    "import sys, time; t = time.perf_counter(); import components.{stage}; "
    "print(time.perf_counter() - t, 'tensorflow' in sys.modules, 'keras' in sys.modules, 'mlflow' in sys.modules)"
)


def import_once(stage: str) -> dict[str, float | bool]:
    """One fresh interpreter importing one stage module: seconds, and which heavy libraries came with it."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(stage=stage)], capture_output=True, text=True, check=True
    ).stdout.split()
    seconds, tensorflow, keras, mlflow = out[-4:]
    return {
        "seconds": float(seconds),
        "tensorflow": tensorflow == "True",
        "keras": keras == "True",
        "mlflow": mlflow == "True",
    }


def library_seconds(library: str) -> float:
    """One fresh interpreter importing one library (after components, which sets the telemetry switches)."""
    probe = f"import time, components; t = time.perf_counter(); import {library}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    return float(out[-1])


def measure_libraries(rounds: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {library: [] for library in LIBRARIES}
    for _ in range(rounds):
        for library in LIBRARIES:
            samples[library].append(library_seconds(library))
    return {library: round(statistics.median(runs), 2) for library, runs in samples.items()}


def measure(rounds: int) -> dict[str, dict[str, float | bool]]:
    samples: dict[str, list[dict]] = {stage: [] for stage in STAGES}
    for _ in range(rounds):
        for stage in STAGES:
            samples[stage].append(import_once(stage))
    return {
        stage: {
            "median_s": round(statistics.median(s["seconds"] for s in runs), 2),
            "best_s": round(min(s["seconds"] for s in runs), 2),
            **{lib: runs[-1][lib] for lib in ("tensorflow", "keras", "mlflow")},
        }
        for stage, runs in samples.items()
    }


def table(result: dict[str, dict]) -> str:
    lines = [
        "# Stage start-up: `import components.<stage>` in a fresh interpreter",
        "",
        f"{result['rounds']} rounds, load average {result['load_before']} before, {result['load_after']} after.",
        "",
        "| stage | median s | best s | imports TensorFlow | Keras | MLflow |",
        "|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        row = result["stages"][stage]
        yes = {True: "yes", False: "no"}
        lines.append(
            f"| {stage} | {row['median_s']} | {row['best_s']} | {yes[row['tensorflow']]} | {yes[row['keras']]} "
            f"| {yes[row['mlflow']]} |"
        )
    lines += [
        "",
        "What the run itself adds where it needs them (median seconds to import, in a fresh interpreter):",
        "",
        "| library | median s |",
        "|---|---|",
        *(f"| {library} | {seconds} |" for library, seconds in result["libraries"].items()),
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage_startup", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="fresh interpreters per stage")
    parser.add_argument("--out", type=Path, default=RESULTS / "stage_startup", help="results, without suffix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    stages = measure(args.rounds)
    libraries = measure_libraries(args.rounds)
    result = {
        "libraries": libraries,
        "rounds": args.rounds,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "stages": stages,
    }
    with files.atomic_file(args.out.with_suffix(".json")) as out:
        json.dump(result, out, indent=2)
    with files.atomic_file(args.out.with_suffix(".md")) as out:
        out.write(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
