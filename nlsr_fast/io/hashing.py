"""Streamed file hashes for the report's record of inputs."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

__all__ = ["BackgroundHasher", "sha256_file", "file_record"]


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


class BackgroundHasher:
    """sha256 of input files in a background thread, started as a run starts reading them.

    The thread reads each file once, sequentially, which also brings it into the page cache just ahead of the
    executor's reads of the same bytes: the inputs are hashed while they are read, not in a second pass.
    `records()` waits for the thread and returns the report's file records.
    """

    def __init__(self, paths: list[Path], chunk: int = 4 * 2**20) -> None:
        import threading

        self.paths = list(dict.fromkeys(Path(p) for p in paths))
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._chunk = chunk
        self._thread = threading.Thread(target=self._run, name="nlsr-fast-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for p in self.paths:
                self._digests[p] = sha256_file(p, self._chunk)
        except BaseException as exc:  # noqa: BLE001 - re-raised by records()
            self._error = exc

    def records(self) -> dict[Path, dict[str, Any]]:
        """{path: {"path", "size", "sha256"}} of every file, once all are hashed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {p: {"path": str(p), "size": p.stat().st_size, "sha256": self._digests[p]} for p in self.paths}
