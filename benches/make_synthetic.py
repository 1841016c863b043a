"""Synthetic Llama checkpoints with random bf16 weights for the calibration benches, written layer by layer
(never the whole model in memory) as size-capped safetensors shards + index, cached by their parameters."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from nlsr_fast.testing import make_tokenizer

__all__ = ["cache_dir", "make_synthetic_llama", "folder_bytes", "random_lora_factors"]


def cache_dir() -> Path:
    """$NLSR_BENCH_CACHE, or <tmp>/nlsr_fast_bench_cache."""
    return Path(os.environ.get("NLSR_BENCH_CACHE", Path(tempfile.gettempdir()) / "nlsr_fast_bench_cache"))


def folder_bytes(folder: str | os.PathLike[str]) -> int:
    """Total size of the *.safetensors files in `folder`."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _layer_tensors(i: int, hidden: int, inter: int, heads: int, kv: int, dtype: torch.dtype,
                   gen: torch.Generator) -> dict[str, torch.Tensor]:
    hd = hidden // heads
    shapes = {
        "self_attn.q_proj.weight": (heads * hd, hidden),
        "self_attn.k_proj.weight": (kv * hd, hidden),
        "self_attn.v_proj.weight": (kv * hd, hidden),
        "self_attn.o_proj.weight": (hidden, heads * hd),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    out = {f"model.layers.{i}.{k}": (0.02 * torch.randn(s, generator=gen)).to(dtype) for k, s in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{norm}.weight"] = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return out


def make_synthetic_llama(
    layers: int,
    *,
    hidden: int = 1024,
    intermediate: int = 2816,
    heads: int = 16,
    kv_heads: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 64 << 20,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """A Llama checkpoint folder (config, word-level tokenizer, shards + index) with random weights; cached."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    name = f"llama_L{layers}_h{hidden}_i{intermediate}_a{heads}_kv{kv_heads}_{str(dtype).split('.')[-1]}_s{seed}"
    folder = Path(root) if root is not None else cache_dir()
    folder = folder / name
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    vocab = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, dtype=dtype)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": (0.02 * torch.randn(vocab, hidden, generator=gen)).to(dtype),
    }
    n_shard = 0
    total = 0

    def flush() -> None:
        nonlocal shard, n_shard
        if not shard:
            return
        n_shard += 1
        fname = f"model-{n_shard:05d}.safetensors"
        save_file(shard, os.fspath(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        shard = {}

    def add(tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard and sum(t.numel() * t.element_size() for t in shard.values()) + size > shard_bytes:
            flush()
        shard.update(tensors)
        total += size

    for i in range(layers):
        add(_layer_tensors(i, hidden, intermediate, heads, kv_heads, dtype, gen))
    add({"model.norm.weight": torch.ones(hidden, dtype=dtype),
         "lm_head.weight": (0.02 * torch.randn(vocab, hidden, generator=gen)).to(dtype)})
    flush()
    # HF names shards model-0000i-of-0000n; rename now that n is known.
    final: dict[str, str] = {}
    for i in range(1, n_shard + 1):
        old = folder / f"model-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{n_shard:05d}.safetensors"
        old.rename(folder / new)
        final.update({k: new for k, v in weight_map.items() if v == old.name})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": final}, indent=1))
    (folder / "DONE").write_text("ok\n")
    return folder


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_lora_factors(
    folder: str | os.PathLike[str], r: int = 16, scale: float = 2.0, seed: int = 1, targets: tuple[str, ...] = _TARGETS
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Random fp32 LoRA factors (A (r, d_in), B (d_out, r), scale) for every target of the checkpoint at `folder`."""
    from nlsr_fast.io import CheckpointReader

    reader = CheckpointReader(folder)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in reader.keys():
        if key.endswith(".weight") and key.split(".")[-2] in targets:
            d_out, d_in = reader.shape(key)
            name = key[: -len(".weight")]
            out[name] = (0.05 * torch.randn(r, d_in, generator=gen), 0.05 * torch.randn(d_out, r, generator=gen), scale)
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    return int(parts[2]), _TARGETS.index(parts[-1]) if parts[-1] in _TARGETS else len(_TARGETS)
