"""random_row_mask: every backend bit-identical to the reference (and to a scalar transcription of the algorithm),
exact per-row counts, independence of rows, streams and thread count, a statistical check of uniformity, errors."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest
import torch

from nlsr_fast.ops import HOST_OPS, keep_count, random_row_mask, random_row_mask_reference, random_stream
from nlsr_fast.ops import _registry as registry
from nlsr_fast.ops.packed_mask import PackedMask
from nlsr_fast.ops.random_row_mask import host_backend

from ._helpers import DEVICE, assert_mask_well_formed, backends, shape_id

OP = "random_row_mask"
BACKENDS = backends(OP)
M32 = 0xFFFFFFFF
STREAMS = [0, 1, 0x9E3779B9, M32]

# Awkward widths around a byte (1, 7, 8, 9), the n = 160 of docs/algorithm.md §3, a wide row, and rows of a 70B LoRA
# B / MLP width.
SHAPES = [(1, 1), (5, 1), (3, 7), (4, 8), (6, 9), (37, 160), (13, 1000), (3, 28672), (300, 128)]


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _floyd_scalar(rows: int, n: int, k: int, stream: int) -> torch.Tensor:
    """The algorithm of the op's docstring in plain Python ints, one row and one step at a time (a second,
    independent transcription: the reference works on int64 tensors with split multiplications)."""
    out = torch.zeros(rows, n, dtype=torch.bool)
    for i in range(rows):
        key = _mix32(stream ^ _mix32(i))
        chosen: set[int] = set()
        for t in range(k):
            j = n - k + t
            r = (_mix32((key + t * 0x9E3779B9) & M32) * (j + 1)) >> 32
            chosen.add(j if r in chosen else r)
        out[i, sorted(chosen)] = True
    return out


def _assert_same_bits(name: str, got: PackedMask, want: PackedMask) -> None:
    assert_mask_well_formed(name, got, tuple(want.shape), want.device)
    bad = (got.to_bool() != want.to_bool()).nonzero()
    assert not bad.numel(), f"{name}: {bad.shape[0]} entries differ from the reference; first {bad[:5].tolist()}"


def _check(backend: str, shape: tuple[int, int], keep: float, stream: int, k: int | None = None) -> PackedMask:
    kk = keep_count(shape[1], keep) if k is None else k
    mask = random_row_mask(shape, keep, stream, k=k, backend=backend)
    _assert_same_bits(f"{OP}[{backend}] {shape_id(shape)} k={kk} stream={stream}", mask,
                      random_row_mask_reference(shape, kk, stream))
    counts = mask.row_counts()
    assert counts.tolist() == [kk] * shape[0], f"{OP}[{backend}]: rows keep {counts.unique().tolist()}, want {kk}"
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("stream", STREAMS, ids=hex)
def test_random_row_mask_matches_reference(backend, shape, stream):
    _check(backend, shape, 0.2, stream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 36, 37])
@pytest.mark.parametrize("stream", [7, M32], ids=hex)
def test_random_row_mask_explicit_k(backend, k, stream):
    """k = 0 and k = n, odd and even k, in a row of a prime width."""
    mask = _check(backend, (29, 37), 0.5, stream, k=k)
    if k == 37:
        assert bool(mask.to_bool().all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "keep, expected", [(0.2, 32), (0.0, 0), (1.0, 160), (0.5, 80), (0.3, 48), (0.01, 2)], ids=lambda v: str(v)
)
def test_random_row_mask_spec_counts_n160(backend, keep, expected):
    """docs/algorithm.md §3: n = 160 at s = 0.8 keeps exactly 32 per row (the count rule of row_topk_mask)."""
    assert keep_count(160, keep) == expected
    mask = _check(backend, (9, 160), keep, 3)
    assert mask.count() == 9 * expected


@pytest.mark.parametrize(
    "shape, k, stream", [((5, 9), 3, 0), ((7, 1000), 201, 12345), ((3, 8), 8, 1), ((6, 64), 63, M32), ((4, 13), 0, 7)]
)
def test_random_row_mask_reference_is_the_algorithm(shape, k, stream):
    want = _floyd_scalar(*shape, k, stream)
    got = random_row_mask_reference(shape, k, stream).to_bool()
    assert torch.equal(got, want), f"reference != scalar transcription at {(got != want).nonzero()[:5].tolist()}"


def test_random_row_mask_pinned_bits():
    """The bits for one input, pinned: any change of the algorithm changes every seeded `random` run."""
    assert random_row_mask_reference((4, 10), 3, 12345).bits.tolist() == [[16, 3], [208, 0], [12, 2], [130, 1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_row_mask_rows_do_not_depend_on_the_rows_asked_for(backend):
    """Row i of a (R, n) mask is row i of a (R2, n) mask: rows are drawn independently."""
    small = random_row_mask((7, 301), 0.2, 99, backend=backend).to_bool()
    big = random_row_mask((500, 301), 0.2, 99, backend=backend).to_bool()
    assert torch.equal(small, big[:7])


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_row_mask_streams_differ(backend):
    masks = [random_row_mask((16, 128), 0.2, s, backend=backend).to_bool() for s in (0, 1, 2, 1 << 31)]
    for (i, a), (j, b) in itertools.combinations(enumerate(masks), 2):
        assert not torch.equal(a, b), f"streams {i} and {j} give the same mask"
    # No row repeats within a mask either (C(128, 26) subsets: a repeat means the row key is broken).
    rows = {bytes(r.numpy().tobytes()) for r in masks[0]}
    assert len(rows) == 16


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ extension")
def test_random_row_mask_cpu_independent_of_thread_count(restore_threads):
    """Rows split over 1, 2 and 5 OpenMP threads give the reference's bits (3001 x 203 at k = 41 is enough work for
    the kernel to go parallel). torch and nlsr_fast._C share libgomp, so torch.set_num_threads sets both."""
    C = registry.require_cpp()
    want = random_row_mask_reference((3001, 203), 41, 0xC0FFEE)
    for threads in (1, 2, 5):
        torch.set_num_threads(threads)
        assert C.num_threads() == threads
        _assert_same_bits(f"{OP}[cpu] {threads} threads", random_row_mask((3001, 203), 0.2, 0xC0FFEE, backend="cpu"),
                          want)


def _uniformity_problems(m: torch.Tensor, other: torch.Tensor, k: int) -> list[str]:
    """What is off, beyond 6 standard deviations, in a (rows, n) bool mask of k-subsets (and `other`, the same under
    the next stream) for uniformly random, independent k-subsets: each column is kept in k/n of the rows, each pair
    of columns together in k(k-1)/(n(n-1)), and consecutive rows (and a row under consecutive streams) overlap by
    k^2/n on average. A chance failure is about 1e-5 at most, all checks together."""
    rows, n = m.shape
    m, other = m.double(), other.double()
    problems = []
    p = k / n
    worst = float((m.sum(0) - rows * p).abs().max())
    if worst > 6 * (rows * p * (1 - p)) ** 0.5:
        problems.append(f"a column is kept {worst:.0f} times away from {rows * p:.0f}")
    q = k * (k - 1) / (n * (n - 1))
    pairs = (m.T @ m)[torch.triu_indices(n, n, 1).unbind()]
    worst = float((pairs - rows * q).abs().max())
    if worst > 6 * (rows * q * (1 - q)) ** 0.5:
        problems.append(f"a column pair co-occurs {worst:.0f} times away from {rows * q:.0f}")
    # Overlap of two independent k-subsets of n: hypergeometric, mean k^2/n, variance k p (1-p) (n-k)/(n-1).
    mean, var = k * p, k * p * (1 - p) * (n - k) / (n - 1)
    for what, overlap, count in (("consecutive rows", (m[1:] * m[:-1]).sum(), rows - 1),
                                 ("consecutive streams", (m * other).sum(), rows)):
        if abs(float(overlap) - count * mean) > 6 * (count * var) ** 0.5:
            problems.append(f"{what} overlap {float(overlap):.0f} times, expected {count * mean:.0f}")
    return problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_row_mask_is_uniform(backend):
    """4000 rows of n = 64, k = 16 pass the checks of _uniformity_problems."""
    rows, n, k = 4000, 64, 16
    m = random_row_mask((rows, n), 0.5, 2024, k=k, backend=backend).to_bool()
    other = random_row_mask((rows, n), 0.5, 2025, k=k, backend=backend).to_bool()
    assert _uniformity_problems(m, other, k) == []


def test_uniformity_check_catches_broken_samplers():
    """The statistical check has teeth: samplers with the right counts but the wrong distribution fail it."""
    rows, n, k = 4000, 64, 16
    good = random_row_mask_reference((rows, n), k, 2024).to_bool()
    other = random_row_mask_reference((rows, n), k, 2025).to_bool()
    assert _uniformity_problems(good, other, k) == []
    same_row = good[:1].expand(rows, n)  # the row key ignores the row
    start = torch.randint(0, n, (rows, 1))  # k consecutive columns from a random start (uniform column counts)
    block = torch.zeros(rows, n, dtype=torch.bool).scatter_(1, (start + torch.arange(k)) % n, True)
    low = torch.zeros(rows, n, dtype=torch.bool)  # Floyd with r = j always: the last k columns
    low[:, n - k:] = True
    for name, bad in (("same row", same_row), ("block", block), ("last k", low)):
        assert _uniformity_problems(bad, other, k), f"{name} sampler passed the uniformity check"
    assert _uniformity_problems(good, good, k)  # the stream is ignored


def test_random_row_mask_default_is_fastest_host_backend():
    assert registry.select(OP, DEVICE) is registry._TABLE[OP][registry.available(OP, DEVICE)[0]]
    assert random_row_mask((5, 33), 0.2, 1).equal(random_row_mask_reference((5, 33), keep_count(33, 0.2), 1))


def test_random_row_mask_has_no_triton_backend_by_design():
    assert OP in HOST_OPS and "no tensor input" in HOST_OPS[OP]
    assert registry.Backend.TRITON not in registry._TABLE[OP]
    with pytest.raises(RuntimeError, match=f"{OP}.*'triton'"):
        random_row_mask((3, 8), 0.5, 0, backend="triton")


def test_random_row_mask_device_gets_the_host_bits():
    """Any device: the mask is made on the host and its bits moved (meta stands in for a GPU here)."""
    mask = random_row_mask((6, 40), 0.2, 5, device="meta")
    assert mask.device == torch.device("meta") and mask.shape == (6, 40) and mask.bits.shape == (6, 5)
    assert random_row_mask((6, 40), 0.2, 5, device="cpu").equal(random_row_mask((6, 40), 0.2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_random_row_mask_on_cuda_equals_host_and_reference_on_cuda():
    shape, k = (300, 1001), keep_count(1001, 0.2)
    got = random_row_mask(shape, 0.2, 77, device="cuda")
    assert got.device.type == "cuda"
    assert torch.equal(got.bits.cpu(), random_row_mask_reference(shape, k, 77).bits)
    # The reference itself also runs on the GPU, with the same bits.
    assert torch.equal(random_row_mask_reference(shape, k, 77, device="cuda").bits.cpu(), got.bits.cpu())


def test_host_backend_maps_a_run_wide_triton_to_the_host(monkeypatch):
    fastest = registry.available(OP, DEVICE)[0].value
    assert host_backend("triton") == fastest
    assert host_backend("reference") == "reference" and host_backend("cpu") == "cpu"
    assert host_backend(None) is None
    monkeypatch.setenv("NLSR_FAST_BACKEND", "triton")
    assert host_backend(None) == fastest
    monkeypatch.setenv("NLSR_FAST_BACKEND", "reference")
    assert host_backend(None) is None  # the env request then applies as usual


def test_random_stream():
    assert random_stream(0, "x") == 634768859  # pinned: streams are part of every seeded `random` run
    assert random_stream(0, "x") == int.from_bytes(hashlib.sha256(b"0:x").digest()[:4], "little")
    keys = [random_stream(s, f"m.lora_{w}") for s in (0, 1, 42) for w in "AB"]
    assert len(set(keys)) == len(keys) and all(0 <= v <= M32 for v in keys)


# --- error paths: ValueError with the values in the message --------------------------------------------------------


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), (3.0, 4), (-1, 4), (True, 4), "3x4", (3, 2**32)], ids=str)
def test_random_row_mask_rejects_bad_shape(shape):
    with pytest.raises(ValueError, match="shape"):
        random_row_mask(shape, 0.5, 0)


@pytest.mark.parametrize("keep", [-0.1, 1.5, float("nan"), "0.2"], ids=str)
def test_random_row_mask_rejects_keep_outside_unit_interval(keep):
    with pytest.raises(ValueError, match=re.escape(repr(keep))):
        random_row_mask((3, 4), keep, 0)


@pytest.mark.parametrize("stream", [-1, 2**32, 1.0, True, None], ids=str)
def test_random_row_mask_rejects_bad_stream(stream):
    with pytest.raises(ValueError, match=re.escape(f"got {stream!r}")):
        random_row_mask((3, 4), 0.5, stream)


@pytest.mark.parametrize("k", [-1, 5, 2.0])
def test_random_row_mask_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match=rf"\[0, 4\].*{re.escape(repr(k))}"):
        random_row_mask((3, 4), 0.5, 0, k=k)


def test_random_row_mask_result_is_packed_mask_on_cpu_by_default():
    mask = random_row_mask((3, 9), 0.5, 0)
    assert isinstance(mask, PackedMask) and mask.shape == (3, 9) and mask.device == DEVICE


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_row_mask_empty_shapes(backend):
    for shape in ((0, 5), (4, 0), (0, 0)):
        mask = random_row_mask(shape, 0.2, 1, backend=backend)
        assert mask.shape == shape and mask.count() == 0
