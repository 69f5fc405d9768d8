"""Report pictures: matplotlib without a display, and a PNG written whole or not at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.core import files


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (stages and workers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """Lay the figure out, write it atomically (a reader never sees half a PNG) and free it."""
    fig.tight_layout()
    with files.atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    pyplot().close(fig)
    return Path(path)
