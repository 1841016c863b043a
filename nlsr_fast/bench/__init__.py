"""`python -m nlsr_fast.bench`: time every available backend of each op against its baseline, in one table.

Suites are sub-commands: `ops` (the default, so `python -m nlsr_fast.bench --quick` runs it); others register
themselves in `SUITES` (e.g. a `realign` suite for the whole pipeline).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nlsr_fast import ops
from nlsr_fast.bench.cases import RANDN_TOPK, STREAMING_OPS, TORCH_DENSE, Case, backends_on, check, make_case
from nlsr_fast.bench.timing import copy_bandwidth, median_seconds

__all__ = ["SUITES", "OpsConfig", "Row", "Suite", "format_table", "main", "parse_shape", "run_ops"]

LOG = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Defaults: a Llama-3-70B square projection for the matrix ops; the r = 128 LoRA of a 70B down_proj
# (A: 128 x 28672, B: 8192 x 128) for lora_masked_cosine; the r = 128 LoRA factors of a 70B gate_proj
# (A: 128 x 8192, B: 28672 x 128) for random_row_mask, which masks LoRA factors.
DEFAULT_MATRIX = (8192, 8192)
DEFAULT_LORA = (128, 8192, 28672)
DEFAULT_FACTORS = ((128, 8192), (28672, 128))
QUICK_MATRIX = (512, 1024)
QUICK_LORA = (16, 512, 1024)
QUICK_FACTORS = ((16, 1024), (1024, 16))
# Ops whose timed baseline is another provider than `reference`.
BASELINES = {"lora_masked_cosine": TORCH_DENSE, "random_row_mask": RANDN_TOPK}
# Ops that take the LoRA factor shapes (2-D, like the matrix ops, but other defaults).
FACTOR_OPS = ("random_row_mask",)


@dataclass(frozen=True)
class OpsConfig:
    ops: tuple[str, ...] = tuple(ops.OPS)
    matrix_shapes: tuple[tuple[int, ...], ...] = (DEFAULT_MATRIX,)
    lora_shapes: tuple[tuple[int, int, int], ...] = (DEFAULT_LORA,)
    factor_shapes: tuple[tuple[int, int], ...] = DEFAULT_FACTORS
    dtype: torch.dtype = torch.bfloat16
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    quick: bool = False
    copy_bytes: int = 0  # 0: 1 GiB on CUDA, 256 MiB on CPU, 32 MiB with quick

    def __post_init__(self) -> None:
        unknown = [o for o in self.ops if o not in ops.OPS]
        if unknown:
            raise ValueError(f"unknown ops {unknown}; choose from {list(ops.OPS)}")
        for lora in self.lora_shapes:
            if len(lora) != 3:
                raise ValueError(f"a LoRA shape is (r, d_out, d_in), got {lora}")
        for mat in self.matrix_shapes:
            if len(mat) not in (1, 2):
                raise ValueError(f"a matrix shape is (d_out, d_in), got {mat}")
        for factor in self.factor_shapes:
            if len(factor) != 2:
                raise ValueError(f"a LoRA factor shape is (rows, cols), got {factor}")

    def timing(self) -> dict[str, Any]:
        if self.quick:
            return {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "min_total_s": 0.0}
        return {"warmup": 2, "min_repeats": 5, "max_repeats": 50, "min_total_s": 1.0}


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    backend: str
    median_ms: float | None
    gbps: float | None
    speedup: float | None = None
    pct_copy: float | None = None
    status: str = "ok"
    bytes: int = 0
    flops: int = 0


def _shape_str(shape: Sequence[int]) -> str:
    if len(shape) == 3:
        return f"r{shape[0]} {shape[1]}x{shape[2]}"
    return "x".join(str(s) for s in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """'8192x8192' -> (8192, 8192); '128x8192x28672' -> (r, d_out, d_in) for lora_masked_cosine."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: expected e.g. 8192x8192 or 128x8192x28672") from None
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"bad shape {text!r}: expected 2 (d_out x d_in) or 3 (r x d_out x d_in) positive sizes")
    return shape


def _providers(op: str, device: torch.device) -> list[str]:
    names = backends_on(op, device)
    if op in BASELINES:
        names.insert(0, BASELINES[op])
    return names


def _bench_case(case: Case, cfg: OpsConfig, copy_gbps: float) -> list[Row]:
    shape, dtype = _shape_str(case.shape), DTYPE_NAMES.get(case.dtype, str(case.dtype).replace("torch.", ""))
    ref = case.run_fresh("reference")
    rows: list[Row] = []
    for provider in _providers(case.op, cfg.device):
        LOG.info("%s %s %s: %s", case.op, shape, dtype, provider)
        # Verify once before timing: a fast wrong answer is not a result.
        try:
            problem = check(case, case.run_fresh(provider), ref, backend=provider)
        except Exception as exc:  # a crashing backend is reported in its row, the others still run
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            LOG.error("%s[%s] %s %s is wrong: %s", case.op, provider, shape, dtype, problem)
            rows.append(Row(case.op, shape, dtype, provider, None, None, status=f"WRONG: {problem}"))
            continue
        seconds = median_seconds(functools.partial(case.run, provider), cfg.device, **cfg.timing())
        gbps = case.bytes / seconds / 1e9
        pct = 100 * gbps / copy_gbps if case.op in STREAMING_OPS and copy_gbps > 0 else None
        rows.append(Row(case.op, shape, dtype, provider, 1e3 * seconds, gbps, None, pct, "ok", case.bytes, case.flops))
    baseline = BASELINES.get(case.op, "reference")
    base = next((r for r in rows if r.backend == baseline and r.median_ms), None)
    for r in rows:
        if base is not None and r.median_ms:
            r.speedup = base.median_ms / r.median_ms  # type: ignore[operator]
    return rows


def run_ops(cfg: OpsConfig) -> tuple[list[Row], Row]:
    """Measure the copy bandwidth, then every op x shape x provider. Returns (rows, copy row)."""
    nbytes = cfg.copy_bytes or (32 << 20 if cfg.quick else (1 << 30 if cfg.device.type == "cuda" else 256 << 20))
    copy_gbps, copy_s = copy_bandwidth(cfg.device, nbytes, **cfg.timing())
    copy_row = Row(
        "copy_", f"{nbytes >> 20} MiB", "uint8", "torch", 1e3 * copy_s, copy_gbps, None, 100.0, "ok", 2 * nbytes
    )
    LOG.info("copy bandwidth %.1f GB/s on %s", copy_gbps, cfg.device)
    rows: list[Row] = []
    for op in cfg.ops:
        shapes: tuple[tuple[int, ...], ...] = cfg.matrix_shapes
        if op == "lora_masked_cosine":
            shapes = cfg.lora_shapes
        elif op in FACTOR_OPS:
            shapes = cfg.factor_shapes
        for shape in shapes:
            case = make_case(op, tuple(shape), cfg.dtype, cfg.device)
            rows.extend(_bench_case(case, cfg, copy_gbps))
            del case
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows, copy_row


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: Sequence[Row], copy_row: Row) -> str:
    """One table: every op row plus the copy bandwidth row the % column refers to."""
    head = ["op", "shape", "dtype", "backend", "median ms", "GB/s", "speed-up", "% copy", "status"]
    body = [
        [
            r.op,
            r.shape,
            r.dtype,
            r.backend,
            _fmt(r.median_ms, ".3f"),
            _fmt(r.gbps, ".2f"),
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            _fmt(r.pct_copy, ".0f"),
            r.status if len(r.status) <= 70 else r.status[:67] + "...",
        ]
        for r in [copy_row, *rows]
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [head, ["-" * w for w in widths], *body]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


# --- CLI -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """A sub-command of `python -m nlsr_fast.bench`."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _ops_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (seconds)")
    p.add_argument(
        "--ops",
        nargs="+",
        choices=list(ops.OPS),
        default=list(ops.OPS),
        metavar="OP",
        help=f"ops to run (default: all of {', '.join(ops.OPS)})",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_shape,
        metavar="SHAPE",
        help="d_outxd_in for the matrix ops and random_row_mask, rxd_outxd_in for lora_masked_cosine "
        "(default: 8192x8192, 128x8192x28672, and 128x8192 28672x128 for random_row_mask)",
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def _ops_run(args: argparse.Namespace) -> int:
    shapes = args.shapes or []
    matrix = tuple(s for s in shapes if len(s) == 2) or ((QUICK_MATRIX,) if args.quick else (DEFAULT_MATRIX,))
    lora = tuple(s for s in shapes if len(s) == 3) or ((QUICK_LORA,) if args.quick else (DEFAULT_LORA,))
    factors = tuple(s for s in shapes if len(s) == 2) or (QUICK_FACTORS if args.quick else DEFAULT_FACTORS)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = OpsConfig(
        tuple(args.ops), matrix, lora, factors, DTYPES[args.dtype], device, args.quick  # type: ignore[arg-type]
    )
    rows, copy_row = run_ops(cfg)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"nlsr_fast.bench ops on {device} ({gpu}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"copy bandwidth {copy_row.gbps:.1f} GB/s (dst.copy_(src), read + write)"
    )
    print(format_table(rows, copy_row))
    if args.quick:
        print("(--quick: small shapes that fit in cache; GB/s and % copy say little about streaming speed)")
    if args.json:
        payload = {
            "device": str(device),
            "device_name": gpu,
            "torch": torch.__version__,
            "quick": args.quick,
            "copy": asdict(copy_row),
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    wrong = [r for r in rows if r.status != "ok"]
    if wrong:
        print(f"{len(wrong)} backend result(s) disagree with the reference: see the status column", file=sys.stderr)
        return 1
    return 0


SUITES: dict[str, Suite] = {
    "ops": Suite("time each op's backends against the reference (default)", _ops_arguments, _ops_run),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The suite is an optional first positional argument, so `--quick` alone still means `ops --quick`.
    suite_name = argv.pop(0) if argv and argv[0] in SUITES else "ops"
    parser = argparse.ArgumentParser(
        prog=f"python -m nlsr_fast.bench {suite_name}",
        description=f"{SUITES[suite_name].help}. Suites: {', '.join(SUITES)}.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    SUITES[suite_name].add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return SUITES[suite_name].run(args)
