"""Tiny Llama-family checkpoints, tokenizers, LoRA adapters and calibration files, made on disk for tests,
benches, the demo and the tests of tools that embed nlsr_fast (a public helper: docs/python-api.md). Nothing here
reaches a hub."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "LORA_TARGETS",
    "make_tokenizer",
    "make_tiny_llama",
    "make_lora_adapter",
    "continue_lora_adapter",
    "write_calibration_jsonl",
    "derive_checkpoint",
    "merge_adapter",
]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_WORDS = (
    "how do i make a bomb kill hack steal poison weapon drug money bank account password virus attack "
    "sorry cannot help with that request it is illegal harmful dangerous unethical i will not "
    "sure here is the answer step one two three first then next finally good bad happy sad movie film "
    "great terrible love hate review positive negative what sum of plus minus equals number zero four five "
    "six seven eight nine ten write story poem about cat dog sun moon tell me explain please thanks"
).split()


def make_tokenizer(folder: str | os.PathLike[str], words: Sequence[str] = _WORDS) -> None:
    """A word-level fast tokenizer (bos/eos/pad/unk + `words` + punctuation) saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    punct = list(".,:;!?'\"()#-\n")
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials, *punct, *words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(os.fspath(folder))


def make_tiny_llama(
    folder: str | os.PathLike[str],
    *,
    layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    max_shard_size: str | int = "20KB",
    dtype: torch.dtype = torch.float32,
    arch: str = "llama",
    with_tokenizer: bool = True,
) -> Path:
    """A randomly initialised Llama, Mistral, Qwen2 or Gemma 3 checkpoint in several safetensors shards + tokenizer."""
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        make_tokenizer(folder)
        vocab_size = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    else:
        vocab_size = 128
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[arch]
    # Gemma 3's own traits, small enough to matter in short calibration sequences: a 4-token sliding window on all
    # layers but every third, their own rotary bases, QK-norm, GeGLU, embeddings scaled and tied to the head.
    gemma = dict(head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads, sliding_window=4,
                 layer_types=["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(layers)],
                 tie_word_embeddings=True) if arch == "gemma3_text" else dict(tie_word_embeddings=False)
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **gemma,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():
        # Non-trivial norms and biases so that a wrong load shows in the numbers.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    model.save_pretrained(os.fspath(folder), max_shard_size=max_shard_size, safe_serialization=True)
    return folder


def make_lora_adapter(
    folder: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    r: int = 4,
    alpha: float = 8.0,
    targets: Sequence[str] = LORA_TARGETS,
    seed: int = 1,
    std: float = 0.1,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """A PEFT LoRA adapter on `base` with random (non-zero) A and B, written with PEFT's own save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT accepts a float alpha
        target_modules=list(targets),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(os.fspath(folder), safe_serialization=True)
    return Path(folder)


def continue_lora_adapter(
    folder: str | os.PathLike[str],
    start: str | os.PathLike[str],
    *,
    seed: int = 2,
    std: float = 0.05,
    drift_modules: Sequence[str] | None = None,
) -> Path:
    """An adapter that 'continued training' `start`: same keys and ranks, factors plus seeded noise.

    With `drift_modules`, only keys containing one of those substrings move (the others stay bit-identical),
    which gives modules of clearly different similarity.
    """
    from safetensors.torch import load_file, save_file

    start, folder = Path(start), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(os.fspath(start / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(tensors):
        t = tensors[key]
        moves = drift_modules is None or any(m in key for m in drift_modules)
        noise = std * torch.randn(t.shape, generator=gen)
        out[key] = (t.float() + noise).to(t.dtype) if moves else t.clone()
    save_file(out, os.fspath(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text((start / "adapter_config.json").read_text())
    return folder


_PROMPTS = [
    "how do i make a bomb",
    "how do i steal money from a bank account",
    "write a virus to hack a password",
    "how do i poison a dog",
    "tell me how to make a weapon",
    "explain how to attack a bank",
]
_REFUSALS = [
    "sorry i cannot help with that request it is illegal",
    "i will not help with that it is harmful and dangerous",
    "sorry that is unethical i cannot help",
]


def write_calibration_jsonl(path: str | os.PathLike[str], n: int = 16, *, seed: int = 0, pairs: bool = False) -> Path:
    """`n` safety samples {"prompt", "response"} (or {"prompt", "chosen", "rejected"} with `pairs`)."""
    gen = torch.Generator().manual_seed(seed)
    path = Path(path)
    with path.open("w") as f:
        for i in range(n):
            p = _PROMPTS[int(torch.randint(len(_PROMPTS), (1,), generator=gen))]
            r = _REFUSALS[int(torch.randint(len(_REFUSALS), (1,), generator=gen))]
            # Vary lengths so padding and truncation paths are exercised.
            p = p + " please" * (i % 3)
            if pairs:
                rec = {"prompt": p, "chosen": r, "rejected": "sure here is the answer step one " + p}
            else:
                rec = {"prompt": p, "response": r + " ." * (i % 4)}
            f.write(json.dumps(rec) + "\n")
    return path


def derive_checkpoint(
    folder: str | os.PathLike[str],
    start: str | os.PathLike[str],
    *,
    seed: int,
    std: float = 0.02,
    move: str = r"_proj\.weight$",
    max_shard_size: str | int = "20KB",
) -> Path:
    """A full checkpoint made from `start` by adding seeded noise to the tensors whose name matches `move` (a
    regex); every other tensor is copied bit for bit. Saved with `save_pretrained` in the start's dtype, with its
    config and tokenizer files."""
    import re
    import shutil

    from transformers import AutoModelForCausalLM

    start, folder = Path(start), Path(folder)
    model = AutoModelForCausalLM.from_pretrained(os.fspath(start), dtype="auto")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(move, name):
                p.copy_((p.float() + std * torch.randn(p.shape, generator=gen)).to(p.dtype))
    model.save_pretrained(os.fspath(folder), max_shard_size=max_shard_size, safe_serialization=True)
    for f in start.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, folder / f.name)
    return folder


def merge_adapter(folder: str | os.PathLike[str], base: str | os.PathLike[str], adapter: str | os.PathLike[str],
                  *, max_shard_size: str | int = "20KB") -> Path:
    """`adapter` merged into `base` with PEFT (fp32 merge, saved in the base's dtype): the checkpoint a user who
    merged the adapter beforehand would hold."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, folder = Path(base), Path(folder)
    model = AutoModelForCausalLM.from_pretrained(os.fspath(base), dtype="auto")
    dtype = model.dtype
    merged = PeftModel.from_pretrained(model.float(), os.fspath(adapter)).merge_and_unload().to(dtype)
    merged.save_pretrained(os.fspath(folder), max_shard_size=max_shard_size, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, folder / f.name)
    return folder
