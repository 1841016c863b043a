"""What the demo pins so that it prints the same table on every x86-64 machine with AVX2 and the same package versions.

Where the numbers of the demo's float computations come from, and what is pinned. On the 2-core AVX-512 machine,
MKL's AVX2 path and ATen's AVX2 path each changed the trained weights bit for bit; torch's thread count did not at
this model's size (its tensors are below torch's grain sizes), but it would for larger ones, and it is pinned too:

- thread counts: torch's intra-op threads (parallel reductions split by thread) and MKL's and the C++ ops' OpenMP
  threads (the C++ ops are written not to depend on the count; the pin does not rely on it). Pinned to one:
  ``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` (torch and the extension share the one
  libgomp of the process, so this pins the C++ ops too);
- the CPU's instruction set and vendor: MKL's GEMM kernels, ATen's vectorised kernels (softmax, norms, reductions)
  and the C++ ops each pick an AVX-512, AVX2 or plain path at run time, and the paths may round differently; MKL
  also picks its kernels by CPU vendor. ATen, oneDNN and the C++ ops are pinned to AVX2, which every x86-64 server
  CPU of the last ten years has: ``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``NLSR_FAST_ISA=avx2``.
  MKL is pinned with ``MKL_CBWR=COMPATIBLE``, the branch of its conditional numerical reproducibility that MKL
  documents as giving the same results on Intel and AMD processors. ``MKL_CBWR=AVX2`` (the pin until 2026-12) does
  not: under it, a product of four matrices gave other bits on an AMD CPU model (``qemu-x86_64 -cpu EPYC``) than on
  Intel ones (the host Xeon, ``-cpu Skylake-Server`` and ``-cpu Haswell``), and two AMD EPYC machines printed another
  demo table than the Intel ones; under COMPATIBLE the emulated CPU models give the same bits, in a product of
  matrices and in the demo's training (benches/demo_vendor.py, benches/results/demo_vendor.md);
- random streams: python's ``random``, numpy and torch are seeded at the start of `run_demo` (every training stage
  also seeds its own streams), ``PYTHONHASHSEED=0``; ``torch.use_deterministic_algorithms(True)`` during the demo.

The instruction-set and thread variables are read once, when torch, MKL or the extension first need them, so they
cannot be set from inside a running process: `main` runs the demo in a child process (``python -m
nlsr_fast.demo``) whose environment carries :data:`PINNED_ENV`, unless its own environment already does.

Not pinned (cannot be from here): the versions of torch, transformers, peft and tokenizers (a different transformers
release may compute attention or a norm differently), and a CPU without AVX2 or not x86-64 (the pins then fall back to
what the CPU has; :func:`numerics` reports it and `results.json` records it under "numerics").
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

__all__ = ["PINNED_ENV", "TORCH_THREADS", "deterministic", "is_pinned", "numerics", "pinned_environ", "run_pinned"]

#: The environment the demo runs in (see the module doc for why each one).
PINNED_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NLSR_FAST_ISA": "avx2",
    "PYTHONHASHSEED": "0",
}

#: torch's intra-op threads during the demo (the model is tiny: more threads do not make it faster).
TORCH_THREADS = 1


def pinned_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) with :data:`PINNED_ENV` laid over it."""
    env = dict(os.environ if environ is None else environ)
    env.update(PINNED_ENV)
    return env


def is_pinned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether `environ` (default: this process's) carries every value of :data:`PINNED_ENV`."""
    env = os.environ if environ is None else environ
    return all(env.get(k) == v for k, v in PINNED_ENV.items())


def run_pinned(argv: Sequence[str]) -> int:
    """Run ``python -m nlsr_fast.demo ARGV`` in a child process with the pinned environment; its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", "nlsr_fast.demo", *argv], env=pinned_environ())
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT and cleans up its own files
        proc.wait()
        return 130


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Within: torch on :data:`TORCH_THREADS` threads, deterministic algorithms only, python/numpy/torch seeded.

    The previous thread count and deterministic-algorithms setting come back on exit."""
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy comes with torch
        pass
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_field(name: str) -> str | None:
    """A field of /proc/cpuinfo's first processor (None where there is no such file or field)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpu_field("model name") or platform.processor()


def numerics() -> dict[str, Any]:
    """What decided the demo's numbers in this process: pins, the code paths actually taken, versions, CPU."""
    try:
        from nlsr_fast import _C

        ext_isa: str | None = _C.isa()
        ext_threads: int | None = _C.num_threads()
    except ImportError:
        ext_isa = ext_threads = None
    capability = torch.backends.cpu.get_cpu_capability()
    return {
        "pinned_env": is_pinned(),
        "env": {k: os.environ.get(k) for k in PINNED_ENV},
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "aten_cpu_capability": capability,
        "nlsr_fast_isa": ext_isa,
        "nlsr_fast_threads": ext_threads,
        # the paths the pins ask for were taken (False on a CPU without AVX2, or when run_demo is called directly)
        "paths_pinned": capability == "AVX2" and ext_isa in ("avx2", None),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_vendor": _cpu_field("vendor_id"),
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "tokenizers", "safetensors",
                                                        "numpy")},
    }
