"""Hugging Face model ids (`org/name`, `org/name@revision`) found in the local cache. Nothing is downloaded.

The cache is the one transformers and huggingface_hub use: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`. A model `org/name` lives in `models--org--name/`: `refs/<branch>` holds a commit hash,
`snapshots/<commit>/` the files, each a symlink into the repository's `blobs/` (named by the file's sha256 for large
files). A local path always wins over an id of the same spelling.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HUB_ID", "Resolved", "cache_dir", "resolve", "snapshot_blobs", "blob_digest"]

#: org/name with an optional @revision (a branch, a tag or a commit hash)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:@[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Resolved:
    """Where an input is, and, for a Hub id, which repository, revision and commit it came from."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def record(self) -> dict[str, Any]:
        """{"id", "revision", "commit"} for report.json; {} for a local path."""
        if self.repo_id is None:
            return {}
        return {"id": self.repo_id, "revision": self.revision, "commit": self.commit}


def cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(spec: str | os.PathLike[str], role: str) -> Resolved:
    """`spec` as a local path when it exists or cannot be an id; else the cached snapshot of the id. ValueError naming
    `role`, the id and the cache folder when the id or its revision is not in the cache."""
    path = Path(spec)
    text = os.fspath(spec)
    if path.exists() or not HUB_ID.match(text):
        return Resolved(path)
    repo_id, _, revision = text.partition("@")
    revision = revision or "main"
    cache = cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise ValueError(f"{role} {text}: not a local folder, and not in the Hugging Face cache {cache}")
    commit: str | None = revision if _COMMIT.match(revision) else None
    ref = repo / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    if commit is None or not _COMMIT.match(commit) or not (repo / "snapshots" / commit).is_dir():
        raise ValueError(f"{role} {text}: revision {revision!r} is not in the Hugging Face cache {repo}")
    return Resolved(repo / "snapshots" / commit, repo_id, revision, commit)


def snapshot_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the cached repository when `folder` is one of its snapshots (files there are symlinks
    into it), else None."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent / "blobs"
    return None


def blob_digest(path: Path) -> str | None:
    """The sha256 of a file of a cache snapshot, from the name of the blob it links to (huggingface_hub names the
    blobs of large files by their sha256, checked when it downloaded them); None for any other file, which is then
    hashed as usual."""
    real = path.resolve()
    if real.parent.name == "blobs" and real.parent.parent.name.startswith("models--") and _SHA256.match(real.name):
        return real.name
    return None
