"""`import nlsr_fast` works without the C++ extension and without triton, and then lists no such backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

import nlsr_fast
from nlsr_fast.ops import OPS, Backend, available
from nlsr_fast.ops import _registry as registry


def test_import_nlsr_fast():
    assert isinstance(nlsr_fast.__version__, str) and nlsr_fast.__version__
    assert nlsr_fast.PackedMask is nlsr_fast.ops.PackedMask
    for op in OPS:
        assert callable(getattr(nlsr_fast.ops, op))
        assert Backend.REFERENCE in available(op, torch.device("cpu"))


def test_available_never_lists_cpu_without_extension(monkeypatch):
    monkeypatch.setattr(registry, "_cpp_module", lambda: None)
    for op in OPS:
        assert Backend.CPU not in available(op, torch.device("cpu"))
        assert available(op, torch.device("cpu"))[-1] is Backend.REFERENCE


_PROBE = """
import json, sys
sys.modules["nlsr_fast._C"] = None   # import of the extension fails
sys.modules["triton"] = None         # so does triton
import torch
import nlsr_fast
from nlsr_fast.ops import OPS, available
print(json.dumps({op: [b.value for b in available(op, torch.device("cpu"))] for op in OPS}))
"""


def test_fresh_interpreter_without_extension_and_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("NLSR_FAST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {op: ["reference"] for op in OPS}
