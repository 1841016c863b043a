"""CheckpointReader: equality with safetensors and HF, one shard open at a time, headers only, refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nlsr_fast.io.checkpoint as checkpoint_mod
from nlsr_fast.io import CheckpointReader


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_multi_shard_equals_load_file_of_each_shard(tiny_base: Path) -> None:
    shards = sorted(tiny_base.glob("model-*.safetensors"))
    assert len(shards) >= 3
    with CheckpointReader(tiny_base) as r:
        assert r.index_file == tiny_base / "model.safetensors.index.json"
        assert sorted(r.files) == shards
        seen = set()
        for shard in shards:
            ref = load_file(os.fspath(shard))
            for key, t in ref.items():
                assert r.file_of(key) == shard
                got = r.get(key)
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(got, t), key
                seen.add(key)
        assert seen == set(r.keys()) == set(_index(tiny_base)["weight_map"])
        assert r.bytes_read == r.nbytes
        assert r.nbytes == _index(tiny_base)["metadata"]["total_size"]


def test_equals_hf_state_dict(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(os.fspath(tiny_base), dtype=torch.float32).state_dict()
    with CheckpointReader(tiny_base) as r:
        assert set(r.keys()) == set(sd)
        got = r.get_many(sorted(sd))
        assert list(got) == sorted(sd)
        for key, t in sd.items():
            assert torch.equal(got[key], t), key
        assert r.bytes_read == r.nbytes == sum(t.numel() * t.element_size() for t in sd.values())
    assert r.config["num_hidden_layers"] == 2 and r.config["hidden_size"] == 32


def test_one_shard_open_at_a_time(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live: set[int] = set()
    peak = [0]
    opened: list[str] = []
    real = checkpoint_mod.safe_open

    class Tracking:
        def __init__(self, path: str, framework: str, device: str = "cpu") -> None:
            self._h = real(path, framework=framework, device=device)
            live.add(id(self))
            opened.append(Path(path).name)
            peak[0] = max(peak[0], len(live))

        def get_tensor(self, key: str) -> torch.Tensor:
            return self._h.get_tensor(key)

        def __exit__(self, *exc: object) -> None:
            live.discard(id(self))
            self._h.__exit__(*exc)

    monkeypatch.setattr(checkpoint_mod, "safe_open", Tracking)
    with CheckpointReader(tiny_base) as r:
        keys = r.keys()
        # Interleave shards on purpose: every switch must close the previous shard.
        for key in keys + keys[::-1]:
            r.get(key)
            assert r.open_file == r.file_of(key)
            assert len(live) == 1
        n_switch = sum(1 for a, b in zip(keys, keys[1:], strict=False) if r.file_of(a) != r.file_of(b))
        assert peak[0] == 1
        assert len(opened) >= n_switch + 1
        opened.clear()
        # get_many groups by shard: each shard opened at most once.
        r.close()
        got = r.get_many(keys[::-1])
        assert list(got) == keys[::-1]
        assert sorted(opened) == sorted({p.name for p in r.files})
    assert not live and r.open_file is None


def test_one_shard_mapped_after_reads(tiny_base: Path) -> None:
    """The OS view: once tensors are dropped, at most one shard file is memory-mapped."""

    def mapped() -> set[str]:
        with open("/proc/self/maps") as f:
            return {line.split()[-1] for line in f if "safetensors" in line and str(tiny_base) in line}

    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps")
    with CheckpointReader(tiny_base) as r:
        for key in r.keys():
            t = r.get(key)
            del t
            assert len(mapped()) <= 1
    assert mapped() == set()


def test_header_only_shape_dtype(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("safe_open called for a header query")

    monkeypatch.setattr(checkpoint_mod, "safe_open", boom)
    r = CheckpointReader(tiny_base)
    assert r.shape("model.layers.0.self_attn.q_proj.weight") == (32, 32)
    assert r.shape("model.layers.1.self_attn.k_proj.weight") == (16, 32)
    assert r.shape("model.layers.0.mlp.down_proj.weight") == (32, 64)
    assert r.shape("model.norm.weight") == (32,)
    assert r.dtype("model.layers.0.mlp.up_proj.weight") == torch.float32
    assert "model.norm.weight" in r and "model.nope" not in r
    assert r.bytes_read == 0
    with pytest.raises(KeyError, match="model.nope"):
        r.shape("model.nope")


def test_bf16_single_file(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int64), "c": torch.ones(())}
    save_file(tensors, os.fspath(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"hidden_size": 5}')
    with CheckpointReader(tmp_path) as r:
        assert r.index_file is None and r.files == [tmp_path / "model.safetensors"]
        # File order: safetensors lays tensors out by alignment, so b (int64) comes before a (bf16).
        assert sorted(r.keys()) == ["a", "b", "c"]
        starts = [r.info(k).start for k in r.keys()]
        assert starts == sorted(starts)
        assert r.dtype("a") == torch.bfloat16 and r.shape("c") == ()
        for k, t in tensors.items():
            assert torch.equal(r.get(k), t)
        assert r.nbytes == 3 * 5 * 2 + 7 * 8 + 4 and r.config == {"hidden_size": 5}


def test_single_other_name_and_no_config(tmp_path: Path) -> None:
    save_file({"w": torch.full((2, 2), 3.0)}, os.fspath(tmp_path / "weights.safetensors"))
    r = CheckpointReader(tmp_path)
    assert r.config == {} and torch.equal(r.get("w"), torch.full((2, 2), 3.0))
    save_file({"v": torch.zeros(1)}, os.fspath(tmp_path / "more.safetensors"))
    with pytest.raises(ValueError, match=r"2 safetensors files .* no model.safetensors.index.json"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize(
    "entry, match",
    [
        ("../x.safetensors", r"contains '\.\.'"),
        ("sub/../../x.safetensors", r"contains '\.\.'"),
        ("/etc/passwd", "absolute path"),
    ],
)
def test_index_path_traversal_rejected(tiny_base: Path, tmp_path: Path, entry: str, match: str) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    save_file({"x": torch.zeros(1)}, os.fspath(tmp_path / "x.safetensors"))
    index = _index(folder)
    index["weight_map"]["model.norm.weight"] = entry
    _write_index(folder, index)
    with pytest.raises(ValueError, match=match) as e:
        CheckpointReader(folder)
    assert "model.safetensors.index.json" in str(e.value) and entry in str(e.value)


def test_index_symlink_escape_rejected(tiny_base: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    outside = tmp_path / "outside.safetensors"
    save_file({"model.norm.weight": torch.zeros(32)}, os.fspath(outside))
    (folder / "evil.safetensors").symlink_to(outside)
    index = _index(folder)
    index["weight_map"]["model.norm.weight"] = "evil.safetensors"
    _write_index(folder, index)
    with pytest.raises(ValueError, match="outside the folder") as e:
        CheckpointReader(folder)
    assert "evil.safetensors" in str(e.value) and "index.json" in str(e.value)


def test_symlink_inside_folder_accepted(tiny_base: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    index = _index(folder)
    shard = index["weight_map"]["model.norm.weight"]
    (folder / "alias.safetensors").symlink_to(folder / shard)
    for key, entry in index["weight_map"].items():
        if entry == shard:
            index["weight_map"][key] = "alias.safetensors"
    _write_index(folder, index)
    ref = load_file(os.fspath(folder / shard))
    assert torch.equal(CheckpointReader(folder).get("model.norm.weight"), ref["model.norm.weight"])


def test_missing_shard_names_index_and_shard(tiny_base: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    shard = _index(folder)["weight_map"]["model.norm.weight"]
    (folder / shard).unlink()
    with pytest.raises(ValueError, match="does not exist") as e:
        CheckpointReader(folder)
    assert shard in str(e.value) and "model.safetensors.index.json" in str(e.value)


def test_missing_key_in_shard(tiny_base: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    index = _index(folder)
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.ghost.weight"] = shard
    _write_index(folder, index)
    with pytest.raises(ValueError, match="model.ghost.weight") as e:
        CheckpointReader(folder)
    assert shard in str(e.value)


@pytest.mark.parametrize("text", ["{not json", '{"weight_map": []}', '{"metadata": {}}', "[]"])
def test_malformed_index(tiny_base: Path, tmp_path: Path, text: str) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: malformed"):
        CheckpointReader(folder)


def test_corrupt_shard_header(tiny_base: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "ckpt")
    shard = _index(folder)["weight_map"]["model.norm.weight"]
    (folder / shard).write_bytes(b"\xff" * 8 + b"junk")
    with pytest.raises(ValueError, match="not a safetensors file") as e:
        CheckpointReader(folder)
    assert shard in str(e.value)


def test_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no checkpoint found"):
        CheckpointReader(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    sd = {"w": torch.randn(4, 3), "b": torch.arange(3, dtype=torch.int32)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        CheckpointReader(tmp_path)
    with CheckpointReader(tmp_path, allow_pickle=True) as r:
        assert set(r.keys()) == {"w", "b"} and r.shape("w") == (4, 3) and r.dtype("b") == torch.int32
        assert torch.equal(r.get("w"), sd["w"]) and torch.equal(r.get("b"), sd["b"])


def test_pickle_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("true",))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        CheckpointReader(tmp_path, allow_pickle=True)
