"""The streaming executor: one engine for LoRA and dense realignment (docs/architecture.md, "The two passes").

pass 1  for each module, in the fine-tuned file's order (a reader thread loads the next module while this one is
          computed): inputs -> reference -> masks (written to masks.safetensors at once) -> similarity (a float);
          the values restoration would give the masked entries (the reference, in the output's dtype: about
          (1 - s) x 2 bytes per entry; safelora with an aligned adapter: its r x d_in Q) go to a stash
select  N floats -> the restored set
pass 2  every output tensor, in the output file's order: the fine-tuned tensor, with the stashed values put back
          under the mask where its module is restored; written once, so each output file is written front to back
          and hashed as it is written (no second read for the manifest)

Memory: the module in hand plus the prefetch queue, never the model. A `Space` (lora.LoraSpace,
dense.DenseSpace) says what a module's tensors are and how each stage treats them; the stages themselves are the
per-module calls of nlsr_fast.pipeline and nlsr_fast.ops. With several processes (torch.distributed), each rank
runs passes 1 and 2 on the modules it owns and writes them into the shared planned files (rank 0 also writes the
tensors that belong to no module).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from nlsr_fast.io._format import DTYPE_NAMES, DTYPES
from nlsr_fast.io.stream import new_buffer, pread_into, pwrite_all, tensor_bytes
from nlsr_fast.ops import PackedMask
from nlsr_fast.pipeline.select import Selection, select

__all__ = ["Executed", "FileStash", "MemoryStash", "Space", "execute", "prefetch"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_DONE = object()


class Space(Protocol):
    """What the executor needs from a mode (see lora.LoraSpace and dense.DenseSpace)."""

    modules: list[str]

    def mask_keys(self, name: str) -> tuple[str, ...]:
        """Names of module `name`'s masks in masks.safetensors."""

    def file_order(self, names: list[str]) -> list[str]:
        """`names` in the order of their tensors in the fine-tuned input's files (sequential reads)."""

    def load(self, name: str) -> Any:
        """The tensors of module `name` that pass 1 needs (fine-tuned + reference), read and checked."""

    def masks(self, name: str, loaded: Any) -> dict[str, PackedMask]:
        """The masks of module `name`, keyed as in masks.safetensors."""

    def similarity(self, name: str, loaded: Any, masks: dict[str, PackedMask]) -> float | None:
        """S_m of module `name` (docs/algorithm.md §4); None for a method that ranks no module (selection all)."""

    def restore_values(self, name: str, loaded: Any, masks: dict[str, PackedMask]) -> dict[str, torch.Tensor]:
        """{mask key: the values restoration gives the masked entries, in row-major order} (1-D tensors)."""

    def output_items(self, modules: list[str], rest: bool) -> list[str]:
        """What pass 2 writes, in the output files' order: the given modules, and with `rest` every output tensor
        that belongs to no module (by its key)."""

    def load_output(self, item: str, restored: bool = False) -> Any:
        """The fine-tuned tensors of output item `item` (a module, or a tensor that belongs to none); for a restored
        module (`restored`), also whatever else its repair reads (safelora's base weight, dense mode)."""

    def write_output(self, item: str, loaded: Any, masks: dict[str, PackedMask] | None,
                     values: dict[str, torch.Tensor] | None) -> dict[str, int]:
        """Write item `item`; a restored module (masks and values given) gets `values` under its masks. Returns
        the changed entries per masked tensor of a restored module, {} otherwise."""


class MemoryStash:
    """Restore values kept in memory (tests and small runs); `FileStash` is the streaming one."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []

    def put(self, values: torch.Tensor) -> list[Any]:
        self._kept.append(values.detach().to("cpu").reshape(-1))
        return [len(self._kept) - 1]

    def get(self, record: list[Any]) -> torch.Tensor:
        return self._kept[record[0]]

    def close(self) -> None:
        self._kept.clear()


class FileStash:
    """Restore values appended to a scratch file (one per process) and read back by (offset, count, dtype).

    The records are JSON lists, so the journal can keep them for a resumed run; bytes a killed run appended after
    its last journaled record are never referenced and are skipped (appends go on at the end of the file).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._end = os.fstat(self._fd).st_size

    def put(self, values: torch.Tensor) -> list[Any]:
        view = tensor_bytes(values)
        offset = self._end
        pwrite_all(self._fd, view, offset)
        self._end += len(view)
        return [offset, values.numel(), DTYPE_NAMES[values.dtype]]

    def get(self, record: list[Any]) -> torch.Tensor:
        offset, count, dtype_name = record
        dtype = DTYPES[dtype_name]
        buf = new_buffer(count * dtype.itemsize)  # a dense module's values are ~94 MB: reused, not fresh pages
        pread_into(self._fd, memoryview(buf.numpy().data).cast("B"), offset, self.path)
        return buf.view(dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class Executed:
    """What the executor found, in model order."""

    similarities: dict[str, float | None]
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
    stash: Any = None,
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
        journal: a resume.Journal: journaled modules and output items are skipped (their results read back),
            finished ones recorded.
        stash: where pass 1 keeps the restore values for pass 2 (FileStash; a MemoryStash when None).
    Returns:
        Executed, with every module's results (all processes' after `gather`) and the seconds of each phase.
    """
    names = space.modules
    stash = stash if stash is not None else MemoryStash()
    mine = [n for i, n in enumerate(names) if owned(i)]
    sims: dict[str, float | None] = {}
    densities: dict[str, dict[str, float]] = {}
    kept: dict[str, dict[str, Any]] = {}  # module -> {mask key: stash record}
    for name in mine:
        if journal is not None and journal.done("pass1", name):
            sims[name], densities[name], kept[name] = journal.get("pass1", name)
    start = time.perf_counter()
    todo = space.file_order([n for n in mine if n not in sims])
    for done, (name, loaded) in enumerate(prefetch(todo, space.load), start=1):
        if precomputed_masks is not None:  # calibration wrote them to masks.safetensors already
            masks = precomputed_masks(name)
        else:
            masks = space.masks(name, loaded)
            for key, mask in masks.items():
                masks_file.write(key, mask)
        sims[name] = space.similarity(name, loaded, masks)
        densities[name] = {key: mask.density() for key, mask in masks.items()}
        kept[name] = {key: stash.put(v) for key, v in space.restore_values(name, loaded, masks).items()}
        if journal is not None:
            journal.record("pass1", name, [sims[name], densities[name], kept[name]])
        del loaded, masks
        if progress is not None:
            progress("pass 1", done, len(todo))
    sims, densities = gather(sims), gather(densities)
    timings = {"pass1": time.perf_counter() - start}
    start = time.perf_counter()
    nan = [n for n in names if sims[n] is not None and sims[n] != sims[n]]
    if nan:
        raise ValueError(f"similarity is NaN for {len(nan)} module(s), first {nan[:3]}: their inputs hold non-finite "
                         "values (allowed by allow_nonfinite); such modules cannot be ranked")
    chosen = select([sims[n] for n in names], **select_kwargs)
    restored = [n for n, flag in zip(names, chosen.restored, strict=True) if flag]
    timings["select"] = time.perf_counter() - start
    start = time.perf_counter()
    restored_set = set(restored)
    changed: dict[str, dict[str, int]] = {}
    items = space.output_items(mine, rest=root)
    for item in items:
        if journal is not None and journal.done("pass2", item) and item in restored_set:
            changed[item] = journal.get("pass2", item)
    todo = [i for i in items if journal is None or not journal.done("pass2", i)]

    def load_output(item: str) -> tuple[Any, Any, Any]:
        if item not in restored_set:
            return space.load_output(item), None, None
        masks = masks_file.read(list(space.mask_keys(item)))
        return space.load_output(item, True), masks, {key: stash.get(rec) for key, rec in kept[item].items()}

    for done, (item, (loaded, masks, values)) in enumerate(prefetch(todo, load_output), start=1):
        got = space.write_output(item, loaded, masks, values)
        if item in restored_set:
            changed[item] = got
        if journal is not None:
            journal.record("pass2", item, got)
        del loaded, masks, values
        if progress is not None:
            progress("pass 2", done, len(todo))
    stash.close()
    changed = gather(changed)
    timings["pass2"] = time.perf_counter() - start
    return Executed(sims, densities, chosen, restored, changed, {k: round(v, 4) for k, v in timings.items()})
