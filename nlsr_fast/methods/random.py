"""random: a seeded, uniformly random subset of each row (the control: what the top 1-s of i.i.d. scores is)."""

from __future__ import annotations

from typing import Any

from nlsr_fast.methods.base import Method, Needs


def mask(x: Any, *, sparsity: float, seed: int, key: str, backend: str | None) -> Any:
    """The `random` mask of tensor `x` (mask key `key`), in both modes: random_row_mask from a stream of its own per
    tensor (seed, mask key), so no module's mask depends on another's, their order or the process."""
    from nlsr_fast.ops import random_row_mask, random_stream
    from nlsr_fast.ops.random_row_mask import host_backend

    return random_row_mask((x.shape[0], x.shape[1]), 1.0 - sparsity, random_stream(seed, key), device=x.device,
                           backend=host_backend(backend))


def lora_masks(a: Any, b: Any, _: Any, *, sparsity: float, seed: int, keys: tuple[str, str], backend: str | None,
               **__: Any) -> tuple[Any, Any]:
    return (mask(a, sparsity=sparsity, seed=seed, key=keys[0], backend=backend),
            mask(b, sparsity=sparsity, seed=seed, key=keys[1], backend=backend))


METHOD = Method(
    name="random",
    title="random",
    reference="https://arxiv.org/abs/2412.12497",
    summary="a uniformly random subset (a control)",
    modes=("lora", "dense"),
    needs=Needs.NONE,
    draw=mask,
    lora_masks=lora_masks,
)
