"""The package's error family: the CLI (and any caller) tells refused input from a bug by type.

`SimSkipError` is the root. `InputError` (a ValueError) and `InputTypeError` (a TypeError) are raised for
input the package refuses: vectors, ids, files, records, settings; their message names the problem.
The specific kinds below subclass them, so `except ValueError` keeps working for callers that used it.
Anything else that escapes the package (a RuntimeError, an IndexError) is a bug to report.
"""
from __future__ import annotations

import re
from typing import Any

MAX_LISTED = 10  # bad rows named in one error message
# FAISS's C++ exceptions start "Error in <signature> at <file>:<line>: "; what follows is the reason
FAISS_WHERE = re.compile(r"Error in .+? at \S+:\d+: ")


class SimSkipError(Exception):
    """Root of every error this package raises on purpose."""


class InputError(SimSkipError, ValueError):
    """Refused input: the message says what is wrong and nothing stored was changed."""


class InputTypeError(SimSkipError, TypeError):
    """Refused input of the wrong type (a string where an array was expected, say)."""


class RefinerMismatchError(InputError):
    """A store's vectors were made by another refiner (or with another metric): a Milvus collection, or a
    framework store saved through the integrations. Vectors from two refiners are not comparable."""


class BadRowsError(InputError):
    """Rows that cannot be refined; `rows` holds (id, problem) pairs, the message names the first ones."""

    def __init__(self, rows: list[tuple[Any, str]], total: int | None = None, what: str = "input"):
        self.rows = list(rows)
        self.total = len(self.rows) if total is None else int(total)
        listed = "; ".join(f"id {i!r}: {p}" for i, p in self.rows[:MAX_LISTED])
        more = f" (and {self.total - min(len(self.rows), MAX_LISTED)} more)" if self.total > MAX_LISTED else ""
        super().__init__(f"{what} has {self.total} bad row(s), nothing was written: {listed}{more}")


def faiss_reason(e: BaseException, last: bool = True) -> str:
    """The reason line of a FAISS error (its last line, or its first), without FAISS's C++ location."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return FAISS_WHERE.sub("", lines[-1 if last else 0].strip()) if lines else type(e).__name__
