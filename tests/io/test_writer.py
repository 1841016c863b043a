"""The one safetensors writer (io.stream.PlannedSafetensors) and what builds on it: size-capped shards
(io.writer.PlannedShards), whole files from memory (write_safetensors) and mask files (ops.save_masks, MasksFile).
Byte layouts are checked against an independent encoding of the safetensors format and against the safetensors
library's reader."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nlsr_fast.io import CheckpointReader, PlannedShards, write_safetensors
from nlsr_fast.ops import PackedMask, load_masks, save_masks
from nlsr_fast.pipeline.write import MasksFile

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8"}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ts = {f"model.layers.{i}.w": torch.randn(16, 16, generator=gen) for i in range(6)}  # 1024 bytes each
    ts["model.norm.weight"] = torch.randn(16, generator=gen).to(torch.bfloat16)  # 32 bytes
    ts["big"] = torch.randn(40, 16, generator=gen)  # 2560 bytes, over the cap
    ts["scalar"] = torch.tensor(3, dtype=torch.int64)
    return ts


def _plan(ts: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(k, t.dtype, tuple(t.shape)) for k, t in ts.items()]


def _expected_file(ts: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding written out by hand: 8-byte little-endian header length, compact JSON header
    (metadata first, tensors in order, data offsets relative to the data section), spaces to an 8-byte boundary,
    then the raw little-endian bytes of each tensor."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for k, t in ts.items():
        n = t.numel() * t.element_size()
        header[k] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    data = b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in ts.values())
    return struct.pack("<Q", len(blob)) + blob + data


def test_write_safetensors_bytes_are_the_format(tmp_path: Path) -> None:
    ts = _tensors()
    ts["strided"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    n = write_safetensors(tmp_path / "f.safetensors", ts, {"k": "v"})
    got = (tmp_path / "f.safetensors").read_bytes()
    assert got == _expected_file(ts, {"k": "v"}) and n == len(got)
    back = load_file(os.fspath(tmp_path / "f.safetensors"))
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in ts.items())
    with pytest.raises(TypeError, match="'x' is a list"):
        write_safetensors(tmp_path / "g.safetensors", {"x": [1, 2]})  # type: ignore[dict-item]


def test_planned_shards_cap_names_and_index(tmp_path: Path) -> None:
    ts = _tensors()
    cap = 2100
    shards = PlannedShards(tmp_path, _plan(ts), max_shard_bytes=cap, metadata={"k": "v"})
    for k in reversed(list(ts)):  # any order
        shards.write(k, ts[k])
    shards.finish()
    files = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    # Greedy packing in plan order: two matrices per shard (the norm joins the third), big alone, then the scalar.
    groups: dict[str, list[str]] = {}
    for k, f in index["weight_map"].items():
        groups.setdefault(f, []).append(k)
    sizes = [sum(ts[k].numel() * ts[k].element_size() for k in groups[f.name]) for f in files]
    assert sizes == [2048, 2048, 2080, 2560, 8]
    for f in files:  # each shard is the format's encoding of its tensors in plan order
        names = [k for k in ts if index["weight_map"][k] == f.name]
        assert f.read_bytes() == _expected_file({k: ts[k] for k in names}, {"k": "v"})
    with CheckpointReader(tmp_path) as r:
        assert set(r.keys()) == set(ts) and all(torch.equal(r.get(k), t) for k, t in ts.items())


def test_planned_shards_single_shard_has_no_index(tmp_path: Path) -> None:
    ts = _tensors()
    shards = PlannedShards(tmp_path, _plan(ts), max_shard_bytes=5 * 2**30)
    for k, t in ts.items():
        shards.write(k, t)
    shards.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == _expected_file(ts, {})


def test_planned_shards_checkpoint_loads_in_transformers(tiny_base: Path, tmp_path: Path) -> None:
    """A checkpoint rewritten through the reader and the shards loads in transformers with identical weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path / "copy"
    out.mkdir()
    shutil.copy(tiny_base / "config.json", out / "config.json")
    with CheckpointReader(tiny_base) as r:
        shards = PlannedShards(out, [(k, r.dtype(k), r.shape(k)) for k in r.keys()], max_shard_bytes=30_000)
        for k, t in r.iter_tensors():
            shards.write(k, t)
        shards.finish()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    a = AutoModelForCausalLM.from_pretrained(os.fspath(tiny_base), dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(os.fspath(out), dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_planned_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_shard_bytes must be positive, got 0"):
        PlannedShards(tmp_path, [("a", torch.float32, (4,))], max_shard_bytes=0)
    with pytest.raises(ValueError, match=r"tensors \['a'\] appear twice"):
        PlannedShards(tmp_path, [("a", torch.float32, (4,)), ("a", torch.float32, (4,))], max_shard_bytes=64)
    shards = PlannedShards(tmp_path, [("a", torch.float32, (4,))], max_shard_bytes=64)
    with pytest.raises(KeyError, match="'b' is not in the plan"):
        shards.write("b", torch.zeros(4))
    with pytest.raises(ValueError, match=r"'a' is torch.float64 \[4\], the plan says F32 \[4\]"):
        shards.write("a", torch.zeros(4, dtype=torch.float64))
    shards.close()


def _masks() -> dict[str, PackedMask]:
    gen = torch.Generator().manual_seed(1)
    shapes = {"m.lora_B": (37, 8), "m.lora_A": (8, 301), "n": (1, 1), "empty": (0, 5)}
    return {k: PackedMask.from_bool(torch.rand(s, generator=gen) < 0.3) for k, s in shapes.items()}


def test_masks_file_and_save_masks_write_the_same_bytes(tmp_path: Path) -> None:
    masks = _masks()
    save_masks(tmp_path / "saved.safetensors", masks)
    planned = MasksFile(tmp_path / "planned.safetensors", {k: m.shape for k, m in masks.items()})
    for k in ["n", "m.lora_A", "empty", "m.lora_B"]:  # another order than the file's
        planned.write(k, masks[k])
    planned.close()
    saved = (tmp_path / "saved.safetensors").read_bytes()
    assert saved == (tmp_path / "planned.safetensors").read_bytes()
    shapes = json.dumps({k: list(masks[k].shape) for k in sorted(masks)}, sort_keys=True)
    assert saved == _expected_file({k: masks[k].bits for k in sorted(masks)}, {"nlsr_fast.packed_mask.shapes": shapes})
    back = load_masks(tmp_path / "saved.safetensors")
    assert set(back) == set(masks) and all(back[k].equal(m) for k, m in masks.items())


def test_masks_saved_over_the_file_they_were_loaded_from(tmp_path: Path) -> None:
    """load_masks returns private copies: saving them back to the same path writes the same masks, not the zeros of
    a file truncated under a mapping."""
    masks = _masks()
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    first = path.read_bytes()
    save_masks(path, load_masks(path))
    assert path.read_bytes() == first
