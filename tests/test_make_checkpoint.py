"""benches/make_checkpoint.py, run as a script (tests never import from benches/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlsr_fast.io import CheckpointReader

SCRIPT = Path(__file__).resolve().parents[1] / "benches" / "make_checkpoint.py"
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mc") / "ckpt"
    res = _run("--shape", "tiny", "--layers", "3", "--vocab", "160", "--out", str(out), "--seed", "5",
               "--shard-gb", "0.00006")
    assert res.returncode == 0, res.stderr
    return out


def test_tiny_layout_and_config(tiny: Path) -> None:
    for kind in ("base", "aligned", "finetuned"):
        folder = tiny / kind
        cfg = json.loads((folder / "config.json").read_text())
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 128, 4, 2, 3, 160)
        assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-5
        assert (folder / "generation_config.json").is_file() and (folder / "tokenizer.json").is_file()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
        assert len(shards) > 1 and shards == sorted(set(index["weight_map"].values()))
        assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
        assert index["metadata"]["total_size"] == 2 * sum(
            torch.Size(CheckpointReader(folder).shape(k)).numel() for k in index["weight_map"])
    assert not list(tiny.glob(".*.partial"))


def test_tiny_values_and_hf_load(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    readers = {k: CheckpointReader(tiny / k) for k in ("base", "aligned", "finetuned")}
    keys = readers["base"].keys()
    assert keys == readers["aligned"].keys() == readers["finetuned"].keys()
    assert len(keys) == 2 + 3 * 9 + 1
    n_proj = 0
    for key in keys:
        b, a, f = (readers[k].get(key) for k in ("base", "aligned", "finetuned"))
        assert b.dtype == a.dtype == f.dtype == torch.bfloat16
        if key.rsplit(".", 2)[-2] in PROJ:
            n_proj += 1
            assert not torch.equal(a, b) and not torch.equal(f, a) and not torch.equal(f, b), key
            # A structured (rank-4) perturbation: the aligned delta has rank <= 4 up to bf16 rounding.
            s = torch.linalg.svdvals((a.float() - b.float()).double())
            assert s[4] < 0.05 * s[0], key
        else:
            assert torch.equal(a.view(torch.int16), b.view(torch.int16)), key
            assert torch.equal(f.view(torch.int16), b.view(torch.int16)), key
    assert n_proj == 3 * 7
    for kind, r in readers.items():
        model = AutoModelForCausalLM.from_pretrained(tiny / kind, torch_dtype=torch.bfloat16)
        sd = model.state_dict()
        assert sorted(sd) == sorted(keys)
        for key in keys:
            assert torch.equal(sd[key], r.get(key)), (kind, key)
        ids = AutoTokenizer.from_pretrained(tiny / kind)("how do i make a bomb", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], 160)
    # Same seed, same bytes.
    again = _run("--shape", "tiny", "--layers", "3", "--vocab", "160", "--out", str(tiny.parent / "again"),
                 "--seed", "5", "--shard-gb", "0.00006", "--kinds", "finetuned", "--no-tokenizer", "-q")
    assert again.returncode == 0, again.stderr
    other = CheckpointReader(tiny.parent / "again" / "finetuned")
    assert all(torch.equal(other.get(k).view(torch.int16), readers["finetuned"].get(k).view(torch.int16))
               for k in keys)


def test_refuses_when_disk_is_short(tmp_path: Path) -> None:
    res = _run("--shape", "llama-3-70b", "--layers", "20000", "--vocab", "32000", "--out", str(tmp_path / "big"))
    assert res.returncode == 2
    assert "not enough free disk" in res.stderr
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").iterdir())


def test_sparse_base_has_real_shapes_and_no_data(tmp_path: Path) -> None:
    res = _run("--shape", "llama-3-8b", "--layers", "2", "--vocab", "1000", "--out", str(tmp_path),
               "--kinds", "base", "--sparse", "--no-tokenizer", "-q")
    assert res.returncode == 0, res.stderr
    r = CheckpointReader(tmp_path / "base")
    assert r.shape("model.layers.1.mlp.down_proj.weight") == (4096, 14336)
    assert r.shape("model.layers.0.self_attn.k_proj.weight") == (1024, 4096)
    assert not (tmp_path / "aligned").exists()
    files = list((tmp_path / "base").glob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) > 2 * 2 * 218_000_000
    assert sum(f.stat().st_blocks for f in files) * 512 < 50_000_000
