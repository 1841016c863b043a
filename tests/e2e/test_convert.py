"""convert_gguf on a tiny Llama GGUF written with the `gguf` package (one Q4_1 tensor, the rest F32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

TOKENS = ["<|endoftext|>", "<|im_start|>", "a", "b", "c", "d", "ab", "cd"]


def _write_tiny(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, ff, vocab = 32, 64, len(TOKENS)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(1)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (vocab - 2))
    w.add_token_merges(["a b", "c d"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    t = {
        "token_embd.weight": rng.standard_normal((vocab, d)),
        "blk.0.attn_norm.weight": np.ones(d),
        "blk.0.attn_q.weight": rng.standard_normal((d, d)),
        "blk.0.attn_k.weight": rng.standard_normal((d, d)),
        "blk.0.attn_v.weight": rng.standard_normal((d, d)),
        "blk.0.attn_output.weight": rng.standard_normal((d, d)),
        "blk.0.ffn_norm.weight": np.ones(d),
        "blk.0.ffn_gate.weight": rng.standard_normal((ff, d)),
        "blk.0.ffn_up.weight": rng.standard_normal((ff, d)),
        "blk.0.ffn_down.weight": rng.standard_normal((d, ff)),
        "output_norm.weight": np.ones(d),
        "output.weight": rng.standard_normal((vocab, d)),
    }
    t = {k: v.astype(np.float32) for k, v in t.items()}
    expected = dict(t)
    for name, arr in t.items():
        if name == "blk.0.ffn_down.weight":  # quantised like the real file; the expected value is its de-quantisation
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q4_1)
            expected[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_1).reshape(arr.shape)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_convert_tiny_gguf(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments import convert_gguf
    from experiments.convert import MARKER

    src = tmp_path / "tiny.gguf"
    expected = _write_tiny(src)
    out = convert_gguf(src, tmp_path / "out", dtype="float32", max_shard_size="20KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / MARKER).exists()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for s in shards:
        sd.update(load_file(s))
    torch.testing.assert_close(sd["model.layers.0.mlp.down_proj.weight"],
                               torch.from_numpy(expected["blk.0.ffn_down.weight"]))
    torch.testing.assert_close(sd["model.layers.0.self_attn.v_proj.weight"],
                               torch.from_numpy(expected["blk.0.attn_v.weight"]))
    torch.testing.assert_close(sd["model.embed_tokens.weight"], torch.from_numpy(expected["token_embd.weight"]))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>"
    # cached: a second call keeps the folder as it is
    mtime = (out / MARKER).stat().st_mtime_ns
    assert convert_gguf(src, tmp_path / "out", dtype="float32") == out
    assert (out / MARKER).stat().st_mtime_ns == mtime
