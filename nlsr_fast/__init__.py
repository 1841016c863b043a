"""nlsr_fast: fast, scalable neuron-level safety realignment (NLSR, arXiv 2412.12497) of fine-tuned LLMs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from nlsr_fast import ops  # noqa: E402
from nlsr_fast.config import PRESETS, Preset, RealignConfig  # noqa: E402
from nlsr_fast.ops import PackedMask  # noqa: E402
from nlsr_fast.pipeline import amplify, restore, score, select, similarity  # noqa: E402

# Loaded on first use, so that `import nlsr_fast` stays light (the API pulls in io and, when run, transformers).
_LAZY = {
    "realign": ("nlsr_fast.api", "realign"),
    "realign_with_config": ("nlsr_fast.api", "realign_with_config"),
    "Realignment": ("nlsr_fast.realignment", "Realignment"),
    "Report": ("nlsr_fast.report", "Report"),
    "ModuleRecord": ("nlsr_fast.report", "ModuleRecord"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nlsr_fast' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "ModuleRecord",
    "PackedMask",
    "Preset",
    "RealignConfig",
    "Realignment",
    "Report",
    "__version__",
    "amplify",
    "ops",
    "realign",
    "realign_with_config",
    "restore",
    "score",
    "select",
    "similarity",
]
