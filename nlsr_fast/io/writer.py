"""Every safetensors file nlsr_fast writes goes through one writer, `io.stream.PlannedSafetensors`: the header is
planned from (name, dtype, shape) and written first, then each tensor at its offset. This module builds on it:

- `PlannedShards`: a checkpoint as size-capped shards named as `save_pretrained` names them, plus the index;
- `write_safetensors`: one file from tensors in memory (adapters, tests).

`ops.save_masks` and `pipeline.write.MasksFile` plan masks.safetensors with `ops.packed_mask.masks_plan`, so both
give the same bytes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from nlsr_fast.io.checkpoint import SAFE_INDEX, SAFE_SINGLE
from nlsr_fast.io.stream import PlannedSafetensors

__all__ = ["PlannedShards", "shard_names", "write_safetensors"]

log = logging.getLogger(__name__)

Plan = Sequence[tuple[str, torch.dtype, Sequence[int]]]


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` (any device and layout; each in its own dtype, in this order) to `path`; the bytes written."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{path}: value for {name!r} is a {type(t).__name__}, not a torch.Tensor")
    with PlannedSafetensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata) as f:
        for name, t in tensors.items():
            f.write(name, t)
    return f.size


def shard_names(n: int) -> list[str]:
    """The file names of a checkpoint in `n` shards, as `save_pretrained` gives them."""
    return [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class PlannedShards:
    """A checkpoint written from its tensor list: size-capped shards planned up front (greedy, in plan order; a tensor
    over the cap gets a shard of its own), each a PlannedSafetensors written slot by slot, in any order and from any
    process; `finish` writes `model.safetensors.index.json` when there are several shards.

    Args:
        folder: an existing folder (usually OUT.partial).
        plan: (name, dtype, shape) of every tensor, in file order.
        max_shard_bytes: cap on tensor bytes per shard (> 0).
        metadata: string pairs for each shard's header ({"format": "pt"} always set).
        create: plan and size the shards (one process); a shard that exists already (a resumed run's) is opened.
    """

    def __init__(self, folder: str | Path, plan: Plan, *, max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None, create: bool = True) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"{folder}: tensors {twice[:4]} appear twice in the plan")
        groups: list[list[tuple[str, torch.dtype, Sequence[int]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = math.prod(entry[2]) * entry[1].itemsize
            if nbytes > max_shard_bytes:
                log.warning("tensor %s (%d bytes) is over max_shard_bytes=%d: it gets a shard of its own", entry[0],
                            nbytes, max_shard_bytes)
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        self.folder = Path(folder)
        self.names = shard_names(len(groups))
        self.total_size = sum(math.prod(s) * d.itemsize for _, d, s in plan)
        self.files = [PlannedSafetensors(self.folder / n, group, metadata,
                                         create=create and not (self.folder / n).exists())
                      for n, group in zip(self.names, groups, strict=True)]
        self._where = {key: i for i, group in enumerate(groups) for key, _, _ in group}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if key not in self._where:
            raise KeyError(f"{self.folder}: tensor {key!r} is not in the plan")
        self.files[self._where[key]].write(key, tensor)

    def close(self) -> None:
        """fsync and close every shard."""
        for f in self.files:
            f.close()

    def finish(self) -> None:
        """Close the shards and write the index (several shards only)."""
        self.close()
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: self.names[i] for k, i in sorted(self._where.items())}}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
