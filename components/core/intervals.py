"""95% intervals of accuracies measured on few images: how much a choice made on val can be trusted.

`wilson`: the score interval of one accuracy (k of n right); unlike the normal approximation it stays
inside [0, 1] and keeps a width at k = 0 or k = n. `paired_difference`: the interval of acc(b) - acc(a)
measured on the same images, from the discordant pairs (images one gets right and the other wrong), a Wald
interval with Agresti & Min's (2005) half an image added to each of the four cells, so that a tie on few
images still gets a width. Two accuracies' own intervals overlap far more than their paired difference
does: the paired interval is the one that says whether a choice was more than noise.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of an accuracy of `correct` out of `n` (n = 0: nothing known, [0, 1])."""
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n], got {correct} of {n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """Interval of accuracy(b) - accuracy(a) on the same images (`correct_*`: one bool per image)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"expected two flat arrays of one shape, got {a.shape} and {b.shape}")
    only_b, only_a = float(np.sum(b & ~a)) + 0.5, float(np.sum(a & ~b)) + 0.5
    total = a.size + 2.0  # the four cells' +1/2
    difference = (only_b - only_a) / total
    variance = ((only_b + only_a) - (only_b - only_a) ** 2 / total) / total**2
    half = z * math.sqrt(max(variance, 0.0))
    return max(-1.0, difference - half), min(1.0, difference + half)


def rounded(interval: tuple[float, float], digits: int = 4) -> list[float]:
    """An interval as JSON holds it."""
    return [round(interval[0], digits), round(interval[1], digits)]
