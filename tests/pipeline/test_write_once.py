"""Pass 2 writes every output file once, front to back, and hashes it as it writes (docs/architecture.md, "The two
passes"): the planned
writer's digest against hashlib, the manifest taking it without reading the file again, the stash of restore values
between the passes, and the output of a realign written exactly once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import nlsr_fast
from nlsr_fast.executor import FileStash, MemoryStash
from nlsr_fast.io import manifest as manifest_mod
from nlsr_fast.io import stream
from nlsr_fast.io.stream import PlannedSafetensors

from .conftest import World


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plan(n: int = 5) -> tuple[list, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 7, generator=g).to(torch.bfloat16) for i in range(n)}
    tensors["empty"] = torch.zeros(0, 4)
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()], tensors


def test_planned_file_written_in_order_is_hashed_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "_HASH_BACKLOG", 2 * stream._HASH_UNIT)  # the writer waits for the hasher
    plan, tensors = _plan()
    f = PlannedSafetensors(tmp_path / "a.safetensors", plan)
    for k, t in tensors.items():
        f.write(k, t)
    f.close()
    assert f.digest == _sha(tmp_path / "a.safetensors")


@pytest.mark.parametrize("order", ["reversed", "twice", "missing"])
def test_planned_file_not_written_front_to_back_has_no_digest(tmp_path: Path, order: str) -> None:
    plan, tensors = _plan()
    f = PlannedSafetensors(tmp_path / "a.safetensors", plan)
    items = list(tensors.items())
    if order == "reversed":
        items = items[::-1]
    elif order == "twice":
        items = items + items[:1]
    else:
        items = items[:-2] + items[-1:]
    for k, t in items:
        f.write(k, t)
    f.close()
    assert f.digest is None


def test_manifest_takes_known_digests_and_hashes_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 100)
    (tmp_path / "b.bin").write_bytes(b"b" * 100)
    hashed: list[str] = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    built = manifest_mod.build_manifest(tmp_path, {"a.bin": "0" * 64})
    assert hashed == ["b.bin"]
    assert {f["path"]: f["sha256"] for f in built["files"]} == {"a.bin": "0" * 64, "b.bin": _sha(tmp_path / "b.bin")}


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_stash_round_trip_keeps_bits_and_dtype(tmp_path: Path, kind: str) -> None:
    stash = MemoryStash() if kind == "memory" else FileStash(tmp_path / "s.bin")
    values = [torch.randn(17).to(torch.bfloat16), torch.randn(0), torch.tensor([float("nan"), -0.0, 1.5])]
    records = [stash.put(v) for v in values]
    json.dumps(records)  # the journal keeps them
    for v, rec in zip(values, records, strict=True):
        got = stash.get(rec)
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.contiguous().view(torch.uint8))
    stash.close()


def test_file_stash_reopened_appends_after_what_is_there(tmp_path: Path) -> None:
    first = FileStash(tmp_path / "s.bin")
    rec = first.put(torch.arange(10, dtype=torch.float32))
    first.close()
    (tmp_path / "s.bin").open("ab").write(b"garbage of a killed run")
    again = FileStash(tmp_path / "s.bin")
    rec2 = again.put(torch.arange(5, dtype=torch.float16))
    assert torch.equal(again.get(rec), torch.arange(10, dtype=torch.float32))
    assert torch.equal(again.get(rec2), torch.arange(5, dtype=torch.float16))
    assert rec2[0] == 40 + len(b"garbage of a killed run")


def test_realign_writes_each_output_byte_once_and_hashes_it_as_written(world: World, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter and masks files are written once each (bytes pwritten == their data sections) and the manifest
    does not read them again; its digests equal hashlib's."""
    written: dict[str, int] = {}
    real_write = PlannedSafetensors.write

    def counting(self: PlannedSafetensors, name: str, tensor: torch.Tensor) -> None:
        written[self.path.name] = written.get(self.path.name, 0) + tensor.numel() * tensor.element_size()
        real_write(self, name, tensor)

    monkeypatch.setattr(PlannedSafetensors, "write", counting)
    hashed: list[str] = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    out = tmp_path / "out"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="random", quiet=True)
    assert rep.counts["restored"] > 0
    for name in ("adapter_model.safetensors", "masks.safetensors"):
        path = out / name
        data_offset = stream.data_offset(path)
        assert written[name] == path.stat().st_size - data_offset, name
        assert name not in hashed
    listed = {f["path"]: f["sha256"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert all(listed[p.name] == _sha(p) for p in out.iterdir() if p.name != "manifest.json")
