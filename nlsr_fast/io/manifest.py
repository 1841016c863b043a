"""The output manifest: `manifest.json`, the sha256 and size of every file of an output folder, written last.

It marks a folder as an nlsr_fast output (so `overwrite` may replace it) and lets `nlsr-fast verify` check that
nothing was changed, lost or added since it was written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

from nlsr_fast.io.hashing import sha256_file

__all__ = ["MANIFEST_FILE", "MANIFEST_FORMAT", "build_manifest", "check_manifest", "is_output", "read_manifest",
           "write_manifest"]

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "nlsr_fast-output/1"


def _files(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under `folder` except the manifest itself, sorted (symlinks included,
    as entries to be reported by the checker)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        here = Path(dirpath)
        for name in filenames:
            rel = (here / name).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
        for name in dirnames:
            if (here / name).is_symlink():
                out.append((here / name).relative_to(folder).as_posix())
    return sorted(out)


def build_manifest(folder: str | os.PathLike[str], known: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest of `folder` as a dict: {"format", "nlsr_fast", "files": [{"path", "size", "sha256"}]}.

    `known`: {relative path: sha256} of files hashed as they were written (io.stream.PlannedSafetensors.digest);
    they are not read again. Every other file is hashed here.
    """
    import nlsr_fast

    root = Path(folder)
    rels = _files(root)
    for rel in rels:
        if (root / rel).is_symlink():
            raise ValueError(f"output {root}: {rel} is a symbolic link; an output holds plain files only")
    # Files are hashed in parallel (hashlib releases the GIL on large blocks): a dense output has many shards.
    workers = max(1, min(8, len(rels), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda rel: (known or {}).get(rel) or sha256_file(root / rel), rels))
    files = [{"path": rel, "size": (root / rel).stat().st_size, "sha256": digest}
             for rel, digest in zip(rels, digests, strict=True)]
    return {"format": MANIFEST_FORMAT, "nlsr_fast": nlsr_fast.__version__, "files": files}


def write_manifest(folder: str | os.PathLike[str], known: Mapping[str, str] | None = None) -> Path:
    """Write `folder/manifest.json` (the sha256 and size of every other file, sorted, JSON with sorted keys).

    Write it last: any file written after it is reported by `check_manifest` as not listed. `known` as in
    `build_manifest`.
    """
    root = Path(folder)
    text = json.dumps(build_manifest(root, known), indent=1, sort_keys=True) + "\n"
    path = root / MANIFEST_FILE
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    log.info("wrote %s (%d files)", path, text.count('"sha256"'))
    return path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of `folder`; ValueError naming the file when it is missing or not an nlsr_fast
    manifest."""
    path = Path(folder) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest (not an nlsr_fast output, or written before manifests)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not an nlsr_fast manifest (format {got!r}, expected {MANIFEST_FORMAT!r})")
    if not isinstance(data.get("files"), list):
        raise ValueError(f"{path}: manifest has no list of files")
    return data


def is_output(folder: str | os.PathLike[str]) -> bool:
    """True when `folder` is a folder carrying an nlsr_fast manifest (its contents are not re-hashed)."""
    root = Path(folder)
    if not root.is_dir():
        return False
    try:
        read_manifest(root)
    except ValueError:
        return False
    return True


def _safe_rel(rel: Any) -> str | None:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    p = PurePosixPath(rel)
    if p.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return None
    return rel


def check_manifest(folder: str | os.PathLike[str]) -> list[str]:
    """Problems found comparing `folder` with its manifest (empty when every file matches): a missing or bad
    manifest, a listed file missing or with another size or sha256, a file not listed. Never reads outside
    `folder`."""
    root = Path(folder)
    if not root.is_dir():
        return [f"{root}: not a folder"]
    try:
        data = read_manifest(root)
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    listed: set[str] = set()
    to_hash: list[tuple[Path, Any]] = []
    for i, entry in enumerate(data["files"]):
        if not isinstance(entry, dict):
            problems.append(f"{root / MANIFEST_FILE}: entry {i} is not an object")
            continue
        rel = _safe_rel(entry.get("path"))
        if rel is None:
            problems.append(f"{root / MANIFEST_FILE}: entry {i} has a bad path {entry.get('path')!r}")
            continue
        if rel in listed:
            problems.append(f"{root / MANIFEST_FILE}: {rel} is listed twice")
            continue
        listed.add(rel)
        p = root / rel
        if p.is_symlink():
            problems.append(f"{p}: is a symbolic link, not the file the manifest lists")
            continue
        if not p.is_file():
            problems.append(f"{p}: listed in the manifest but missing")
            continue
        size = p.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{p}: size {size} bytes, the manifest says {entry.get('size')}")
            continue
        to_hash.append((p, entry.get("sha256")))
    workers = max(1, min(8, len(to_hash), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = list(pool.map(lambda item: sha256_file(item[0]), to_hash))
    for (p, want), digest in zip(to_hash, digests, strict=True):
        if digest != want:
            problems.append(f"{p}: sha256 {digest} differs from the manifest's {want}")
    for rel in _files(root):
        if rel not in listed:
            problems.append(f"{root / rel}: not listed in the manifest (added after it was written)")
    return problems
