"""Every ingested file's facts as columns: about 70 bytes a file instead of a dict of Python objects (issue 24).

Ingest holds the facts of every file until the manifest is written; at a million files a dict per file
(~600 B with its strings) was most of the stage's memory. Here each file is a row of fixed-size arrays;
its strings (format, mode, error reason, note) are codes into one `Vocabulary`, which holds each
distinct string once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SHA256_BYTES = 32


class Vocabulary:
    """Distinct strings, each stored once; code 0 is ''."""

    def __init__(self) -> None:
        self.values: list[str] = [""]
        self._codes: dict[str, int] = {"": 0}

    def code(self, value: str) -> int:
        found = self._codes.get(value)
        if found is None:
            found = self._codes[value] = len(self.values)
            self.values.append(value)
        return found

    def __getitem__(self, code: int) -> str:
        return self.values[code]

    def __len__(self) -> int:
        return len(self.values)


class FactsTable:
    """sha256, size, upright size, format, mode, error and note of `n` files, by position in the listing.

    A row holds what `file_facts.inspect_file` returns; `known` is false where nothing was read (a missing file).
    """

    def __init__(self, n: int) -> None:
        self.known = np.zeros(n, bool)
        self.sha256 = np.zeros((n, SHA256_BYTES), np.uint8)
        self.bytes = np.zeros(n, np.int64)
        self.width = np.zeros(n, np.int64)
        self.height = np.zeros(n, np.int64)
        self.words = Vocabulary()
        self.format = np.zeros(n, np.uint32)
        self.mode = np.zeros(n, np.uint32)
        self.error = np.zeros(n, np.uint32)
        self.note = np.zeros(n, np.uint32)

    def __len__(self) -> int:
        return len(self.known)

    def put(self, i: int, facts: dict[str, Any]) -> None:
        """Store one file's facts (an `inspect_file` dict)."""
        self.known[i] = True
        self.sha256[i] = np.frombuffer(bytes.fromhex(facts["sha256"]), np.uint8)
        self.bytes[i], self.width[i], self.height[i] = facts["bytes"], facts["width"], facts["height"]
        words = self.words
        self.format[i], self.mode[i] = words.code(facts["format"]), words.code(facts["mode"])
        self.error[i], self.note[i] = words.code(facts["error"]), words.code(facts.get("note", ""))

    def get(self, i: int) -> dict[str, Any]:
        """One file's facts as `inspect_file` returned them."""
        words = self.words
        facts = {
            "sha256": self.sha_hex(i),
            "bytes": int(self.bytes[i]),
            "format": words[self.format[i]],
            "mode": words[self.mode[i]],
            "width": int(self.width[i]),
            "height": int(self.height[i]),
            "error": words[self.error[i]],
        }
        if self.note[i]:
            facts["note"] = words[self.note[i]]
        return facts

    def sha_hex(self, i: int) -> str:
        """The file's sha256 as hex; '' when it was not read."""
        return self.sha256[i].tobytes().hex() if self.known[i] else ""

    def usable(self) -> np.ndarray:
        """Files read without an error (hidden files aside: the listing knows those)."""
        return self.known & (self.error == 0)
