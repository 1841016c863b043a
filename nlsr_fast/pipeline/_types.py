"""Shared type aliases of the pipeline stages."""

from __future__ import annotations

import torch

from nlsr_fast.ops import PackedMask

#: {module name: (A (r, d_in), B (d_out, r))}, in model order.
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
#: {module name: (mask of A (r, d_in), mask of B (d_out, r))}.
Masks = dict[str, tuple[PackedMask, PackedMask]]
