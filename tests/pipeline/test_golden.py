"""Every method, preset and mode writes the same bytes as when tests/pipeline/golden_outputs.json was recorded
(before the method registry): restructuring how methods and runs are organised changes no output bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nlsr_fast.demo.determinism import pinned_environ

HERE = Path(__file__).resolve().parent


def test_outputs_bit_for_bit_as_recorded() -> None:
    pytest.importorskip("peft")
    script, recorded = HERE / "golden_outputs.py", HERE / "golden_outputs.json"
    run = subprocess.run([sys.executable, str(script), "--check", str(recorded)], env=pinned_environ(),
                         capture_output=True, text=True)
    if run.returncode == 3:  # not an x86-64 CPU with AVX2, no C++ extension, or other package versions
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "24 runs: every output bit for bit as recorded"
