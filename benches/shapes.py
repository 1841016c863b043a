"""Real model dimensions for the benches (CONTRIBUTING.md rule P2): linear weights (d_out, d_in) and r = 128 LoRA
factors."""

from __future__ import annotations

# Llama-3-8B: hidden 4096, 32 heads of 128 with 8 KV heads (k/v: 1024), MLP 14336.
# Llama-3-70B: hidden 8192, 64 heads with 8 KV heads (k/v: 1024), MLP 28672.
_LLAMA = {
    "llama-3-8b": {"hidden": 4096, "kv": 1024, "mlp": 14336},
    "llama-3-70b": {"hidden": 8192, "kv": 1024, "mlp": 28672},
}


def _linears(hidden: int, kv: int, mlp: int) -> dict[str, tuple[int, int]]:
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (mlp, hidden),
        "up_proj": (mlp, hidden),
        "down_proj": (hidden, mlp),
    }


# "llama-3-8b.q_proj" -> (d_out, d_in)
SHAPES: dict[str, tuple[int, int]] = {
    f"{model}.{name}": shape for model, dims in _LLAMA.items() for name, shape in _linears(**dims).items()
}

LORA_RANK = 128
# "llama-3-8b.q_proj.r128" -> (r, d_out, d_in): A is (r, d_in), B is (d_out, r).
LORA_SHAPES: dict[str, tuple[int, int, int]] = {
    f"{name}.r{LORA_RANK}": (LORA_RANK, d_out, d_in) for name, (d_out, d_in) in SHAPES.items()
}

# "llama-3-70b.gate_proj.r128.A" -> (rows, cols) of one r = 128 LoRA factor: A is (r, d_in), B is (d_out, r).
FACTOR_SHAPES: dict[str, tuple[int, int]] = {
    f"{name}.{w}": shape
    for name, (r, d_out, d_in) in LORA_SHAPES.items()
    for w, shape in (("A", (r, d_in)), ("B", (d_out, r)))
}

# What a full bench run sweeps (on the GPU machine).
BENCH_MATRIX = ["llama-3-8b.q_proj", "llama-3-8b.down_proj", "llama-3-70b.q_proj", "llama-3-70b.gate_proj"]
BENCH_LORA = ["llama-3-8b.q_proj.r128", "llama-3-70b.down_proj.r128"]
BENCH_FACTORS = ["llama-3-70b.gate_proj.r128.A", "llama-3-70b.gate_proj.r128.B"]  # 128 x 8192, 28672 x 128

# The smoke run under --benchmark-disable (CI, 2 cores): small, odd, still 2-D and still checked.
SMOKE_SHAPES: dict[str, tuple[int, ...]] = {"smoke.37x301": (37, 301), "smoke.64x1000": (64, 1000)}
SMOKE_LORA: dict[str, tuple[int, int, int]] = {"smoke.r8-37x301": (8, 37, 301)}
SMOKE_FACTORS: dict[str, tuple[int, int]] = {"smoke.8x301": (8, 301), "smoke.301x8": (301, 8)}
