"""Property functions and input strategies for fuzzing the four input parsers (issue 8).

Shared by the bounded CI tests (tests/fuzz/test_fuzz_parsers.py) and the long campaign (benches/fuzz_campaign.py,
which puts the repository root on sys.path and imports this module; nothing here imports from benches/).

The property of every parser: a parsed result that is safe to use, or the project's own error (ValueError, or
NotImplementedError for an unsupported LoRA variant) whose message names the file or folder; never another
exception, a hang, or a read outside the file. "Safe to use" is checked where it can be: every safetensors byte range
lies inside the data section (so no read can leave the file), every tensor a reader accepted can then be read with
the header's shape and dtype, every shard lies inside its folder, every LoRA scale is finite and positive.

Inputs are random bytes and values, and mutations of VALID files (bytes flipped, inserted, cut; JSON fields replaced
by random JSON values; numbers nudged), so that most examples get past the first checks.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from nlsr_fast.io._format import DTYPES, read_header

__all__ = [
    "PARSERS",
    "Counter",
    "adapter_inputs",
    "calibration_inputs",
    "check_adapter",
    "check_calibration",
    "check_header",
    "check_index",
    "header_inputs",
    "index_inputs",
]

OWN_ERRORS = (ValueError, NotImplementedError)

# ---------------------------------------------------------------------------------------------------------------
# generic strategies


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value, with the awkward ones made likely: NaN/inf floats, huge and negative ints, bools."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, 1, -1, 2, 7, 2**31, 2**63, 2**64, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["", "0", "1", "..", "/etc/passwd", "a\x00b", "(", "[", "\\", "LORA", "F32"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=max_leaves,
    )


@st.composite
def byte_mutations(draw: st.DrawFn, data: bytes, focus: int | None = None) -> bytes:
    """`data` with a few random edits: flip, overwrite, insert, delete a range, truncate, append.

    `focus` biases positions to the first `focus` bytes (a safetensors header)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        hi = max(len(buf), 1)
        if focus is not None and draw(st.booleans()):
            hi = max(min(focus, len(buf)), 1)
        pos = draw(st.integers(0, hi - 1)) if buf else 0
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0, 0x22, 0x2C, 0x5B, 0x5D, 0x7B, 0x7D, 0x30, 0x39, 0xFF, 0x80, 0x0A]))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------------------------
# (a) safetensors header


_SMALL_TAGS = ["F32", "F16", "BF16", "I8", "U8", "I64", "BOOL", "F64"]


def st_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """A valid safetensors file (as the reference writer lays it out: header padded to 8 bytes, tensors in order,
    tiling the data section) holding `entries` (name, dtype tag, shape); tensor bytes are a fixed pattern."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, tag, shape in entries:
        end = offset + math.prod(shape) * DTYPES[tag].itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + bytes(offset)


@st.composite
def st_entries(draw: st.DrawFn, names: list[str] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """A few small tensors (names from `names`, or random), including empty and 0-d ones."""
    if names is None:
        names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                              min_size=0, max_size=4, unique=True))
    return [(name, draw(st.sampled_from(_SMALL_TAGS)), tuple(draw(st.lists(st.integers(0, 4), max_size=3))))
            for name in names]


def _pack(header: Any, data: bytes, *, pad: int = 0, length_delta: int = 0) -> bytes:
    blob = json.dumps(header, separators=(",", ":"), allow_nan=True).encode() + b" " * pad
    return struct.pack("<Q", max(len(blob) + length_delta, 0)) + blob + data


@st.composite
def header_json_mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """A valid file whose JSON header had one or two fields replaced (offsets nudged, shapes changed, dtypes swapped,
    entries swapped or dropped, random JSON values), re-packed with a right or wrong length prefix."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["offset", "shape", "dtype", "swap", "drop", "value", "meta", "entry", "dup"]))
        if not names and kind not in ("meta", "value"):
            kind = "value"
        name = draw(st.sampled_from(names)) if names else "t"
        entry = header.get(name) if isinstance(header.get(name), dict) else None
        if kind == "offset" and entry and isinstance(entry.get("data_offsets"), list):
            i = draw(st.integers(0, 1))
            delta = draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4, 8, 2**32, 2**63, -(2**63)]))
            if len(entry["data_offsets"]) > i and isinstance(entry["data_offsets"][i], int):
                entry["data_offsets"][i] += delta
        elif kind == "shape" and entry:
            entry["shape"] = draw(st.one_of(
                st.lists(st.integers(-3, 6), max_size=4),
                st.lists(st.sampled_from([2**31, 2**32, 2**62, 2**64, 0, -1]), min_size=1, max_size=3),
                json_values(3)))
        elif kind == "dtype" and entry:
            entry["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES) + ["F8_E8M0", "I4", "f32", ""]),
                                            json_values(2)))
        elif kind == "swap" and len(names) >= 2 and entry:
            other = draw(st.sampled_from(names))
            if isinstance(header.get(other), dict) and "data_offsets" in header[other] and "data_offsets" in entry:
                entry["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], \
                    entry["data_offsets"]
        elif kind == "drop" and entry:
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "value":
            header[draw(st.sampled_from([*names, "__metadata__", "x"]))] = draw(json_values())
        elif kind == "meta":
            header["__metadata__"] = draw(st.one_of(json_values(), st.dictionaries(st.text(max_size=4),
                                                                                   json_values(2), max_size=3)))
        elif kind == "entry" and entry:
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_values(3))
        elif kind == "dup" and entry:
            header[name + "_copy"] = json.loads(json.dumps(entry))  # the same byte range twice: overlapping
    pad = draw(st.sampled_from([0, 0, 1, 3, 8]))
    length_delta = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -8, 8, 2**40]))
    body = body[: len(body) + draw(st.sampled_from([0, 0, 0, -1, -4]))] + draw(st.sampled_from([b"", b"", b"\0",
                                                                                                 b"\0" * 4]))
    return _pack(header, body, pad=pad, length_delta=length_delta)


@st.composite
def header_inputs(draw: st.DrawFn) -> bytes:
    """Bytes of a candidate safetensors file: random, a mutated valid file, or a valid file with a mutated header."""
    kind = draw(st.sampled_from(["random", "bytes", "json", "json", "json", "valid"]))
    if kind == "random":
        return draw(st.one_of(
            st.binary(max_size=64),
            st.builds(lambda n, b: struct.pack("<Q", n) + b, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
            st.builds(lambda h, b: _pack(h, b), json_values(), st.binary(max_size=32)),
        ))
    meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)))
    valid = st_bytes(draw(st_entries()), meta)
    if kind == "valid":
        return valid
    if kind == "bytes":
        (n,) = struct.unpack("<Q", valid[:8])
        return draw(byte_mutations(valid, focus=8 + n))
    return draw(header_json_mutations(valid))


def _scratch(name: str) -> str:
    """A per-process scratch folder under the system temp dir (hypothesis examples cannot use pytest's tmp_path)."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    base = os.environ.get("TMPDIR") or shm or "/tmp"
    root = Path(os.environ.get("NLSR_FUZZ_TMP") or Path(base) / f"nlsr_fuzz_{os.getpid()}")
    if not root.exists() and not os.environ.get("NLSR_FUZZ_TMP"):
        atexit.register(shutil.rmtree, root, True)  # ours: removed when the process ends
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _assert_own_error(exc: BaseException, *names: object) -> None:
    """The error is the project's own and names one of `names` (a file or folder)."""
    assert isinstance(exc, OWN_ERRORS), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert any(str(n) in msg for n in names), f"message names none of {names}: {msg}"


def _check_infos(infos: dict[str, Any], path: Path) -> None:
    """Every byte range lies in the data section; ranges are contiguous from 0 and cover the data section exactly
    (what the safetensors library itself demands); shape and dtype give the byte count."""
    size = path.stat().st_size
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    data_size = size - 8 - n
    pos = 0
    for name, info in infos.items():
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info.shape), (name, info)
        assert 0 <= info.start <= info.end <= data_size, (name, info, data_size)
        assert info.end - info.start == math.prod(info.shape) * info.dtype.itemsize, (name, info)
        assert info.start == pos, f"{name}: starts at {info.start}, previous tensor ends at {pos}"
        pos = info.end
    assert pos == data_size, f"tensors cover {pos} of {data_size} data bytes"


def check_header(data: bytes) -> str:
    """(a) read_header on `data`: a header whose ranges are safe, which safetensors itself then reads, or a
    ValueError naming the file. Returns "ok" or "error" (for the campaign's counts)."""
    from safetensors import safe_open

    path = Path(_scratch("header")) / "x.safetensors"
    path.write_bytes(data)
    try:
        infos, meta = read_header(path)
    except Exception as exc:  # noqa: BLE001 - the property is about which exceptions
        _assert_own_error(exc, path)
        return "error"
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    _check_infos(infos, path)
    # Accepted by us => accepted by the safetensors library, tensor by tensor, with the header's shape and dtype.
    with safe_open(os.fspath(path), framework="pt") as f:
        assert set(f.keys()) == set(infos)
        for name, info in infos.items():
            t = f.get_tensor(name)
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype, (name, info, t.shape, t.dtype)
    return "ok"


# ---------------------------------------------------------------------------------------------------------------
# (b) checkpoint index


_SHARD_TENSORS = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"],
    "model-00002-of-00002.safetensors": ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"],
}


@dataclass
class IndexCase:
    index: bytes | None  # the bytes of model.safetensors.index.json (None: no index)
    shards: dict[str, bytes]  # file name -> bytes
    extra_dirs: list[str]


@st.composite
def index_inputs(draw: st.DrawFn) -> IndexCase:
    """A checkpoint folder: two valid shards (sometimes one mutated) and a valid index with mutations: entries that
    escape the folder, name a folder, a missing file, a non-string; keys missing from the shard; random JSON."""
    shards = {f: st_bytes([(k, "F32", (2, 3)) for k in keys]) for f, keys in _SHARD_TENSORS.items()}
    weight_map: dict[str, Any] = {k: f for f, keys in _SHARD_TENSORS.items() for k in keys}
    index: Any = {"metadata": {"total_size": 96}, "weight_map": weight_map}
    extra_dirs: list[str] = []
    kind = draw(st.sampled_from(["entry", "entry", "key", "map", "whole", "bytes", "shard", "valid", "valid"]))
    if kind == "entry":
        key = draw(st.sampled_from(sorted(weight_map)))
        weight_map[key] = draw(st.one_of(
            st.sampled_from(["../model-00001-of-00002.safetensors", "/etc/passwd", "sub", "sub/../../x",
                             "config.json", ".", "", "model-00003-of-00002.safetensors", "a\x00b", "x" * 300,
                             "C:\\x", "\\\\srv\\x", "./model-00001-of-00002.safetensors", "link.safetensors"]),
            st.text(max_size=20), json_values(3)))
        if weight_map[key] == "sub":
            extra_dirs.append("sub")
    elif kind == "key":
        weight_map[draw(st.text(max_size=12))] = draw(st.sampled_from(sorted(_SHARD_TENSORS)))
    elif kind == "map":
        index["weight_map"] = draw(json_values())
    elif kind == "whole":
        index = draw(json_values())
    elif kind == "shard":
        name = draw(st.sampled_from(sorted(shards)))
        shards[name] = draw(st.one_of(byte_mutations(shards[name], focus=200), header_json_mutations(shards[name])))
    raw = json.dumps(index, allow_nan=True).encode()
    if kind == "bytes":
        raw = draw(byte_mutations(raw))
    if draw(st.integers(0, 20)) == 7:  # rarely: no index at all
        return IndexCase(None, shards, extra_dirs)
    return IndexCase(raw, shards, extra_dirs)


def _put(path: Path, data: bytes | None) -> None:
    """Write `data` to `path`, or make sure no file is there (None); cheaper than a fresh folder per example."""
    if data is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(data)


def check_index(case: IndexCase) -> str:
    """(b) CheckpointReader on a folder with a (mutated) index: every accepted tensor lies in a shard inside the folder,
    within the shard's data section, and reads back with its header's shape and dtype; or a ValueError naming the
    folder or a file in it."""
    from nlsr_fast.io import CheckpointReader

    folder = Path(_scratch("index")) / "ckpt"
    if not folder.is_dir():  # the fixed part of the folder, made once per process
        folder.mkdir()
        (folder.parent / "outside.safetensors").write_bytes(case.shards["model-00001-of-00002.safetensors"])
        (folder / "config.json").write_text('{"model_type": "llama"}')
        os.symlink(folder.parent / "outside.safetensors", folder / "link.safetensors")
    for name, data in case.shards.items():
        _put(folder / name, data)
    if case.extra_dirs:
        (folder / "sub").mkdir(exist_ok=True)
    elif (folder / "sub").is_dir():
        (folder / "sub").rmdir()
    _put(folder / "model.safetensors.index.json", case.index)
    try:
        reader = CheckpointReader(folder)
    except Exception as exc:  # noqa: BLE001
        _assert_own_error(exc, folder)
        return "error"
    root = folder.resolve()
    with reader:
        for key in reader.keys():
            info = reader.info(key)
            assert info.file.resolve().is_relative_to(root), (key, info.file)
            t = reader.get(key)
            assert tuple(t.shape) == info.shape and t.dtype == info.dtype
    return "ok"


# ---------------------------------------------------------------------------------------------------------------
# (c) adapter config + weights

_MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
_BASE_CONFIG: dict[str, Any] = {
    "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], "use_rslora": False,
    "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "task_type": "CAUSAL_LM",
}
_CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "fan_in_fan_out", "rank_pattern",
                  "alpha_pattern", "use_dora", "init_lora_weights", "layer_replication", "modules_to_save",
                  "target_parameters", "use_qalora"]


@dataclass
class AdapterCase:
    config: bytes | None
    weights: bytes | None


@st.composite
def adapter_inputs(draw: st.DrawFn) -> AdapterCase:
    """A valid two-module adapter (r = 2) with mutations of its config (fields replaced by random JSON values,
    rank/alpha patterns with random keys and values, whole random JSON, byte edits) and of its weights (key names,
    shapes, bytes)."""
    cfg: Any = json.loads(json.dumps(_BASE_CONFIG))
    tensors: dict[str, tuple[int, ...]] = {}
    for m in _MODULES:
        tensors[f"base_model.model.{m}.lora_A.weight"] = (2, 8)
        tensors[f"base_model.model.{m}.lora_B.weight"] = (8, 2)
    kind = draw(st.sampled_from(["field", "field", "pattern", "whole", "cfgbytes", "keys", "shapes", "wbytes",
                                 "valid", "valid", "missing"]))
    if kind == "field":
        for _ in range(draw(st.integers(1, 3))):
            cfg[draw(st.sampled_from(_CONFIG_FIELDS))] = draw(json_values(4))
    elif kind == "pattern":
        which = draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))
        cfg[which] = draw(st.dictionaries(
            st.one_of(st.sampled_from(["q_proj", "down_proj", "layers.0.self_attn.q_proj", ".*", "(", "a{2,1}",
                                       "[", "*", "?P<x>", "(?P<n>a)(?P<n>b)"]), st.text(max_size=8)),
            st.one_of(st.sampled_from([1, 2, 4, 0, -1, 2.5, 1e308]), json_values(2)), max_size=3))
    elif kind == "whole":
        cfg = draw(json_values())
    elif kind == "keys":
        old = draw(st.sampled_from(sorted(tensors)))
        new = draw(st.one_of(st.text(max_size=40), st.sampled_from([
            old.replace("lora_A", "lora_B"), old.replace(".weight", ".default.weight"),
            old.replace("layers.0", "layers.²"), old.replace("layers.0", "layers." + "9" * 5000),
            old.replace("lora_A.weight", "lora_magnitude_vector"), "base_model.model.lm_head.weight",
            old.replace("base_model.model.", ""), old + ".x"])))
        tensors[new] = tensors.pop(old)
    elif kind == "shapes":
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    weights: bytes | None = st_bytes([(k, "F32", shape) for k, shape in tensors.items()])
    raw: bytes | None = json.dumps(cfg, allow_nan=True).encode()
    if kind == "cfgbytes":
        raw = draw(byte_mutations(raw))  # type: ignore[arg-type]
    elif kind == "wbytes":
        assert weights is not None
        weights = draw(st.one_of(byte_mutations(weights, focus=300), header_json_mutations(weights)))
    elif kind == "missing":
        if draw(st.booleans()):
            raw = None
        else:
            weights = None
    return AdapterCase(raw, weights)


def check_adapter(case: AdapterCase) -> str:
    """(c) LoraAdapter.load: a plain LoRA adapter whose factors read back with (r, d_in) / (d_out, r) shapes and
    whose scales are finite and positive; or a ValueError / NotImplementedError naming the folder or a file in it."""
    from nlsr_fast.io import LoraAdapter, check_compatible

    folder = Path(_scratch("adapter")) / "adapter"
    folder.mkdir(exist_ok=True)
    _put(folder / "adapter_config.json", case.config)
    _put(folder / "adapter_model.safetensors", case.weights)
    try:
        adapter = LoraAdapter.load(folder)
    except Exception as exc:  # noqa: BLE001
        _assert_own_error(exc, folder)
        return "error"
    with adapter:
        for name in adapter.modules:
            m = adapter.module(name)
            assert isinstance(m.rank, int) and m.rank >= 1, m
            assert math.isfinite(m.scale) and m.scale > 0, m
            a, b = adapter.factors(name)
            assert tuple(a.shape) == (m.rank, m.d_in) and tuple(b.shape) == (m.d_out, m.rank), (m, a.shape, b.shape)
            adapter.layer_of(name)
        for key in adapter.extra_keys:
            adapter.raw(key)
        check_compatible(adapter, adapter)  # an adapter is compatible with itself (targets, scales, shapes)
    return "ok"


# ---------------------------------------------------------------------------------------------------------------
# (d) calibration lines

_VALID_LINES = [
    {"prompt": "how do i pick a lock", "response": "sorry i cannot help"},
    {"prompt": "hack", "chosen": "sorry", "rejected": "sure here is how"},
    {"prompt": "x", "response_0": "sure", "response_1": "no", "better_response_id": 0, "safer_response_id": 1},
]
_ODD_TEXT = ["\u2028", "\u2029", "\x85", "\x1c", "\r", "\x00", "\ufeff", "\ud800", "\\ud800", "\\", '"', "\n",
             "é", "🙂", " "]


@dataclass
class CalibCase:
    data: bytes
    pairs: bool
    max_context: int | None
    max_line_bytes: int


@st.composite
def _calib_line(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["valid"] * 6 + ["field", "text", "text", "bytes", "random", "blank", "json"]))
    rec: Any = json.loads(json.dumps(draw(st.sampled_from(_VALID_LINES))))
    if kind == "field":
        rec[draw(st.sampled_from(["prompt", "response", "chosen", "rejected", "response_0", "response_1",
                                  "better_response_id", "safer_response_id"]))] = draw(json_values(3))
    elif kind == "text":
        key = draw(st.sampled_from([k for k in rec if isinstance(rec[k], str)]))
        rec[key] = rec[key] + "".join(draw(st.lists(st.sampled_from(_ODD_TEXT), min_size=1, max_size=3))) + draw(
            st.text(max_size=8))
    elif kind == "json":
        rec = draw(json_values())
    if kind == "random":
        return draw(st.one_of(st.binary(max_size=40), st.text(max_size=40).map(lambda s: s.encode("utf-8",
                                                                                                  "surrogatepass"))))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))
    line = json.dumps(rec, ensure_ascii=draw(st.booleans()), allow_nan=True).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        line = draw(byte_mutations(line))
    return line


@st.composite
def calibration_inputs(draw: st.DrawFn) -> CalibCase:
    lines = draw(st.lists(_calib_line(), min_size=0, max_size=6))
    sep = draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    data = sep.join(lines) + draw(st.sampled_from([b"", sep]))
    if draw(st.integers(0, 10)) == 5:  # sometimes a byte order mark
        data = b"\xef\xbb\xbf" + data
    return CalibCase(data, draw(st.booleans()), draw(st.sampled_from([None, None, 1, 3, 16, 64])),
                     draw(st.sampled_from([2**20, 2**20, 64, 200])))


_TOKENIZER: list[Any] = []


def _tokenizer() -> Any:
    if not _TOKENIZER:
        from transformers import AutoTokenizer

        from nlsr_fast.testing import make_tokenizer

        d = Path(_scratch("tokenizer"))
        if not (d / "tokenizer.json").is_file():
            make_tokenizer(d)
        _TOKENIZER.append(AutoTokenizer.from_pretrained(os.fspath(d)))
    return _TOKENIZER[0]


def check_calibration(case: CalibCase, *, tokenize: bool = True) -> str:
    """(d) the calibration parser and loader: records whose line numbers point at the lines they came from, samples
    no longer than the context; or a ValueError naming the file. The dry run's summary raises exactly when the
    parser does."""
    from nlsr_fast.calib.data import load_calibration, read_calibration_records
    from nlsr_fast.pipeline.plan import calibration_summary

    path = Path(_scratch("calib")) / "c.jsonl"
    path.write_bytes(case.data)
    kw = {"pairs": case.pairs, "max_line_bytes": case.max_line_bytes}
    try:
        cfile = read_calibration_records(path, **kw)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        _assert_own_error(exc, path)
        try:
            calibration_summary(path, nsamples=4, max_response_tokens=8, **kw)  # type: ignore[arg-type]
        except ValueError as exc2:
            assert str(exc2) == str(exc)
        else:
            raise AssertionError(f"the dry run accepted a file the real run refuses: {exc}")
        return "error"
    lines = case.data.split(b"\n")
    for rec in cfile.records:
        raw = lines[rec.line - 1].rstrip(b"\r")
        if rec.line == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        assert len(raw) <= case.max_line_bytes
        obj = json.loads(raw.decode("utf-8"))
        assert obj["prompt"] == rec.prompt
        assert all(isinstance(t, str) and t for t in rec.responses) and len(rec.responses) == (2 if case.pairs else 1)
    if not tokenize:
        return "ok"
    try:
        cs = load_calibration(path, _tokenizer(), nsamples=4, max_response_tokens=8, max_context=case.max_context,
                              **kw)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001
        _assert_own_error(exc, path)
        return "error"
    for s in cs.sequences():
        assert s.n_response >= 1 and s.n_response <= 8
        if case.max_context is not None:
            assert s.n_tokens <= case.max_context
    return "ok"


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Counter:
    """Outcome counts of one parser's run."""

    ok: int = 0
    error: int = 0

    def __call__(self, outcome: str) -> None:
        if outcome == "ok":
            self.ok += 1
        else:
            self.error += 1


PARSERS: dict[str, tuple[Callable[[], st.SearchStrategy[Any]], Callable[[Any], str]]] = {
    "safetensors_header": (header_inputs, check_header),
    "checkpoint_index": (index_inputs, check_index),
    "adapter_config": (adapter_inputs, check_adapter),
    "calibration": (calibration_inputs, check_calibration),
}
