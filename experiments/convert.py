"""Convert a GGUF checkpoint into a sharded safetensors folder + tokenizer (the base F_s that realign reads).

transformers de-quantises GGUF weights on load (e.g. Q4_1 -> float), so the result holds the de-quantised values,
not the original full-precision model's. The conversion runs once: a `.complete` marker makes later calls no-ops.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

__all__ = ["convert_gguf", "MARKER"]

MARKER = ".complete"


def convert_gguf(gguf_path: str | os.PathLike[str], out: str | os.PathLike[str], *, dtype: str = "bfloat16",
                 max_shard_size: str = "100MB") -> Path:
    """Load `gguf_path` with transformers (model and tokenizer), save them as a sharded safetensors folder at `out`.

    Returns `out`. Skips the work when `out` holds a finished conversion of the same file and dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out = Path(out)
    stamp = {"gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size, "dtype": dtype}
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    if out.exists():
        shutil.rmtree(out)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The loaded model is flagged as GGUF-quantised (which blocks saving) although its weights are plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model, "is_quantized"):
        model.is_quantized = False  # type: ignore[assignment]
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tok.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(stamp))
    tmp.rename(out)
    return out
