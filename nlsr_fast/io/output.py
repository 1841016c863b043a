"""Outputs that are never half-written: an atomic output folder and a size-capped safetensors shard writer."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_output", "check_output", "fsync_tree"]

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems cannot fsync a directory; the rename is still atomic.
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (and `root` itself)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with p.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _check_disjoint(target: Path, inputs: list[Path], what: str) -> None:
    t = target.resolve()
    for inp in inputs:
        i = inp.resolve()
        if t == i:
            raise ValueError(f"{what} {target} is the input {inp}; refusing to write over an input")
        if t.is_relative_to(i):
            raise ValueError(f"{what} {target} lies inside the input {inp}; refusing to write into an input")
        if i.is_relative_to(t):
            raise ValueError(f"{what} {target} contains the input {inp}; refusing to replace a folder holding an input")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def _check_writable(out: Path) -> None:
    """The nearest existing folder above `out` must be a folder this process may create entries in."""
    parent = _nearest_existing(out.absolute().parent)
    if not parent.is_dir():
        raise ValueError(f"output {out}: {parent} is not a folder, so the output cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"output {out}: folder {parent} is not writable (permission denied)")


def check_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]],
    overwrite: bool = False,
    force: bool = False,
    wait: bool = False,
    resumable: Callable[[Path], bool] | None = None,
) -> None:
    """The checks `atomic_output` runs before writing, for callers that validate before any work.

    `out` (and its `.partial` / `.replaced` / `.lock` siblings) may not equal, lie inside, or contain an input; the
    nearest existing folder above `out` must be writable; no other run may hold `out`'s lock; an existing
    `<out>.partial` (left by a run that did not finish) is replaced only with `overwrite`; an existing `out` is
    replaced only with `overwrite`, and only when it carries nlsr_fast's manifest (an earlier output) unless
    `force`.

    With `wait`, a lock held by another run is not an error: the checks that depend on that run (the partial
    folder, an existing `out`) are skipped, and the caller repeats `check_output` once it holds the lock.
    With `resumable`, a leftover `<out>.partial` for which `resumable(partial)` is true is the same run's unfinished
    work, to be resumed (see nlsr_fast.resume), not an error.
    """
    from nlsr_fast.io.lock import lock_holder, lock_path
    from nlsr_fast.io.manifest import MANIFEST_FILE, is_output

    out = Path(out)
    input_paths = [Path(p) for p in inputs]
    partial, old = Path(f"{out}.partial"), Path(f"{out}.replaced")
    for target, what in ((out, "output"), (partial, "temporary output"), (old, "temporary output"),
                         (lock_path(out), "lock file")):
        _check_disjoint(target, input_paths, what)
    _check_writable(out)
    holder = lock_holder(out)
    if holder is not None and wait:
        log.info("output %s is locked by pid %s; its other checks wait for the lock", out, holder.get("pid", "?"))
        return
    if holder is not None:
        raise ValueError(f"output {out} is locked by pid {holder.get('pid', '?')} on host "
                         f"{holder.get('host', '?')} since {holder.get('started', '?')} (lock file {lock_path(out)}); "
                         "wait for it, or pass --wait")
    if (partial.exists() or partial.is_symlink()) and not overwrite and not (resumable and resumable(partial)):
        raise ValueError(f"temporary output {partial} exists, left by a run that did not finish with other inputs or "
                         "options (a run with the same ones resumes it); remove it, or pass overwrite=True "
                         "(--overwrite) to replace it")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ValueError(f"output {out} already exists; pass overwrite=True to replace it")
        if not force and not is_output(out):
            raise ValueError(f"output {out} exists but is not an nlsr_fast output (no valid {MANIFEST_FILE} written by "
                             "nlsr_fast), so overwrite=True will not replace it; remove it yourself, or pass "
                             "force=True (--force)")
    if (old.exists() or old.is_symlink()) and not force and not is_output(old):
        raise ValueError(f"{old} exists and is not an nlsr_fast output; remove it yourself, or pass force=True "
                         "(--force)")


@contextmanager
def atomic_output(
    out: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]],
    overwrite: bool = False,
    force: bool = False,
    manifest: bool = True,
    resumable: Callable[[Path], bool] | None = None,
    known_digests: Mapping[str, str] | None = None,
) -> Iterator[Path]:
    """Yield a fresh `<out>.partial` folder to write into; on success write the manifest, fsync, rename to `out`.

    The whole write holds `out`'s lock (`OutputLock`, re-entrant: a caller that holds it already, as realign does
    for the whole run, nests). On an exception the partial folder is removed and the exception re-raised, so
    nothing that looks complete is left. Nothing is written before the checks of `check_output` pass.

    Args:
        out: the final output folder.
        inputs: files or folders read by the run; `out` may not equal, lie inside, or contain any of them.
        overwrite: replace an existing `out` (only after the new one is complete) and a leftover `<out>.partial`.
        force: with `overwrite`, replace `out` even when it is not an nlsr_fast output (no manifest).
        manifest: write `manifest.json` (sha256 of every file) last, just before the rename.
        resumable: a leftover `<out>.partial` for which this is true is yielded as it is, to be resumed.
        known_digests: {relative path: sha256} of files the caller hashed as it wrote them, filled in by the time
            the block ends (the manifest does not read them again).

    Yields:
        Path(f"{out}.partial"), an empty folder.
    """
    from nlsr_fast.io.lock import OutputLock
    from nlsr_fast.io.manifest import is_output, write_manifest

    out = Path(out)
    input_paths = [Path(p) for p in inputs]
    partial = Path(f"{out}.partial")
    old = Path(f"{out}.replaced")
    with OutputLock(out, inputs=input_paths):
        check_output(out, inputs=input_paths, overwrite=overwrite, force=force, resumable=resumable)
        if (partial.exists() or partial.is_symlink()) and not overwrite and resumable and resumable(partial):
            log.info("resuming the unfinished run in %s", partial)
        else:
            if partial.exists() or partial.is_symlink():
                log.warning("removing %s left by an earlier run that did not finish (overwrite=True)", partial)
                _remove(partial)
            partial.mkdir(parents=True)
        try:
            yield partial
            if manifest:
                write_manifest(partial, known_digests)
            fsync_tree(partial)
            if out.exists() or out.is_symlink():
                if not overwrite:
                    raise ValueError(f"output {out} appeared while writing; pass overwrite=True to replace it")
                if not force and not is_output(out):
                    raise ValueError(f"output {out} appeared while writing and is not an nlsr_fast output; "
                                     "refusing to replace it without force=True (--force)")
                _remove(old)
                os.replace(out, old)
            os.replace(partial, out)
            _fsync_dir(out.parent.resolve())
        except BaseException as exc:
            # An interrupt or a refused input is not an error to log again (the CLI prints one line for it); other
            # failures are.
            level = logging.INFO if isinstance(exc, (KeyboardInterrupt, ValueError)) else logging.ERROR
            log.log(level, "output %s not written; removing %s", out, partial)
            _remove(partial)
            raise
        if old.exists() or old.is_symlink():
            _remove(old)
    log.info("wrote %s", out)
