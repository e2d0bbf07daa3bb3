"""Helpers shared by the SDK test files (importable: pytest puts this
directory on sys.path, where conftest.py is)."""

from __future__ import annotations


def read_until(handle, needle: str) -> str:
    """Reads a background command's stdout events until `needle` has come
    (or the command ended); returns what was read. The same event stream
    goes on in a later `handle.wait()`."""
    seen = ""
    for out, _, _ in handle:
        seen += out or ""
        if needle in seen:
            break
    return seen
