"""Several processes with torch.distributed (launched by `torchrun`): who owns what, and the few collectives.

Calibration of the forward-statistics methods (low_rank, wanda) is data-parallel: each rank takes every world-th
sample and the statistics (fp64 sums) are summed across ranks in fp64. Gradient methods (snip, pref_snip) run on
every sample on every rank, because their fp32 per-micro-batch sums would round differently once split (see
runs._Run). Passes 1 and 2 are module-parallel: each rank owns a contiguous run of
modules of about equal size, writes them into the output files rank 0 planned, and the per-module results are
gathered; rank 0 writes the index, the report and the manifest, and renames the output. `nccl` on GPUs, `gloo`
on CPUs; one process (no `WORLD_SIZE`) needs none of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["Dist"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in the job: rank, world size, and the collectives the run needs."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this object initialised the process group (and destroys it in `close`)

    @property
    def root(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """One process, or the torchrun job this process belongs to (process group initialised here once)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            # Imported once a group exists (transformers.modeling_utils imports it), torch.distributed.fsdp takes
            # references to the group that destroy_process_group does not drop (torch 2.13): the group's gloo
            # threads then outlive `close` and, finishing a collective during interpreter exit, abort the process
            # ("terminate called without an active exception"). Imported first, it takes none.
            import torch.distributed.fsdp  # noqa: F401

            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            log.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    def close(self, barrier: bool = True) -> None:
        """Destroy the process group this object initialised (a group left to interpreter exit can abort the
        process from gloo's threads: "terminate called without an active exception"), after a barrier so no rank
        leaves while another still talks to it."""
        if self.owns_group:
            import torch.distributed as dist

            if barrier:
                dist.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    # -- collectives ---------------------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, part: dict[str, Any]) -> dict[str, Any]:
        """Every rank's dict merged (keys are disjoint: each rank reports the modules it owns)."""
        if not self.active:
            return part
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, part)
        merged: dict[str, Any] = {}
        for p in parts:
            merged.update(p)
        return merged

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place, in fp64 (then cast back to t's dtype)."""
        if not self.active:
            return t
        import torch.distributed as dist

        wide = t.to(torch.float64) if t.dtype.is_floating_point else t.to(torch.int64)
        dist.all_reduce(wide, op=dist.ReduceOp.SUM)
        t.copy_(wide.to(t.dtype))
        return t

    def on_root(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and hand its result, or its error (same type and message), to every rank."""
        if not self.active:
            return fn()
        result: Any = None
        error: tuple[type[BaseException], str] | None = None
        if self.root:
            try:
                result = fn()
            except (ValueError, RuntimeError, OSError) as exc:
                error = (type(exc), str(exc))
        result, error = self.broadcast((result, error))
        if error is not None:
            raise error[0](error[1])
        return result

    # -- ownership -----------------------------------------------------------------------------------------------
    def owners(self, sizes: Sequence[int]) -> list[int]:
        """The rank owning each item: contiguous runs of about equal total size (model order kept)."""
        total = sum(sizes) or 1
        owners, acc = [], 0
        for size in sizes:
            owners.append(min(self.world - 1, acc * self.world // total))
            acc += size
        return owners

    def shard_samples(self, calib: Any) -> Any:
        """This rank's share of the calibration set: every world-th sample, starting at its rank."""
        if not self.active or calib is None:
            return calib
        from nlsr_fast.calib.data import CalibrationSet

        return CalibrationSet(list(calib.samples[self.rank::self.world]), dict(calib.meta))

    def sum_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Sum calibration statistics over ranks in place: tensors in fp64, counts as integers.

        Accepts {module: ModuleStats / DenseStats} or {module: (grad_A, grad_B)} / {module: grad}; returns it.
        """
        if not self.active:
            return stats
        for name in sorted(stats):
            value = stats[name]
            if isinstance(value, torch.Tensor):
                self.sum_(value)
            elif isinstance(value, tuple):
                for t in value:
                    self.sum_(t)
            else:
                for field in ("gram", "x_sq", "z_sq"):
                    t = getattr(value, field, None)
                    if isinstance(t, torch.Tensor):
                        self.sum_(t)
                counts = torch.tensor([int(value.n_tokens), int(value.n_samples)], dtype=torch.int64)
                self.sum_(counts)
                value.n_tokens, value.n_samples = int(counts[0]), int(counts[1])
        return stats
