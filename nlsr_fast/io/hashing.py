"""Streamed file hashes for the report's record of inputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["sha256_file", "file_record"]


def sha256_file(path: str | os.PathLike[str], chunk: int = 16 * 2**20) -> str:
    """Hex sha256 of a file, read in `chunk`-byte pieces (constant memory).

    Args:
        path: the file.
        chunk: bytes per read.
    """
    if chunk <= 0:
        raise ValueError(f"sha256_file: chunk must be positive, got {chunk}")
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """{"path", "size", "sha256"} of a file, for the report."""
    p = Path(path)
    return {"path": str(p), "size": p.stat().st_size, "sha256": sha256_file(p)}
