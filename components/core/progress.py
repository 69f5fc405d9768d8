"""Progress that reads well where it lands: a tqdm bar on a terminal, plain lines in logs.

DVC, Prefect workers and CI capture output: an ANSI bar there is one unreadable line or nothing at
all (tqdm switches itself off without a terminal). In a log, a pass over many items prints a line at
every tenth of the way and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
LOG_STEPS = 10


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int, desc: str, unit: str = "image") -> Iterator[T]:
    """Yield `items`, showing how far along the pass is (`total` of them)."""
    if on_terminal():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    started, next_mark, done = time.monotonic(), 1, 0
    for item in items:
        yield item
        done += 1
        if total and done * LOG_STEPS >= next_mark * total:
            elapsed = time.monotonic() - started
            print(f"{desc}: {done}/{total} {unit}s ({elapsed:.0f} s)", flush=True)
            next_mark = done * LOG_STEPS // total + 1
