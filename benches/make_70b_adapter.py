"""Synthetic PEFT LoRA adapters with Llama-3-70B shapes, written by streaming one tensor at a time.

Shapes: hidden 8192, intermediate 28672, 64 heads, 8 KV heads (head dim 128, k/v out 1024), LoRA on the seven
projections of every layer, A (r, d_in) and B (d_out, r) in bf16 (r = 128: 3.31 GB per adapter at 80 layers).

- `aligned`: random factors (A ~ N(0, 1/d_in), B ~ N(0, 0.01^2)), deterministic per (seed, layer, module).
- `finetuned`: the aligned factors, plus Gaussian noise of a per-module relative size (2%..60% of the factor's
  std) on about half of the modules, so the similarities differ; the other modules are bit-identical to aligned.
- `reference` (only when asked for, `kinds=`): what the `amplify` stage does (preset paper, alpha 0.9: each
  factor x sqrt(1.9) in fp32) applied to the stored aligned factors, rounded to bf16.

Imports nothing from nlsr_fast (the issue forbids importing the library into benches/).

Each file's safetensors header is computed from the shapes first, then the tensors are generated and written
one by one, so only one module's factors are ever in memory. The folders are cached under
`<workdir>/llama3_70b_L{layers}_r{rank}_s{seed}` (a DONE marker says they are complete).

    python -m benches.make_70b_adapter --layers 80 --workdir /tmp/nlsr70b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["LLAMA3_70B", "ADAPTERS", "DEFAULT_KINDS", "adapter_config", "default_workdir", "make_70b_adapters",
           "module_specs"]

#: Llama-3-70B geometry.
LLAMA3_70B = {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128}
ADAPTERS = ("aligned", "finetuned", "reference")
DEFAULT_KINDS = ("aligned", "finetuned")
ALPHA = 0.9  # amplification coefficient of the reference (preset paper)
PERTURBED_SHARE = 0.5

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def default_workdir() -> Path:
    """$NLSR_BENCH_CACHE, or <tmp>/nlsr_fast_bench_cache."""
    return Path(os.environ.get("NLSR_BENCH_CACHE", Path(tempfile.gettempdir()) / "nlsr_fast_bench_cache"))


def module_specs(layers: int, geometry: dict[str, int] | None = None) -> list[tuple[str, int, int]]:
    """[(module path, d_in, d_out)] in PEFT model order (layer, then q k v o gate up down)."""
    g = geometry or LLAMA3_70B
    h, inter, q_out, kv_out = g["hidden"], g["intermediate"], g["heads"] * g["head_dim"], g["kv_heads"] * g["head_dim"]
    per_layer = [
        ("self_attn.q_proj", h, q_out),
        ("self_attn.k_proj", h, kv_out),
        ("self_attn.v_proj", h, kv_out),
        ("self_attn.o_proj", q_out, h),
        ("mlp.gate_proj", h, inter),
        ("mlp.up_proj", h, inter),
        ("mlp.down_proj", inter, h),
    ]
    return [(f"model.layers.{i}.{leaf}", d_in, d_out) for i in range(layers) for leaf, d_in, d_out in per_layer]


def adapter_config(rank: int) -> dict:
    """A PEFT LoRA adapter_config.json for the seven projections (lora_alpha = 2 r)."""
    return {
        "base_model_name_or_path": "synthetic/llama-3-70b-dummy",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


class _StreamingSafetensors:
    """A safetensors file whose header is written from (name, dtype, shape) up front; tensors follow in order."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.size = 8 + len(blob) + offset
        self._f: BinaryIO = path.open("wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want, nbytes = self._order[self._next]
        if name != want or t.numel() * t.element_size() != nbytes:
            raise RuntimeError(f"{self.path}: expected tensor {want!r} ({nbytes} bytes) next, got {name!r}")
        self._f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy().data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _module_tensors(idx: int, d_in: int, d_out: int, rank: int, seed: int
                    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """('A'|'B', aligned, finetuned, reference) bf16 tensors of module number `idx` (deterministic)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + idx)
    a32 = torch.randn(rank, d_in, generator=gen) * d_in**-0.5
    b32 = torch.randn(d_out, rank, generator=gen) * 0.01
    al_a, al_b = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
    del a32, b32
    c = math.sqrt(1.0 + ALPHA)  # amplify, preset paper
    ref_a, ref_b = (al_a.float() * c).to(torch.bfloat16), (al_b.float() * c).to(torch.bfloat16)
    u = torch.rand(2, generator=gen).tolist()
    if u[0] < PERTURBED_SHARE:
        rel = 0.02 + 0.58 * u[1]
        ft_a = (al_a.float() + torch.randn(rank, d_in, generator=gen) * (rel * d_in**-0.5)).to(torch.bfloat16)
        ft_b = (al_b.float() + torch.randn(d_out, rank, generator=gen) * (rel * 0.01)).to(torch.bfloat16)
    else:
        ft_a, ft_b = al_a, al_b
    yield "A", al_a, ft_a, ref_a
    yield "B", al_b, ft_b, ref_b


def make_70b_adapters(
    layers: int = 80,
    *,
    rank: int = 128,
    seed: int = 0,
    workdir: str | os.PathLike[str] | None = None,
    geometry: dict[str, int] | None = None,
    kinds: Sequence[str] = DEFAULT_KINDS,
    verbose: bool = False,
) -> dict[str, Path]:
    """Write (or find cached) the adapter folders of `kinds` (aligned, finetuned, reference); {kind: folder}."""
    g = geometry or LLAMA3_70B
    tag = "llama3_70b" if g == LLAMA3_70B else "llama_h{hidden}_i{intermediate}".format(**g)
    root = Path(workdir) if workdir is not None else default_workdir()
    kinds = [k for k in ADAPTERS if k in kinds]
    suffix = "" if set(kinds) == set(DEFAULT_KINDS) else "_" + "_".join(kinds)
    root = root / f"{tag}_L{layers}_r{rank}_s{seed}{suffix}"
    folders = {kind: root / kind for kind in kinds}
    if (root / "DONE").is_file():
        return folders
    specs = module_specs(layers, g)
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for name, d_in, d_out in specs:
        entries.append((f"base_model.model.{name}.lora_A.weight", torch.bfloat16, (rank, d_in)))
        entries.append((f"base_model.model.{name}.lora_B.weight", torch.bfloat16, (d_out, rank)))
    config = adapter_config(rank)
    writers = {}
    for kind, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        writers[kind] = _StreamingSafetensors(folder / "adapter_model.safetensors", entries)
    t0 = time.perf_counter()
    for idx, (name, d_in, d_out) in enumerate(specs):
        for which, al, ft, ref in _module_tensors(idx, d_in, d_out, rank, seed):
            key = f"base_model.model.{name}.lora_{which}.weight"
            for kind, t in (("aligned", al), ("finetuned", ft), ("reference", ref)):
                if kind in writers:
                    writers[kind].write(key, t)
        if verbose and (idx + 1) % 7 == 0:
            print(f"  layer {(idx + 1) // 7}/{layers} written ({time.perf_counter() - t0:.1f} s)", flush=True)
    for w in writers.values():
        w.close()
    (root / "DONE").write_text(json.dumps({"layers": layers, "rank": rank, "seed": seed, "geometry": g,
                                           "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
    return folders


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated subset of " + ",".join(ADAPTERS))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    folders = make_70b_adapters(args.layers, rank=args.rank, seed=args.seed, workdir=args.workdir, verbose=True,
                                kinds=[k.strip() for k in args.kinds.split(",")])
    for kind, folder in folders.items():
        size = (folder / "adapter_model.safetensors").stat().st_size
        print(f"{kind:10s} {folder}  {size / 1e9:.3f} GB")
    print(f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
