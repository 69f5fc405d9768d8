"""Progress in logs: plain lines at every tenth of a pass, no ANSI bar where no terminal is attached."""

from __future__ import annotations

import pandas as pd

from components.core.progress import progress
from components.ingestion.images import ImageLimits
from components.quality import perceptual_hashes
from tests.conftest import write_image


def test_a_pass_prints_ten_plain_lines_in_a_log(capsys):
    assert list(progress(range(200), 200, "validate: hashes")) == list(range(200))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0].startswith("validate: hashes: 20/200 images")
    assert lines[-1].startswith("validate: hashes: 200/200 images") and not any("\x1b[" in x for x in lines)


def test_short_passes_print_each_step_once(capsys):
    list(progress(range(3), 3, "label issues: folds", "fold"))
    assert [x.split(" (")[0] for x in capsys.readouterr().out.splitlines()] == [
        "label issues: folds: 1/3 folds",
        "label issues: folds: 2/3 folds",
        "label issues: folds: 3/3 folds",
    ]


def test_validates_hash_pass_shows_progress(tmp_path, capsys):
    paths = [write_image(tmp_path / f"{i}.png", seed=i, fmt="PNG") for i in range(4)]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "sha256": [f"{i:064x}" for i in range(4)]})
    perceptual_hashes.fingerprints(frame, ImageLimits(10_000_000, 10_000_000, ("PNG",)))
    assert "validate: perceptual hashes: 4/4 images" in capsys.readouterr().out
