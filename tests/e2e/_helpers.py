"""Shared by the e2e tests: the experiment's scripts in benches/ loaded as modules (benches/ is not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def bench_script(name: str) -> Any:
    """benches/<name>.py as a fresh module object."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benches" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
