"""BackgroundHasher: input files hashed from read_tensor's own reads (gaps and the rest read by the worker)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nlsr_fast.io import hashing, read_header
from nlsr_fast.io._format import TensorInfo
from nlsr_fast.io.hashing import BackgroundHasher
from nlsr_fast.io.stream import read_tensor


def _make(path: Path, sizes: list[int], seed: int = 0) -> list[TensorInfo]:
    """A safetensors file of uint8 tensors t000, t001, ... (names sort as the file order); its infos in file order."""
    g = torch.Generator().manual_seed(seed)
    save_file({f"t{i:03d}": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for i, n in enumerate(sizes)},
              os.fspath(path))
    infos = sorted(read_header(path)[0].values(), key=lambda i: i.start)
    assert [i.nbytes for i in infos] == sizes
    return infos


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _check(h: BackgroundHasher, *paths: Path) -> dict[Path, dict]:
    recs = h.records()
    for p in paths:
        assert recs[p] == {"path": str(p), "size": p.stat().st_size, "sha256": _sha(p)}
    return recs


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    left = [f for fs in list(hashing._registry.values()) for f in fs]
    hashing._cancel(left)  # so that one failure does not fail the tests after it
    assert not left, "a hasher stayed registered"
    assert hashing._held == 0, "offered bytes were not released"


SIZES = [1000, 7, 65536, 1, 300_001, 4096, 12_345]


@pytest.fixture(params=["small_gaps_inline", "worker_only"])
def small_gap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Both ways a read that does not continue the hash is handled: a small gap before it read by the reading thread
    (the default), or every such read held for the worker (SMALL_GAP 0)."""
    if request.param == "worker_only":
        monkeypatch.setattr(hashing, "SMALL_GAP", 0)
    return hashing.SMALL_GAP


def test_in_order_reads_are_hashed_from_memory(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    for info in infos:
        read_tensor(info)
    _check(h, p)
    # The second pass is gone: the hasher read the header alone, every tensor byte came from read_tensor, hashed
    # as it was read.
    assert h.bytes_read == _header(p)
    assert h.bytes_offered == sum(SIZES) and h.bytes_deferred == 0


@pytest.mark.parametrize(("order", "chunk"), [
    pytest.param([0, 2, 4, 6], {"chunk": 5}, id="skipped-tensors-chunked-worker"),
    pytest.param([3, 0, 6, 1, 5, 2, 4], {}, id="out-of-order"),
])
def test_skipped_or_out_of_order_reads(tmp_path: Path, small_gap: int, order: list[int], chunk: dict[str, int]) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p], **chunk)
    for i in order:
        read_tensor(infos[i])
    _check(h, p)
    assert h.bytes_read + h.bytes_offered == p.stat().st_size


def test_reverse_reads(tmp_path: Path, small_gap: int) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    for info in reversed(infos):
        read_tensor(info)
    _check(h, p)
    assert h.bytes_read + h.bytes_offered == p.stat().st_size
    assert h.bytes_offered >= SIZES[0]  # the last read (t000) continues the hash, at least
    if small_gap == 0:
        assert h.bytes_deferred >= SIZES[-1]  # the first read (t006) was held for the worker


def test_re_reads_are_ignored(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    for info in infos + infos + infos[2:4]:
        read_tensor(info)
    _check(h, p)
    assert h.bytes_read == _header(p)
    assert h.bytes_offered == sum(SIZES)


def test_skipped_tensors_are_read_once_by_the_worker(tmp_path: Path, small_gap: int) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    read = [infos[i] for i in (1, 2, 5)]
    for info in read:
        read_tensor(info)
    _check(h, p)
    assert h.bytes_offered == sum(i.nbytes for i in read)
    assert h.bytes_read == p.stat().st_size - h.bytes_offered


def test_partial_overlaps_and_straddles(tmp_path: Path, small_gap: int) -> None:
    p = tmp_path / "a.safetensors"
    (info,) = _make(p, [10_000])
    h = BackgroundHasher([p])
    for start, end in [(0, 100), (50, 150), (120, 300), (290, 295), (299, 5000), (4000, 4001), (6000, 7000),
                       (5500, 9000), (0, 10_000)]:
        t = read_tensor(dataclasses.replace(info, shape=(end - start,), start=start, end=end))
        assert t.numel() == end - start
    _check(h, p)
    assert h.bytes_read + h.bytes_offered == p.stat().st_size


def test_no_reads(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    _make(p, SIZES)
    q = tmp_path / "calibration.jsonl"
    q.write_bytes(b'{"prompt": "a", "response": "b"}\n' * 1000)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    h = BackgroundHasher([p, q, empty])
    _check(h, p, q, empty)
    assert h.bytes_read == p.stat().st_size + q.stat().st_size and h.bytes_offered == 0


def test_known_digests_are_recorded_without_a_read(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    _make(p, SIZES)
    q = tmp_path / "blob"
    q.write_bytes(b"x" * 1000)
    h = BackgroundHasher([p, q], known={q: "f" * 64})  # not q's sha256: only the given digest can be recorded
    rec = h.records()
    assert rec[q] == {"path": str(q), "size": 1000, "sha256": "f" * 64}
    assert rec[p]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert h.bytes_read == p.stat().st_size  # q was never read


def test_tiny_cap_makes_the_worker_read_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hashing, "OFFER_CAP", 3)
    monkeypatch.setattr(hashing, "SMALL_GAP", 0)
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    for info in reversed(infos):  # each read but the last lies beyond the hash: offered, and refused over the cap
        read_tensor(info)
    _check(h, p)
    assert h.bytes_deferred <= 1  # only the 1-byte tensor fits under a 3-byte cap
    assert h.bytes_offered - h.bytes_deferred in (0, SIZES[0])  # t000, last, may continue the hash
    assert h.bytes_read == p.stat().st_size - h.bytes_offered


def test_many_files_in_parallel(tmp_path: Path, small_gap: int) -> None:
    paths, infos = [], []
    for k in range(12):
        p = tmp_path / f"shard{k}.safetensors"
        infos.append(_make(p, [s + k for s in SIZES], seed=k))
        paths.append(p)
    h = BackgroundHasher(paths)
    errors: list[BaseException] = []

    def reader(which: list[int]) -> None:
        try:
            for k in which:
                for info in infos[k]:
                    read_tensor(info)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(list(range(j, 12, 3)),)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    _check(h, *paths)
    assert h.bytes_read == sum(_header(p) for p in paths)


def test_two_threads_reading_one_file(tmp_path: Path, small_gap: int) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, [70_000 + 13 * i for i in range(40)])
    h = BackgroundHasher([p])
    threads = [threading.Thread(target=lambda part=part: [read_tensor(i) for i in part])
               for part in (infos[:20], infos[20:])]  # the second thread runs ahead of the hash: held or read later
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _check(h, p)
    assert h.bytes_read + h.bytes_offered == p.stat().st_size


def test_unregistered_files_are_untouched(tmp_path: Path) -> None:
    p, q = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    infos_p, infos_q = _make(p, SIZES), _make(q, SIZES, seed=1)
    h = BackgroundHasher([p])
    for info in infos_q + infos_p:
        read_tensor(info)
    assert set(_check(h, p)) == {p}
    assert h.bytes_offered == sum(SIZES)
    assert not hashing._registry  # unregistered after records(): reads offer nothing any more
    fd = os.open(p, os.O_RDONLY)
    try:
        assert hashing.hasher_of(fd) is None
    finally:
        os.close(fd)
    read_tensor(infos_p[0])


def test_same_file_under_two_names(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    link = tmp_path / "link.safetensors"
    link.symlink_to(p)
    h = BackgroundHasher([p, link, p])
    assert h.paths == [p, link]
    for info in infos:
        read_tensor(info)
    recs = h.records()
    assert recs[p]["sha256"] == recs[link]["sha256"] == _sha(p) and recs[link]["path"] == str(link)
    assert h.bytes_read + h.bytes_offered == p.stat().st_size  # hashed once


def test_missing_file_raises_naming_it(tmp_path: Path) -> None:
    p, gone = tmp_path / "a.safetensors", tmp_path / "gone.safetensors"
    _make(p, SIZES)
    _make(gone, SIZES)
    gone.unlink()
    h = BackgroundHasher([p, gone])
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        h.records()


def test_file_shorter_than_its_reads_raises_naming_it(tmp_path: Path, small_gap: int) -> None:
    p = tmp_path / "short.bin"
    p.write_bytes(b"x" * 100)
    h = BackgroundHasher([p])
    fd = os.open(p, os.O_RDONLY)
    try:
        # Bytes "read" beyond EOF (the file changed during the run), handed over as read_tensor does: the reading
        # thread takes the hash when the gap before them is small (it reads the gap), else the worker gets them.
        hasher, data = hashing.hasher_of(fd), memoryview(b"y" * 10)
        assert hasher is not None
        if hasher.claim(1000, len(data)):
            hasher.update(1000, data)
            hasher.release()
        else:
            hasher.offer(1000, data)
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match=r"short\.bin: the file ends at byte 100"):
        h.records()


def test_close_without_records_releases_everything(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    infos = _make(p, SIZES)
    h = BackgroundHasher([p])
    read_tensor(infos[-1])  # beyond a gap: possibly still held when close() comes
    with h:
        pass
    h.close()


def test_records_is_idempotent(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    _make(p, SIZES)
    h = BackgroundHasher([p])
    assert h.records() == h.records()
    with pytest.raises(ValueError, match="chunk must be positive"):
        BackgroundHasher([p], chunk=0)
