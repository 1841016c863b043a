"""A one-shard-at-a-time reader over a Hugging Face checkpoint folder (sharded or single safetensors)."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from nlsr_fast.io._format import TensorInfo, read_header
from nlsr_fast.io.hub import snapshot_blobs
from nlsr_fast.io.stream import read_tensor

__all__ = ["CheckpointReader", "SAFE_INDEX", "SAFE_SINGLE", "resolve_inside"]

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


def resolve_inside(folder: Path, entry: object, *, source: Path) -> Path:
    """Resolve `entry` (a relative file name read from `source`) inside `folder`, refusing any escape.

    Args:
        folder: the checkpoint folder.
        entry: the file name as written in `source` (an index file).
        source: the file that named `entry`, for the error message.

    Returns:
        folder / entry.
    """
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise ValueError(f"{source}: shard entry {entry!r} is not a file name")
    rel = Path(entry)
    if rel.is_absolute() or entry.startswith(("/", "\\")) or (len(entry) > 1 and entry[1] == ":"):
        raise ValueError(f"{source}: shard entry {entry!r} is an absolute path; shards must lie inside {folder}")
    if ".." in rel.parts or ".." in entry.replace("\\", "/").split("/"):
        raise ValueError(f"{source}: shard entry {entry!r} contains '..'; shards must lie inside {folder}")
    path = folder / rel
    try:
        real, root = path.resolve(), folder.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a symlink loop
        raise ValueError(f"{source}: shard entry {entry!r} cannot be resolved inside {folder}: {e}") from None
    blobs = snapshot_blobs(folder)  # a Hugging Face cache snapshot: its files are symlinks into the repo's blobs/
    if not real.is_relative_to(root) and not (blobs is not None and real.is_relative_to(blobs)):
        raise ValueError(f"{source}: shard entry {entry!r} resolves to {real}, outside the folder {root}")
    return path


class CheckpointReader:
    """Read tensors of a checkpoint folder one shard at a time, shapes and dtypes from the headers alone.

    At most one shard is open (memory-mapped through `safe_open`) at a time; reading a tensor of another shard
    closes the previous one. Tensors returned by `get` are zero-copy, copy-on-write views of the mapping: a
    caller that keeps them keeps that shard's mapping alive, nothing more. A `streamed` reader (a realign run's
    inputs) reads each tensor with `pread` into private memory instead (io.stream.read_tensor): no shard stays
    mapped, and a file being hashed for the report is hashed from that read, so the calibration engine's reads of
    the base are its only read.

    Args:
        folder: a folder holding `model.safetensors.index.json` + shards, a single `model.safetensors`, or
            exactly one `*.safetensors` file.
        allow_pickle: read a `pytorch_model.bin` checkpoint (with `torch.load(weights_only=True)`) when the
            folder has no safetensors. Off by default: pickles can run code.
        streamed: `get` reads into private memory (do not write into its tensors in place: the input hasher may
            still hold them).
    """

    def __init__(self, folder: str | os.PathLike[str], *, allow_pickle: bool = False, streamed: bool = False
                 ) -> None:
        self.folder: Path = Path(folder)
        self.streamed = streamed
        if not self.folder.is_dir():
            raise ValueError(f"checkpoint folder {self.folder} does not exist or is not a folder")
        cfg = self.folder / "config.json"
        self.config: dict[str, Any] = _read_json(cfg) if cfg.is_file() else {}
        self.index_file: Path | None = None
        self.bytes_read: int = 0
        self._lock = threading.Lock()
        self._open_path: Path | None = None
        self._handle: Any = None
        self._pickle: dict[str, torch.Tensor] | None = None
        self._infos: dict[str, TensorInfo] = {}
        self._is_pickle = False

        index = self.folder / SAFE_INDEX
        singles = sorted(p for p in self.folder.glob("*.safetensors") if p.is_file())
        if index.is_file():
            self._load_index(index)
        elif (self.folder / SAFE_SINGLE).is_file() or len(singles) == 1:
            single = self.folder / SAFE_SINGLE if (self.folder / SAFE_SINGLE).is_file() else singles[0]
            resolve_inside(self.folder, single.name, source=self.folder)
            self._infos, _ = read_header(single)
        elif len(singles) > 1:
            raise ValueError(
                f"{self.folder}: {len(singles)} safetensors files ({', '.join(p.name for p in singles[:4])}, ...) "
                f"but no {SAFE_INDEX} saying which tensor lives where"
            )
        else:
            self._load_pickle(allow_pickle)
        self.files: list[Path] = list(dict.fromkeys(info.file for info in self._infos.values()))
        log.debug("checkpoint %s: %d tensors in %d files", self.folder, len(self._infos), len(self.files))

    def _load_index(self, index: Path) -> None:
        self.index_file = index
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: malformed index, no non-empty 'weight_map' object")
        headers: dict[str, dict[str, TensorInfo]] = {}
        shards: dict[str, Path] = {}
        for key, entry in weight_map.items():
            if not isinstance(entry, str):  # before the dict look-up: a list or an object is not hashable
                raise ValueError(f"{index}: tensor {key!r}: shard entry {entry!r} is not a file name")
            if entry not in headers:
                shard = resolve_inside(self.folder, entry, source=index)
                shards[entry] = shard
                if not _is_file(shard):
                    raise ValueError(f"{index}: tensor {key!r} is in shard {entry!r}, but {shard} does not exist")
                headers[entry] = read_header(shard)[0]
            info, shard = headers[entry].get(key), shards[entry]
            if info is None:
                raise ValueError(f"{index}: tensor {key!r} is listed in shard {entry!r}, but {shard} lacks it")
            self._infos[key] = info

    def _load_pickle(self, allow_pickle: bool) -> None:
        bin_index, bin_single = self.folder / _BIN_INDEX, self.folder / _BIN_SINGLE
        bins = sorted(self.folder.glob("*.bin"))
        if not (bin_index.is_file() or bin_single.is_file() or bins):
            raise ValueError(f"{self.folder}: no checkpoint found (no *.safetensors, {SAFE_INDEX} or *.bin)")
        if not allow_pickle:
            raise ValueError(
                f"{self.folder}: only a pickle checkpoint (*.bin) is present; pickles can run code when loaded. "
                "Convert it to safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)"
            )
        if bin_index.is_file():
            weight_map = _read_json(bin_index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{bin_index}: malformed index, no non-empty 'weight_map' object")
            files = {e: resolve_inside(self.folder, e, source=bin_index) for e in dict.fromkeys(weight_map.values())}
        else:
            single = bin_single if bin_single.is_file() else bins[0]
            if not bin_single.is_file() and len(bins) > 1:
                raise ValueError(f"{self.folder}: {len(bins)} *.bin files and no {_BIN_INDEX}")
            weight_map, files = None, {single.name: single}
        log.warning("loading pickle checkpoint %s with torch.load(weights_only=True)", self.folder)
        self._is_pickle = True
        self._pickle = {}
        for entry, path in files.items():
            if not path.is_file():
                raise ValueError(f"{self.folder}: pickle shard {entry!r} named by the index does not exist ({path})")
            sd = _torch_load(path)
            for key, t in sd.items():
                if weight_map is not None and weight_map.get(key) != entry:
                    continue
                self._pickle[key] = t
                self._infos[key] = TensorInfo(path, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
        if weight_map is not None:
            for key, entry in weight_map.items():
                if key not in self._infos:
                    raise ValueError(f"{bin_index}: tensor {key!r} is listed in {entry!r}, but that file lacks it")

    def keys(self) -> list[str]:
        """Tensor names, in index (or header) order."""
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def info(self, key: str) -> TensorInfo:
        """File, dtype, shape and byte range of `key`, from the header."""
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{self.folder}: no tensor {key!r} in this checkpoint") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of `key` from the header (no tensor read)."""
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """dtype of `key` from the header (no tensor read)."""
        return self.info(key).dtype

    def file_of(self, key: str) -> Path:
        """The shard holding `key`."""
        return self.info(key).file

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(info.nbytes for info in self._infos.values())

    @property
    def open_file(self) -> Path | None:
        """The shard currently open, or None."""
        return self._open_path

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (a CPU tensor in its stored dtype), opening its shard and closing any other.

        Args:
            key: tensor name.

        Returns:
            The tensor, shape `self.shape(key)`, dtype `self.dtype(key)`.
        """
        info = self.info(key)
        with self._lock:
            if self._is_pickle:
                assert self._pickle is not None
                t = self._pickle[key]
            elif self.streamed:
                t = read_tensor(info)
            else:
                if self._open_path != info.file:
                    self._close_locked()
                    self._handle = safe_open(os.fspath(info.file), framework="pt", device="cpu")
                    self._open_path = info.file
                    log.debug("opened shard %s", info.file)
                t = self._handle.get_tensor(key)
            self.bytes_read += info.nbytes
        return t

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read several tensors, grouped by shard so each shard is opened once; returned in the order asked."""
        keys = list(keys)
        order = {f: i for i, f in enumerate(self.files)}
        out = {k: self.get(k) for k in sorted(keys, key=lambda k: order[self.info(k).file])}
        return {k: out[k] for k in keys}

    def iter_tensors(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) shard by shard (each shard opened once), for `keys` or all tensors."""
        order = {f: i for i, f in enumerate(self.files)}
        names = list(self._infos) if keys is None else list(keys)
        for k in sorted(names, key=lambda k: order[self.info(k).file]):
            yield k, self.get(k)

    def _close_locked(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            log.debug("closed shard %s", self._open_path)
        self._handle, self._open_path = None, None

    def close(self) -> None:
        """Close the open shard (tensors already returned stay valid)."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r}, {len(self._infos)} tensors, {len(self.files)} files)"


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # The legacy (non-zip) format cannot be memory-mapped.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return sd


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: malformed JSON: {type(e).__name__}: {str(e)[:200]}") from None
