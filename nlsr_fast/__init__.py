"""nlsr_fast: fast, scalable neuron-level safety realignment (NLSR, arXiv 2412.12497) of fine-tuned LLMs."""

__version__ = "0.1.0"

from nlsr_fast import ops  # noqa: E402
from nlsr_fast.ops import PackedMask  # noqa: E402

__all__ = ["PackedMask", "__version__", "ops"]
