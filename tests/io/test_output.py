"""atomic_output and file hashes (the writers: test_writer.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nlsr_fast.io.output as output_mod
from nlsr_fast.io import atomic_output, file_record, sha256_file
from nlsr_fast.io.manifest import check_manifest
from nlsr_fast.io.output import check_output


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"input data")
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_output_success(tmp_path: Path, inp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def tracking_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(output_mod.os, "fsync", tracking_fsync)
    out = tmp_path / "out"
    with atomic_output(out, inputs=[inp]) as partial:
        assert partial == Path(f"{out}.partial") and partial.is_dir() and not any(partial.iterdir())
        assert not out.exists()
        (partial / "a.txt").write_text("hello")
        (partial / "sub").mkdir()
        (partial / "sub" / "b.txt").write_text("world")
    assert not partial.exists()
    assert (out / "a.txt").read_text() == "hello" and (out / "sub" / "b.txt").read_text() == "world"
    # Every file and folder of the partial tree was fsynced before the rename, then the parent.
    assert {str(partial / "a.txt"), str(partial / "sub" / "b.txt"), str(partial), str(partial / "sub")} <= set(synced)
    assert str(tmp_path) in synced
    assert _snapshot(inp) == {"weights.bin": b"input data"}


def test_atomic_output_exception_cleans_up(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(out, inputs=[inp]) as partial:
            (partial / "half.safetensors").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_atomic_output_keyboard_interrupt_cleans_up(tmp_path: Path, inp: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="nlsr_fast.io"), pytest.raises(KeyboardInterrupt):
        with atomic_output(out, inputs=[inp]) as partial:
            (partial / "x").write_text("x")
            raise KeyboardInterrupt
    assert not out.exists() and not Path(f"{out}.partial").exists() and not Path(f"{out}.lock").exists()
    # Ctrl-C is not an error to log: the CLI prints its one "interrupted" line (issue 8: Ctrl-C was noisy).
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("removing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("where", ["same", "inside", "deep_inside", "contains", "input_file_parent"])
def test_atomic_output_refuses_inputs(tmp_path: Path, inp: Path, where: str) -> None:
    out = {
        "same": inp,
        "inside": inp / "out",
        "deep_inside": inp / "a" / "b",
        "contains": tmp_path,
        "input_file_parent": inp,
    }[where]
    inputs = [inp / "weights.bin"] if where == "input_file_parent" else [inp]
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="refusing") as e:
        with atomic_output(out, inputs=inputs, overwrite=True):
            pytest.fail("body must not run")
    assert str(inputs[0]) in str(e.value)
    assert _snapshot(tmp_path) == before and not Path(f"{out}.partial").exists()


def test_atomic_output_refuses_through_symlink(tmp_path: Path, inp: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(inp)
    with pytest.raises(ValueError, match="lies inside the input"):
        with atomic_output(link / "out", inputs=[inp]):
            pytest.fail("body must not run")
    with pytest.raises(ValueError, match="is the input"):
        with atomic_output(tmp_path / "o", inputs=[tmp_path / "o.partial"]):
            pytest.fail("body must not run")
    assert not (inp / "out.partial").exists()


def _manifest_files(folder: Path) -> dict[str, bytes]:
    snap = _snapshot(folder)
    assert "manifest.json" in snap, f"{folder} has no manifest"
    del snap["manifest.json"]
    return snap


def test_atomic_output_overwrite(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    with atomic_output(out, inputs=[inp]) as partial:
        (partial / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        with atomic_output(out, inputs=[inp]):
            pytest.fail("body must not run")
    assert _manifest_files(out) == {"old.txt": b"old"} and not Path(f"{out}.partial").exists()
    # A failed overwrite keeps the old output.
    with pytest.raises(RuntimeError):
        with atomic_output(out, inputs=[inp], overwrite=True) as partial:
            (partial / "new.txt").write_text("new")
            raise RuntimeError("dies")
    assert _manifest_files(out) == {"old.txt": b"old"}
    with atomic_output(out, inputs=[inp], overwrite=True) as partial:
        (partial / "new.txt").write_text("new")
        assert (out / "old.txt").exists()
    assert _manifest_files(out) == {"new.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "out"]
    assert check_manifest(out) == []


def test_overwrite_refuses_a_folder_that_is_not_an_output(tmp_path: Path, inp: Path) -> None:
    """issue 8: --overwrite deleted whatever folder OUT named, with no check that it is a previous output."""
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    for target in (out, tmp_path / "notes.txt"):
        if target.name == "notes.txt":
            target.write_text("mine")
        before = _snapshot(tmp_path)
        with pytest.raises(ValueError, match=r"not an nlsr_fast output.*force=True \(--force\)") as e:
            with atomic_output(target, inputs=[inp], overwrite=True):
                pytest.fail("body must not run")
        assert str(target) in str(e.value)
        with pytest.raises(ValueError, match="not an nlsr_fast output"):
            check_output(target, inputs=[inp], overwrite=True)
        assert _snapshot(tmp_path) == before
    # A manifest that is not nlsr_fast's does not count either.
    (out / "manifest.json").write_text(json.dumps({"format": "something-else", "files": []}))
    with pytest.raises(ValueError, match="not an nlsr_fast output"):
        check_output(out, inputs=[inp], overwrite=True)
    # force replaces it.
    with atomic_output(out, inputs=[inp], overwrite=True, force=True) as partial:
        (partial / "adapter").write_text("new")
    assert _manifest_files(out) == {"adapter": b"new"}


def test_existing_partial_is_not_deleted_without_overwrite(tmp_path: Path, inp: Path) -> None:
    """issue 8: an existing OUT.partial was deleted even without --overwrite."""
    out = tmp_path / "out"
    stale = Path(f"{out}.partial")
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    with pytest.raises(ValueError, match="out.partial exists") as e:
        with atomic_output(out, inputs=[inp]):
            pytest.fail("body must not run")
    assert str(stale) in str(e.value) and "overwrite" in str(e.value)
    with pytest.raises(ValueError, match="out.partial exists"):
        check_output(out, inputs=[inp])
    assert _snapshot(stale) == {"model-00001-of-00002.safetensors": b"stale"}
    # overwrite replaces it.
    with atomic_output(out, inputs=[inp], overwrite=True) as partial:
        assert partial == stale and not any(partial.iterdir())
        (partial / "fresh").write_text("1")
    assert _manifest_files(out) == {"fresh": b"1"}


def test_partial_of_a_live_run_is_never_deleted(tmp_path: Path, inp: Path) -> None:
    """issue 8: the second run deleted the first one's live out.partial as "stale"."""
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from nlsr_fast.io.output import atomic_output\n"
        f"with atomic_output({str(out)!r}, inputs=[{str(inp)!r}]) as p:\n"
        "    (p / 'live').write_text('x')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=rf"locked by pid {proc.pid} on host .* since .*out\.lock") as e:
                with atomic_output(out, inputs=[inp], overwrite=overwrite, force=True):
                    pytest.fail("body must not run")
            assert "--wait" in str(e.value)
            with pytest.raises(ValueError, match="locked by"):
                check_output(out, inputs=[inp], overwrite=overwrite)
            assert (Path(f"{out}.partial") / "live").read_text() == "x"
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait() == 0
    assert _manifest_files(out) == {"live": b"x"}
    assert not Path(f"{out}.lock").exists()


def test_replaced_leftover_that_is_not_an_output_is_kept(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    old = Path(f"{out}.replaced")
    old.mkdir()
    (old / "data").write_text("mine")
    with pytest.raises(ValueError, match="out.replaced exists and is not an nlsr_fast output"):
        with atomic_output(out, inputs=[inp]):
            pytest.fail("body must not run")
    assert _snapshot(old) == {"data": b"mine"}


def test_unwritable_parent_is_found_up_front(tmp_path: Path, inp: Path) -> None:
    """issue 8: an unwritable OUT parent was found only after the whole computation."""
    if os.geteuid() == 0:
        # root may write anywhere: simulate the refusal the kernel would give a normal user.
        real_access = os.access

        def access(path: object, mode: int, **kw: object) -> bool:
            if Path(str(path)) == tmp_path / "ro":
                return False
            return real_access(path, mode, **kw)  # type: ignore[arg-type]

        patch = pytest.MonkeyPatch()
        patch.setattr(output_mod.os, "access", access)
    else:
        patch = None
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "out", ro / "deeper" / "out"):
            with pytest.raises(ValueError, match=rf"folder {ro} is not writable") as e:
                check_output(out, inputs=[inp])
            assert str(out) in str(e.value)
        with pytest.raises(ValueError, match="is not a folder"):
            check_output(inp / "weights.bin" / "out", inputs=[])
    finally:
        ro.chmod(0o755)
        if patch is not None:
            patch.undo()


def test_manifest_is_written_last_and_checked(tmp_path: Path, inp: Path) -> None:
    out = tmp_path / "out"
    with atomic_output(out, inputs=[inp]) as partial:
        (partial / "b.bin").write_bytes(b"\x00" * 10)
        (partial / "sub").mkdir()
        (partial / "sub" / "a.txt").write_text("a")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "nlsr_fast-output/1" and manifest["nlsr_fast"]
    assert [f["path"] for f in manifest["files"]] == ["b.bin", "sub/a.txt"]
    assert manifest["files"][0] == {"path": "b.bin", "size": 10, "sha256": hashlib.sha256(b"\x00" * 10).hexdigest()}
    assert (out / "manifest.json").read_text() == json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    assert check_manifest(out) == []
    (out / "b.bin").write_bytes(b"\x01" * 10)
    (out / "sub" / "a.txt").write_text("longer")
    (out / "extra").write_text("e")
    problems = check_manifest(out)
    assert any("b.bin: sha256" in p for p in problems)
    assert any("a.txt: size 6 bytes, the manifest says 1" in p for p in problems)
    assert any("extra: not listed" in p for p in problems)
    (out / "sub" / "a.txt").unlink()
    assert any("a.txt: listed in the manifest but missing" in p for p in check_manifest(out))
    # Paths that would escape the folder are reported, never read.
    manifest["files"].append({"path": "../input/weights.bin", "size": 10, "sha256": "0"})
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert any("bad path '../input/weights.bin'" in p for p in check_manifest(out))
    (out / "manifest.json").unlink()
    assert check_manifest(out) == [f"{out / 'manifest.json'}: no manifest (not an nlsr_fast output, or written "
                                    "before manifests)"]


def test_sha256_and_record(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    data = os.urandom(100_003)
    p.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == expected
    assert sha256_file(p, chunk=7) == expected
    assert file_record(p) == {"path": str(p), "size": 100_003, "sha256": expected}
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValueError, match="chunk must be positive"):
        sha256_file(p, chunk=0)


def test_check_output_with_wait_defers_to_the_lock(tmp_path: Path, inp: Path) -> None:
    """check_output(wait=True) up front must not fail on the holder's live OUT.partial; the caller re-checks once it
    holds the lock."""
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from nlsr_fast.io.output import atomic_output\n"
        f"with atomic_output({str(out)!r}, inputs=[{str(inp)!r}]) as p:\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        check_output(out, inputs=[inp], wait=True)
        with pytest.raises(ValueError, match="locked by"):
            check_output(out, inputs=[inp])
        with pytest.raises(ValueError, match="lies inside the input"):
            check_output(inp / "o", inputs=[inp], wait=True)  # the other checks still run
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        assert proc.wait() == 0
    with pytest.raises(ValueError, match="already exists"):
        check_output(out, inputs=[inp], wait=True)
