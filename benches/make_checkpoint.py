"""Synthetic base, aligned and fine-tuned full Hugging Face Llama checkpoints with real model dimensions.

    python benches/make_checkpoint.py --shape llama-3-70b --layers 2 --vocab 32000 --out /work/bench_data/l70_2

writes `OUT/base`, `OUT/aligned` and `OUT/finetuned`, each a complete `LlamaForCausalLM` checkpoint folder:
`config.json` (the shape's real dimensions, `num_hidden_layers = --layers`, `vocab_size = --vocab`),
`generation_config.json`, size-capped shards `model-0000i-of-0000n.safetensors` (5 GB by default) with
`model.safetensors.index.json`, and a small word-level tokenizer (unless `--no-tokenizer`).

Values (deterministic in --seed and the tensor name):
- base: every weight N(0, 0.02^2); norms 1 + N(0, 0.1^2);
- aligned: base + a rank-4 delta on the seven projections (q, k, v, o, gate, up, down), entries of std 0.002
  (a tenth of the weights' std, well above bf16 rounding);
- fine-tuned: aligned (as stored) + another rank-4 delta on the projections, of a per-module size between 0.2x
  and 1.2x the aligned delta, so that per-module similarities spread out;
- every other tensor (embeddings, norms, lm_head) is bit-identical in the three checkpoints.

Memory: each tensor is generated in row blocks of at most 16M entries and the three files are written side by
side through a safetensors header computed up front, so nothing larger than a block is ever held (a 70B layer is
1.7 GB in bf16, a 70B checkpoint 141 GB). `--sparse` writes the headers and leaves the data as holes (zeros, no
disk used): for runs that only read shapes (a LoRA-mode realign with `--method random` reads the base's headers).

Free disk is checked before anything is written: exit status 2 and a message when the checkpoints would not fit.
It imports from nlsr_fast only the tests' word-level tokenizer (nlsr_fast.testing.make_tokenizer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["SHAPES", "KINDS", "Shape", "checkpoint_bytes", "make_checkpoints", "tensor_specs", "shard_plan", "main"]

KINDS = ("base", "aligned", "finetuned")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_STD = 0.02
ALIGNED_DELTA_STD = 0.1 * WEIGHT_STD
FINETUNED_REL = (0.2, 1.2)  # fine-tuned delta std relative to the aligned delta std, drawn per module
DELTA_RANK = 4
BLOCK_ELEMS = 1 << 24
HEADROOM = 1 << 30  # free disk kept beyond what the checkpoints need
GB = 1e9

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: Real dimensions (layers and vocab are the real model's defaults; --layers / --vocab override them).
SHAPES: dict[str, Shape] = {
    "llama-3-70b": Shape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=128256),
    "llama-3-8b": Shape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=32, vocab=128256),
    "tiny": Shape(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=256, max_position_embeddings=512),
}

BOS, EOS, PAD = 1, 2, 3


def tensor_specs(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """[(tensor name, shape)] of a LlamaForCausalLM state dict in Hugging Face order (untied lm_head)."""
    h, q_out, kv_out = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, h))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (s.intermediate, h)),
            (p + "mlp.up_proj.weight", (s.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, s.intermediate)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (s.vocab, h))]
    return specs


def is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.rsplit(".", 2)[-2] in PROJECTIONS


def shard_plan(specs: Sequence[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
               ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy size-capped shards in tensor order (a tensor larger than the cap gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _header(entries: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, int]:
    """The safetensors header bytes (length prefix included) and the data size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def checkpoint_bytes(s: Shape, dtype: torch.dtype, shard_bytes: int) -> int:
    """Bytes of the shard files of one checkpoint (headers included)."""
    headers = [_header(sh, dtype) for sh in shard_plan(tensor_specs(s), dtype.itemsize, shard_bytes)]
    return sum(len(h) + n for h, n in headers)


def _generator(seed: int, name: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7 + salt) % (1 << 63))


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class _Writers:
    """One open shard file per kind, written in the header's tensor order."""

    def __init__(self, folders: dict[str, Path], fname: str, header: bytes, size: int, sparse: bool) -> None:
        self.files: dict[str, BinaryIO] = {}
        for kind, folder in folders.items():
            f = (folder / fname).open("wb")
            f.write(header)
            if sparse:
                f.truncate(len(header) + size)
            self.files[kind] = f

    def write(self, kind: str, t: torch.Tensor) -> None:
        self.files[kind].write(_as_bytes(t))

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def _write_tensor(w: _Writers, kinds: Sequence[str], name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  seed: int) -> None:
    """Generate tensor `name` for every kind in row blocks and append it to each kind's shard."""
    gen = _generator(seed, name)
    rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
    if "norm" in name:
        t = (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
        for k in kinds:
            w.write(k, t)
        return
    proj = is_projection(name) and any(k != "base" for k in kinds)
    if proj:
        g2 = _generator(seed, name, salt=1)
        ua = torch.randn(rows, DELTA_RANK, generator=g2)
        va = torch.randn(DELTA_RANK, cols, generator=g2) * (ALIGNED_DELTA_STD / math.sqrt(DELTA_RANK))
        rel = FINETUNED_REL[0] + (FINETUNED_REL[1] - FINETUNED_REL[0]) * float(torch.rand(1, generator=g2))
        uf = torch.randn(rows, DELTA_RANK, generator=g2)
        vf = torch.randn(DELTA_RANK, cols, generator=g2) * (rel * ALIGNED_DELTA_STD / math.sqrt(DELTA_RANK))
    step = max(1, BLOCK_ELEMS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        w0 = torch.randn(r1 - r0, cols, generator=gen).mul_(WEIGHT_STD)
        q0 = w0.to(dtype)
        if "base" in kinds:
            w.write("base", q0)
        if not proj:
            for k in kinds:
                if k != "base":
                    w.write(k, q0)
            continue
        wa = w0.addmm_(ua[r0:r1], va)
        qa = wa.to(dtype)
        if "aligned" in kinds:
            w.write("aligned", qa)
        if "finetuned" in kinds:
            w.write("finetuned", qa.float().addmm_(uf[r0:r1], vf).to(dtype))


def config_json(s: Shape, dtype: torch.dtype) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "hidden_size": s.hidden,
        "initializer_range": WEIGHT_STD,
        "intermediate_size": s.intermediate,
        "max_position_embeddings": s.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": s.heads,
        "num_hidden_layers": s.layers,
        "num_key_value_heads": s.kv_heads,
        "pad_token_id": PAD,
        "pretraining_tp": 1,
        "rms_norm_eps": s.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": s.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "vocab_size": s.vocab,
    }


def write_tokenizer(folder: Path) -> bool:
    """The tests' word-level fast tokenizer (nlsr_fast.testing.make_tokenizer); False if the packages lack."""
    try:
        from nlsr_fast.testing import make_tokenizer

        make_tokenizer(folder)
    except ImportError:
        return False
    return True


def _free_bytes(path: Path) -> int:
    p = path.resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def make_checkpoints(out: str | os.PathLike[str], shape: Shape, *, kinds: Sequence[str] = KINDS, seed: int = 0,
                     dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 * 10**9, sparse: bool = False,
                     tokenizer: bool = True, overwrite: bool = False, verbose: bool = True) -> dict[str, Path]:
    """Write the checkpoints of `kinds` under `out`; returns {kind: folder}. Raises ValueError / OSError."""
    out = Path(out)
    kinds = [k for k in KINDS if k in kinds]
    if not kinds:
        raise ValueError(f"no kind to write; choose among {KINDS}")
    folders = {k: out / k for k in kinds}
    for f in folders.values():
        if f.exists() and not overwrite:
            raise FileExistsError(f"{f} exists (pass --overwrite to replace it)")
    specs = tensor_specs(shape)
    shards = shard_plan(specs, dtype.itemsize, shard_bytes)
    headers = [_header(sh, dtype) for sh in shards]
    per_ckpt = sum(len(h) + n for h, n in headers)
    need = 0 if sparse else per_ckpt * len(kinds)
    free = _free_bytes(out)
    if need + HEADROOM > free:
        raise OSError(
            f"not enough free disk under {out}: {len(kinds)} checkpoint(s) x {per_ckpt / GB:.2f} GB = "
            f"{need / GB:.2f} GB (+ {HEADROOM / GB:.0f} GB headroom) needed, {free / GB:.2f} GB free; use fewer "
            f"--layers, a smaller --vocab, fewer --kinds or another --out")
    if verbose:
        print(f"make_checkpoint: {len(kinds)} x {per_ckpt / GB:.2f} GB ({len(shards)} shard(s) each, "
              f"{shape.layers} layers, vocab {shape.vocab}, {dtype}{', sparse' if sparse else ''}) -> {out}; "
              f"{free / GB:.1f} GB free", flush=True)
    partial = {k: out / f".{k}.partial" for k in kinds}
    for p in partial.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    total = len(shards)
    index_map: dict[str, str] = {}
    t0 = time.perf_counter()
    done_bytes = 0
    for i, (sh, (head, size)) in enumerate(zip(shards, headers, strict=True)):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        w = _Writers(partial, fname, head, size, sparse)
        try:
            for name, tshape in sh:
                index_map[name] = fname
                if not sparse:
                    _write_tensor(w, kinds, name, tshape, dtype, seed)
                    done_bytes += math.prod(tshape) * dtype.itemsize
                    if verbose and name.endswith("down_proj.weight"):
                        el = time.perf_counter() - t0
                        print(f"  {name.rsplit('.', 3)[0]} done: {done_bytes * len(kinds) / GB:.2f} of "
                              f"{per_ckpt * len(kinds) / GB:.2f} GB written, {el:.1f} s", flush=True)
        finally:
            w.close()
        if verbose:
            print(f"  shard {i + 1}/{total} ({(len(head) + size) / GB:.2f} GB x {len(kinds)}) "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    index = {"metadata": {"total_size": sum(n for _, n in headers)}, "weight_map": index_map}
    cfg = config_json(shape, dtype)
    try:
        from importlib.metadata import version
        tf_version = version("transformers")
    except Exception:  # noqa: BLE001 - a version string is cosmetic
        tf_version = "unknown"
    gen_cfg = {"_from_model_config": True, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
               "transformers_version": tf_version}
    with_tok = False
    for k, p in partial.items():
        (p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (p / "config.json").write_text(json.dumps({**cfg, "transformers_version": tf_version}, indent=2) + "\n")
        (p / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        if tokenizer:
            with_tok = write_tokenizer(p)
        if folders[k].exists():
            shutil.rmtree(folders[k])
        p.rename(folders[k])
    (out / "make_checkpoint.json").write_text(json.dumps(
        {"shape": asdict(shape), "kinds": kinds, "seed": seed, "dtype": str(dtype), "shard_bytes": shard_bytes,
         "sparse": sparse, "tokenizer": with_tok, "bytes_per_checkpoint": per_ckpt,
         "seconds": round(time.perf_counter() - t0, 2)}, indent=2) + "\n")
    if verbose:
        print(f"make_checkpoint: done in {time.perf_counter() - t0:.1f} s; tokenizer "
              f"{'written' if with_tok else 'not written'}", flush=True)
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real model's)")
    p.add_argument("--out", type=Path, required=True, help="folder that receives base/, aligned/, finetuned/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size cap in GB (1e9 bytes; default 5)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of base,aligned,finetuned")
    p.add_argument("--sparse", action="store_true",
                   help="headers only, data left as holes (zeros, no disk): for runs that read only shapes")
    p.add_argument("--no-tokenizer", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT/<kind> folders")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    base = SHAPES[args.shape]
    shape = Shape(**{**asdict(base), "layers": args.layers if args.layers is not None else base.layers,
                     "vocab": args.vocab if args.vocab is not None else base.vocab})
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = sorted(set(kinds) - set(KINDS))
    if bad or shape.layers < 1 or shape.vocab < 1 or args.shard_gb <= 0:
        p.error(f"bad --kinds {bad}" if bad else "--layers, --vocab and --shard-gb must be positive")
    try:
        make_checkpoints(args.out, shape, kinds=kinds, seed=args.seed, dtype=_DTYPES[args.dtype],
                         shard_bytes=int(args.shard_gb * 1e9), sparse=args.sparse, tokenizer=not args.no_tokenizer,
                         overwrite=args.overwrite, verbose=not args.quiet)
    except (OSError, ValueError) as exc:
        print(f"make_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
