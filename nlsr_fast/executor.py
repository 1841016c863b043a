"""The streaming executor: one engine for LoRA and dense realignment (DESIGN "Scale").

pass 1  for each module, in model order (a reader thread loads the next module while this one is computed):
          inputs -> reference -> masks (written to masks.safetensors at once) -> similarity (a float);
          the fine-tuned module is written to the output as it is (most modules stay that way)
select  N floats -> the restored set
pass 2  for each restored module: inputs again -> masks read back -> restore -> written over its output slot

Memory: the module in hand plus the prefetch queue, never the model. A `Space` (lora.LoraSpace,
dense.DenseSpace) says what a module's tensors are and how each stage treats them; the stages themselves are the
per-module calls of nlsr_fast.pipeline and nlsr_fast.ops. With several processes (torch.distributed), each rank
runs passes 1 and 2 on the modules it owns and writes them into the shared planned files.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from nlsr_fast.ops import PackedMask
from nlsr_fast.pipeline.select import Selection, select

__all__ = ["Executed", "Space", "execute", "prefetch"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()


class Space(Protocol):
    """What the executor needs from a mode (see lora.LoraSpace and dense.DenseSpace)."""

    modules: list[str]

    def mask_keys(self, name: str) -> tuple[str, ...]:
        """Names of module `name`'s masks in masks.safetensors."""

    def load(self, name: str) -> Any:
        """The tensors of module `name` that passes 1 and 2 need (fine-tuned + reference), read and checked."""

    def masks(self, name: str, loaded: Any) -> dict[str, PackedMask]:
        """The masks of module `name`, keyed as in masks.safetensors."""

    def similarity(self, name: str, loaded: Any, masks: dict[str, PackedMask]) -> float:
        """S_m of module `name` (SPEC §4)."""

    def write_finetuned(self, name: str, loaded: Any) -> None:
        """Write module `name` of the fine-tuned input to its output slots, unchanged."""

    def restore(self, name: str, loaded: Any, masks: dict[str, PackedMask]) -> dict[str, int]:
        """Write the restored module to its output slots; returns the changed entries per masked tensor."""

    def copy_rest(self) -> None:
        """Write every output tensor that belongs to no module (bit-exact copies, or as their policy says)."""


@dataclass
class Executed:
    """What the executor found, in model order."""

    similarities: dict[str, float]
    densities: dict[str, dict[str, float]]
    selection: Selection
    restored: list[str]
    changed: dict[str, dict[str, int]]
    timings: dict[str, float]


def prefetch(items: Iterable[T], load: Callable[[T], Any], depth: int = 1) -> Iterator[tuple[T, Any]]:
    """Yield (item, load(item)) in order while a reader thread loads up to `depth` items ahead.

    Loading is I/O (pread releases the GIL) plus the reference's arithmetic, so it overlaps the computation on
    the yielded item. At most `depth + 1` loaded items exist at once (the one in hand and those ahead): a slot is
    taken before loading and given back when the consumer moves on. An exception in the reader is raised here, at
    the item that failed; leaving the loop early stops the reader.
    """
    q: queue.Queue[Any] = queue.Queue()
    slots = threading.Semaphore(max(1, depth) + 1)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in items:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                q.put((item, load(item)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(exc)
            return
        q.put(_DONE)

    thread = threading.Thread(target=reader, name="nlsr-fast-reader", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is _DONE:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
            del got
            slots.release()
    finally:
        stop.set()
        thread.join()


def execute(
    space: Space,
    *,
    masks_file: Any,
    select_kwargs: dict[str, Any],
    owned: Callable[[int], bool] = lambda i: True,
    root: bool = True,
    gather: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
    progress: Callable[[str, int, int], None] | None = None,
    precomputed_masks: Callable[[str], dict[str, PackedMask]] | None = None,
    journal: Any = None,
) -> Executed:
    """Run pass 1, select and pass 2 over `space.modules`.

    Args:
        space: the mode's view of the inputs and the output.
        masks_file: pipeline.write.MasksFile of the output (masks written in pass 1, read back in pass 2).
        select_kwargs: keyword arguments of pipeline.select (selection, prune_rate, epsilon, seed, preset, tau,
            fraction).
        owned: which module indices (model order) this process computes; the others come from `gather`.
        root: this process also writes the tensors that belong to no module.
        gather: merges the per-module results of every process ({name: value}); identity in one process.
        progress: optional callback(phase, done, total).
        precomputed_masks: masks made and written by calibration before pass 1, or None to let the space make
            (and write) them.
        journal: a resume.Journal: journaled modules are skipped (their results read back), finished ones recorded.
    Returns:
        Executed, with every module's results (all processes' after `gather`) and the seconds of each phase.
    """
    names = space.modules
    mine = [n for i, n in enumerate(names) if owned(i)]
    sims: dict[str, float] = {}
    densities: dict[str, dict[str, float]] = {}
    for name in mine:
        if journal is not None and journal.done("pass1", name):
            sims[name], densities[name] = journal.get("pass1", name)
    start = time.perf_counter()
    todo = [n for n in mine if n not in sims]
    for done, (name, loaded) in enumerate(prefetch(todo, space.load), start=1):
        if precomputed_masks is not None:  # calibration wrote them to masks.safetensors already
            masks = precomputed_masks(name)
        else:
            masks = space.masks(name, loaded)
            for key, mask in masks.items():
                masks_file.write(key, mask)
        sims[name] = space.similarity(name, loaded, masks)
        densities[name] = {key: mask.density() for key, mask in masks.items()}
        space.write_finetuned(name, loaded)
        if journal is not None:
            journal.record("pass1", name, [sims[name], densities[name]])
        del loaded, masks
        if progress is not None:
            progress("pass 1", done, len(todo))
    if root and not (journal is not None and journal.done("rest", "")):
        space.copy_rest()
        if journal is not None:
            journal.record("rest", "")
    sims, densities = gather(sims), gather(densities)
    timings = {"pass1": time.perf_counter() - start}
    start = time.perf_counter()
    nan = [n for n in names if sims[n] != sims[n]]
    if nan:
        raise ValueError(f"similarity is NaN for {len(nan)} module(s), first {nan[:3]}: their inputs hold non-finite "
                         "values (allowed by allow_nonfinite); such modules cannot be ranked")
    chosen = select([sims[n] for n in names], **select_kwargs)
    restored = [n for n, flag in zip(names, chosen.restored, strict=True) if flag]
    timings["select"] = time.perf_counter() - start
    start = time.perf_counter()
    mine_set = set(mine)
    mine_restored = [n for n in restored if n in mine_set]
    changed: dict[str, dict[str, int]] = {}
    for name in mine_restored:
        if journal is not None and journal.done("pass2", name):
            changed[name] = journal.get("pass2", name)
    todo = [n for n in mine_restored if n not in changed]
    for done, (name, loaded) in enumerate(prefetch(todo, space.load), start=1):
        changed[name] = space.restore(name, loaded, masks_file.read(list(space.mask_keys(name))))
        if journal is not None:
            journal.record("pass2", name, changed[name])
        del loaded
        if progress is not None:
            progress("pass 2", done, len(todo))
    changed = gather(changed)
    timings["pass2"] = time.perf_counter() - start
    return Executed(sims, densities, chosen, restored, changed, {k: round(v, 4) for k, v in timings.items()})
