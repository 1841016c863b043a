"""The inputs the fuzzers found (issue 8), each kept as a plain test: before the fix each raised another exception
(TypeError, OverflowError, RecursionError, ZeroDivisionError, re.error), or an error that did not name the file, or
was accepted by the project's reader but refused by the safetensors library at compute time, or gave a NaN scale."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from nlsr_fast.io import CheckpointReader, LoraAdapter, check_compatible, read_header

F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}


def _st(path: Path, header: object | None = None, data: bytes = b"\0" * 4, raw: bytes | None = None) -> Path:
    blob = raw if raw is not None else json.dumps(header, allow_nan=True).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


HEADERS: dict[str, tuple[dict[str, object], object, bytes]] = {
    # name: (kwargs of _st, the message)
    "metadata_int": ({"header": {"__metadata__": 1, "a": F32}}, "__metadata__ must map strings to strings"),
    "metadata_list": ({"header": {"__metadata__": [], "a": F32}}, "__metadata__ must map strings to strings"),
    "metadata_str": ({"header": {"__metadata__": "ab", "a": F32}}, "__metadata__ must map strings to strings"),
    "metadata_value": ({"header": {"__metadata__": {"k": 1}, "a": F32}}, "__metadata__ must map strings to strings"),
    "offsets_object": ({"header": {"a": {"dtype": "F32", "shape": [1], "data_offsets": {"x": 0, "y": 4}}}},
                       "malformed header entry for tensor 'a'"),
    "shape_infinity": ({"header": {"a": {"dtype": "F32", "shape": [float("inf")], "data_offsets": [0, 4]}}},
                       "malformed safetensors header"),
    "shape_float": ({"header": {"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}},
                    "malformed header entry for tensor 'a'"),
    "shape_bool": ({"header": {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}},
                   "malformed header entry for tensor 'a'"),
    "shape_negative": ({"header": {"a": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}},
                       "malformed header entry for tensor 'a'"),
    "shape_overflow": ({"header": {"a": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}},
                        "data": b""}, "byte count overflows"),
    "trailing_bytes": ({"header": {"a": F32}, "data": b"\0" * 8}, "4 bytes after the last tensor"),
    "gap": ({"header": {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "data": b"\0" * 8},
            "leave a gap of 4 bytes after the header"),
    "overlap": ({"header": {"a": F32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}},
                "tensor 'b' has data_offsets \\[0, 4\\], which overlap tensor 'a'"),
    "nan": ({"raw": b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}'}, "NaN is not JSON"),
    "duplicate_key": ({"raw": b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'},
                      "duplicate key 'dtype'"),
    "utf16": ({"raw": json.dumps({"a": F32}).encode("utf-16")}, "malformed safetensors header: UnicodeDecodeError"),
    "lone_surrogate": ({"raw": b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'},
                       "malformed safetensors header: UnicodeEncodeError"),
    "deep": ({"raw": b"[" * 100_000}, "malformed safetensors header: RecursionError"),
}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_header_refused_with_the_file_named(name: str, tmp_path: Path) -> None:
    kw, msg = HEADERS[name]
    path = _st(tmp_path / f"{name}.safetensors", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=msg) as e:
        read_header(path)
    assert str(path) in str(e.value)


def test_header_accepts_what_safetensors_accepts(tmp_path: Path) -> None:
    """Zero-size tensors sharing an offset, leading/trailing spaces and unknown entry fields stay accepted."""
    from safetensors import safe_open

    hdr = {"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": {**F32, "extra": [1]},
           "y": {"dtype": "F32", "shape": [2, 0], "data_offsets": [4, 4]}, "__metadata__": None}
    path = _st(tmp_path / "ok.safetensors", raw=b"  " + json.dumps(hdr).encode() + b"   ")
    infos, meta = read_header(path)
    assert list(infos) == ["z", "a", "y"] and meta == {}
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["a", "y", "z"]


def _ckpt(folder: Path, weight_map: object) -> Path:
    folder.mkdir()
    _st(folder / "s.safetensors", {"a": F32})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("entry", [["s.safetensors"], {"x": 1}, "a\x00b", "x" * 300, "d/" + "x" * 300],
                         ids=["list", "object", "nul", "long", "long_in_dir"])
def test_index_entry_refused_with_the_index_named(entry: object, tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "ckpt", {"a": entry})
    with pytest.raises(ValueError, match="model.safetensors.index.json") as e:
        CheckpointReader(folder)
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"weight_map": {"a": ' + b"9" * 5000 + b"}}"],
                         ids=["deep", "huge_int"])
def test_index_json_pathological(raw: bytes, tmp_path: Path) -> None:
    folder = _ckpt(tmp_path / "ckpt", {"a": "s.safetensors"})
    (folder / "model.safetensors.index.json").write_bytes(raw)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: malformed JSON"):
        CheckpointReader(folder)


_GOOD_CFG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def _adapter(folder: Path, cfg: dict[str, object] | bytes, layer: str = "0") -> Path:
    folder.mkdir()
    raw = cfg if isinstance(cfg, bytes) else json.dumps(cfg, allow_nan=True).encode()
    (folder / "adapter_config.json").write_bytes(raw)
    key = _KEY.replace("layers.0", f"layers.{layer}")
    hdr = {f"{key}.lora_A.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
           f"{key}.lora_B.weight": {"dtype": "F32", "shape": [3, 2], "data_offsets": [24, 48]}}
    _st(folder / "adapter_model.safetensors", hdr, b"\0" * 48)
    return folder


ADAPTER_CFGS: dict[str, tuple[dict[str, object], str]] = {
    "rank_pattern_str": ({"rank_pattern": {"q_proj": ""}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    "rank_pattern_inf": ({"rank_pattern": {"q_proj": float("inf")}}, "rank_pattern.*must be a positive integer"),
    "rank_pattern_half": ({"rank_pattern": {"q_proj": 0.5}}, "rank_pattern.*must be a positive integer"),
    "alpha_pattern_null": ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern.*must be a positive finite number"),
    "alpha_pattern_nan": ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern.*positive finite number"),
    "r_nan": ({"r": float("nan")}, "r must be a positive number, a whole LoRA rank"),
    "r_half": ({"r": 0.5}, "r must be a positive number, a whole LoRA rank"),
    "r_inf": ({"r": float("inf")}, "r must be a positive number, a whole LoRA rank"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number"),
    "alpha_inf": ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number"),
    "bad_regex": ({"rank_pattern": {"(": 2}}, "rank_pattern key '\\(' is not a valid regular expression"),
    "targets_nested": ({"target_modules": [["q_proj"]]}, "target_modules must be a string or a list of strings"),
}


@pytest.mark.parametrize("name", sorted(ADAPTER_CFGS))
def test_adapter_config_refused_with_the_file_named(name: str, tmp_path: Path) -> None:
    change, msg = ADAPTER_CFGS[name]
    folder = _adapter(tmp_path / "a", {**_GOOD_CFG, **change})
    with pytest.raises(ValueError, match=msg) as e:
        LoraAdapter.load(folder)
    assert str(folder / "adapter_config.json") in str(e.value)


def test_adapter_config_pathological_json(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "a", b"[" * 100_000)
    with pytest.raises(ValueError, match=r"adapter_config\.json: malformed JSON"):
        LoraAdapter.load(folder)


def test_adapter_rank_as_integral_float_and_unicode_digit_layer(tmp_path: Path) -> None:
    """r = 2.0 is a rank; a superscript digit in a key is not a layer number (int('²') raised a bare ValueError)."""
    ad = LoraAdapter.load(_adapter(tmp_path / "a", {**_GOOD_CFG, "r": 2.0}))
    assert ad.rank(ad.modules[0]) == 2 and ad.scale(ad.modules[0]) == 2.0
    ad = LoraAdapter.load(_adapter(tmp_path / "b", _GOOD_CFG, layer="²"))
    assert ad.layer_of(ad.modules[0]) is None
    check_compatible(ad, ad)
    ad = LoraAdapter.load(_adapter(tmp_path / "c", _GOOD_CFG, layer="9" * 5000))
    assert ad.layer_of(ad.modules[0]) is None
