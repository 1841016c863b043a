"""Hugging Face ids as inputs: resolved in a local cache that the tests build in the cache's own layout (refs/,
snapshots/ of symlinks, blobs/ named by sha256), never the network; outputs equal to a run from local folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from nlsr_fast import cli
from nlsr_fast.io import CheckpointReader
from nlsr_fast.io.hub import cache_dir, resolve

from .conftest import World

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, branch: str = "main") -> Path:
    """Put the files of `src` in `cache` as huggingface_hub does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snap


@pytest.fixture()
def hub(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cache = tmp_path / "hf" / "hub"
    for name in ("base", "aligned", "finetuned"):
        cache_repo(cache, f"org/{name}", getattr(world, name))
    return cache


def test_resolve_rules(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir() == hub
    r = resolve("org/base", "base")
    assert r.path == hub / "models--org--base" / "snapshots" / COMMIT and r.path.is_dir()
    assert r.record() == {"id": "org/base", "revision": "main", "commit": COMMIT}
    assert resolve(f"org/base@{COMMIT}", "base").path == r.path
    with pytest.raises(ValueError, match=rf"base org/nothing: not a local folder, and not in the Hugging Face cache "
                                         rf"{hub}$"):
        resolve("org/nothing", "base")
    with pytest.raises(ValueError, match=r"aligned org/aligned@v2: revision 'v2' is not in the Hugging Face cache "):
        resolve("org/aligned@v2", "aligned")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "base").mkdir(parents=True)  # a local folder of the same spelling wins
    assert resolve("org/base", "base").path == Path("org/base") and resolve("org/base", "base").record() == {}
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_a_sharded_checkpoint_reads_from_the_cache(hub: Path, world: World) -> None:
    snap = resolve("org/base", "base").path
    assert (snap / "model.safetensors.index.json").is_symlink()
    with CheckpointReader(snap, streamed=True) as cached, CheckpointReader(world.base, streamed=True) as local:
        assert cached.keys() == local.keys()
        for k in cached.keys():
            assert cached.get(k).equal(local.get(k))


def test_a_shard_linked_outside_the_repository_is_refused(hub: Path, world: World) -> None:
    snap = resolve("org/base", "base").path
    shard = sorted(p for p in snap.iterdir() if p.name.endswith(".safetensors"))[0]
    shard.unlink()
    shard.symlink_to(world.base / shard.name)  # out of the cache, not into blobs/
    with pytest.raises(ValueError, match=r"resolves to .*, outside the folder"):
        CheckpointReader(snap, streamed=True)


def test_realign_from_ids_equals_realign_from_folders(hub: Path, world: World, tmp_path: Path) -> None:
    common = ["--calibration", str(world.calibration), "--method", "wanda", "--nsamples", "8", "--quiet"]
    local, from_hub = tmp_path / "local", tmp_path / "hub-out"
    assert cli.main(["realign", str(world.base), str(world.aligned), str(world.finetuned), str(local), *common]) == 0
    assert cli.main(["realign", "org/base", "org/aligned@main", f"org/finetuned@{COMMIT}", str(from_hub),
                     *common]) == 0
    for name in ("adapter_model.safetensors", "masks.safetensors"):
        assert (local / name).read_bytes() == (from_hub / name).read_bytes()
    inputs = json.loads((from_hub / "report.json").read_text())["inputs"]
    assert inputs["base"]["hub"] == {"id": "org/base", "revision": "main", "commit": COMMIT}
    assert inputs["finetuned"]["hub"]["revision"] == COMMIT
    assert "hub" not in json.loads((local / "report.json").read_text())["inputs"]["base"]
    assert cli.main(["verify", str(from_hub), "--base", "org/base", "--aligned", "org/aligned",
                     "--finetuned", "org/finetuned"]) == 0  # verify takes the ids too
    sha = {Path(f["path"]).name: f["sha256"] for f in inputs["finetuned"]["files"]}
    assert sha["adapter_model.safetensors"] == hashlib.sha256(
        (world.finetuned / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_a_missing_id_is_exit_2_with_one_line(hub: Path, world: World, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["realign", "org/base", "org/missing", "org/finetuned", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nlsr-fast realign: error: aligned org/missing: not a local folder, and not in the Hugging Face "
                   f"cache {hub}"]
    assert not (tmp_path / "out").exists()


def test_files_stored_under_their_sha256_are_not_hashed_again(hub: Path, world: World, tmp_path: Path) -> None:
    snap = resolve("org/finetuned", "finetuned").path
    link = snap / "adapter_model.safetensors"
    named = link.resolve().with_name("f" * 64)  # a blob name that is not the content's sha256: only a lookup finds it
    link.resolve().rename(named)
    link.unlink()
    link.symlink_to(os.path.relpath(named, link.parent))
    out = tmp_path / "out"
    assert cli.main(["realign", "org/base", "org/aligned", "org/finetuned", str(out), "--quiet", "--calibration",
                     str(world.calibration), "--method", "wanda", "--nsamples", "8"]) == 0
    files = json.loads((out / "report.json").read_text())["inputs"]["finetuned"]["files"]
    sha = {Path(f["path"]).name: f["sha256"] for f in files}
    assert sha["adapter_model.safetensors"] == "f" * 64  # the blob's name, not a second read of the file
    config = (world.finetuned / "adapter_config.json").read_bytes()  # stored under a sha256 name too: the real one
    assert sha["adapter_config.json"] == hashlib.sha256(config).hexdigest()
