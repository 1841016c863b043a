"""PackedMask: bit layout (numpy.packbits little-endian per row), roundtrips, counts, safetensors files."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nlsr_fast.ops import PackedMask, load_masks, save_masks

from ._helpers import assert_mask_well_formed, shape_params

SHAPES = [(1, 1), (1, 8), (1, 9), (3, 7), (5, 8), (4, 16), (37, 301), (11, 1000), (1,), (13,), (64,)]


def _random_bool(shape, p=0.5):
    return torch.rand(shape) < p


@pytest.mark.parametrize("shape", shape_params(SHAPES))
def test_layout_is_numpy_packbits_little_per_row(shape):
    b = _random_bool(shape)
    m = PackedMask.from_bool(b)
    rows = b.numpy().reshape(-1, shape[-1]) if len(shape) == 2 else b.numpy()[None, :]
    want = np.packbits(rows, axis=1, bitorder="little")
    assert m.bits.dtype == torch.uint8 and m.bits.is_contiguous()
    assert tuple(m.bits.shape) == (rows.shape[0], (shape[-1] + 7) // 8)
    np.testing.assert_array_equal(m.bits.numpy(), want)


def test_layout_worked_example():
    """Entry (i, j) is bit j % 8 of byte j // 8 of row i, least significant bit first; padding bits are 0."""
    b = torch.zeros(2, 10, dtype=torch.bool)
    b[0, 0] = True  # byte 0, bit 0 -> 0x01
    b[0, 7] = True  # byte 0, bit 7 -> 0x80
    b[0, 9] = True  # byte 1, bit 1 -> 0x02
    b[1, 8] = True  # row 1 starts on its own byte: byte 1, bit 0 -> 0x01
    m = PackedMask.from_bool(b)
    assert m.bits.tolist() == [[0x81, 0x02], [0x00, 0x01]]


@pytest.mark.parametrize("shape", shape_params(SHAPES))
def test_from_bool_to_bool_roundtrip(shape):
    b = _random_bool(shape)
    m = PackedMask.from_bool(b)
    back = m.to_bool()
    assert back.dtype == torch.bool and tuple(back.shape) == shape and back.device == b.device
    assert torch.equal(back, b)
    assert m.shape == shape and (m.rows, m.cols) == ((shape[0], shape[1]) if len(shape) == 2 else (1, shape[0]))
    assert_mask_well_formed("from_bool", m, shape, b.device)


@pytest.mark.parametrize("shape", shape_params(SHAPES))
def test_count_row_counts_density(shape):
    b = _random_bool(shape, 0.3)
    m = PackedMask.from_bool(b)
    assert m.count() == int(b.sum())
    assert m.row_counts().tolist() == b.reshape(m.rows, m.cols).sum(dim=1).tolist()
    assert m.density() == pytest.approx(int(b.sum()) / b.numel())


@pytest.mark.parametrize("shape", shape_params([(3, 7), (37, 301), (13,)]))
def test_zeros_ones_invert(shape):
    n = int(np.prod(shape))
    zeros, ones = PackedMask.zeros(shape), PackedMask.ones(shape)
    assert zeros.count() == 0 and ones.count() == n
    assert_mask_well_formed("ones", ones, shape, torch.device("cpu"))  # padding bits stay 0
    assert (~zeros).equal(ones) and (~ones).equal(zeros)
    b = _random_bool(shape)
    inv = ~PackedMask.from_bool(b)
    assert torch.equal(inv.to_bool(), ~b)
    assert_mask_well_formed("~mask", inv, shape, torch.device("cpu"))


def test_empty_has_the_right_buffer():
    m = PackedMask.empty((5, 17))
    assert tuple(m.bits.shape) == (5, 3) and m.bits.dtype == torch.uint8 and m.shape == (5, 17)


def test_equal_and_repr_and_to():
    b = _random_bool((4, 9))
    m = PackedMask.from_bool(b)
    assert m.equal(PackedMask.from_bool(b.clone()))
    assert not m.equal(PackedMask.from_bool(~b))
    assert not m.equal(PackedMask.from_bool(b.reshape(9, 4)))
    assert f"count={int(b.sum())}" in repr(m) and "(4, 9)" in repr(m)
    assert m.to("cpu").equal(m)


def test_constructor_validates_bits():
    with pytest.raises(ValueError, match=re.escape("(3, 2)") + ".*" + re.escape("(3, 3)")):
        PackedMask(torch.zeros(3, 3, dtype=torch.uint8), (3, 9))
    with pytest.raises(ValueError, match="int32"):
        PackedMask(torch.zeros(3, 2, dtype=torch.int32), (3, 9))
    with pytest.raises(ValueError, match="contiguous"):
        PackedMask(torch.zeros(2, 3, dtype=torch.uint8).t(), (3, 9))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        PackedMask(torch.zeros(1, 1, dtype=torch.uint8), (2, 3, 4))


def test_from_bool_rejects_non_bool_and_3d():
    with pytest.raises(ValueError, match="float32"):
        PackedMask.from_bool(torch.ones(3, 4))
    with pytest.raises(ValueError, match=re.escape("(2, 3, 4)")):
        PackedMask.from_bool(torch.ones(2, 3, 4, dtype=torch.bool))


# --- files -------------------------------------------------------------------------------------------------------


def test_save_load_single(tmp_path):
    m = PackedMask.from_bool(_random_bool((37, 301)))
    path = tmp_path / "m.safetensors"
    m.save(path, name="layers.0.q_proj.lora_A")
    back = PackedMask.load(path, name="layers.0.q_proj.lora_A")
    assert back.equal(m) and back.shape == (37, 301)
    m.save(path)
    assert PackedMask.load(path).equal(m)


def test_save_masks_load_masks_many(tmp_path):
    masks = {
        "a": PackedMask.from_bool(_random_bool((3, 7))),
        "b.lora_B": PackedMask.from_bool(_random_bool((13,))),
        "c": PackedMask.ones((1, 1)),
        "d": PackedMask.zeros((8, 16)),
    }
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks)
    back = load_masks(str(path))
    assert sorted(back) == sorted(masks)
    for name, m in masks.items():
        assert back[name].equal(m), name
        assert back[name].shape == m.shape, name


def test_file_layout_is_plain_safetensors(tmp_path):
    """Other tools can read the file: one uint8 tensor per mask, logical shapes as JSON in the metadata."""
    from safetensors import safe_open

    m = PackedMask.from_bool(_random_bool((5, 9)))
    path = tmp_path / "m.safetensors"
    save_masks(path, {"x": m})
    with safe_open(str(path), framework="pt") as f:
        assert list(f.keys()) == ["x"]
        assert torch.equal(f.get_tensor("x"), m.bits)
        assert json.loads(f.metadata()["nlsr_fast.packed_mask.shapes"]) == {"x": [5, 9]}


def test_load_missing_name(tmp_path):
    path = tmp_path / "m.safetensors"
    PackedMask.ones((2, 3)).save(path, name="present")
    with pytest.raises(ValueError, match="'absent'.*present"):
        PackedMask.load(path, name="absent")


def test_load_rejects_plain_safetensors(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2, dtype=torch.uint8)}, str(path))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a PackedMask file"):
        load_masks(path)


def test_load_rejects_tensor_without_shape(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"nlsr_fast.packed_mask.shapes": json.dumps({"a": [2, 3]}), "format": "pt"}
    save_file({"a": torch.zeros(2, 1, dtype=torch.uint8), "b": torch.zeros(1, 1, dtype=torch.uint8)}, str(path), meta)
    with pytest.raises(ValueError, match="'b'"):
        load_masks(path)


def test_load_rejects_shape_that_disagrees_with_bits(tmp_path):
    path = tmp_path / "m.safetensors"
    meta = {"nlsr_fast.packed_mask.shapes": json.dumps({"a": [2, 30]}), "format": "pt"}
    save_file({"a": torch.zeros(2, 1, dtype=torch.uint8)}, str(path), meta)
    with pytest.raises(ValueError, match=re.escape("(2, 30)")):
        load_masks(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_masks(tmp_path / "nope.safetensors")


def test_load_garbage_file_names_the_path(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_masks(path)


def test_save_masks_is_byte_identical_and_sorted(tmp_path):
    """issue 8: masks.safetensors bytes changed from run to run (metadata key order)."""
    import hashlib
    import subprocess
    import sys

    gen = torch.Generator().manual_seed(3)
    names = [f"model.layers.{i}.self_attn.{p}_proj.lora_{f}" for i in (1, 0, 10) for p in "vqk" for f in "BA"]
    masks = {n: PackedMask.from_bool(torch.rand(5 + i, 9 + i, generator=gen) < 0.5) for i, n in enumerate(names)}
    reordered = dict(reversed(list(masks.items())))
    save_masks(tmp_path / "a.safetensors", masks)
    save_masks(tmp_path / "b.safetensors", reordered)
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    # The same in a fresh interpreter (a hash map in another process would order keys differently).
    code = (
        "import sys, torch\n"
        "from nlsr_fast.ops import load_masks, save_masks\n"
        "save_masks(sys.argv[2], load_masks(sys.argv[1]))\n"
    )
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.safetensors"), str(tmp_path / f"c{i}")],
                       check=True)
        assert hashlib.sha256((tmp_path / f"c{i}").read_bytes()).digest() == hashlib.sha256(a).digest()
    n = int.from_bytes(a[:8], "little")
    header = json.loads(a[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    shapes_text = header["__metadata__"]["nlsr_fast.packed_mask.shapes"]
    assert list(json.loads(shapes_text)) == sorted(names)
    assert [k for k in header if k != "__metadata__"] == sorted(names)
    back = load_masks(tmp_path / "b.safetensors")
    assert list(back) == sorted(names) and all(back[k].equal(masks[k]) for k in names)


def test_save_masks_file_mode_follows_umask(tmp_path):
    """issue 8: masks.safetensors was written mode 0600 while the rest of the output is 0644."""
    import os

    old = os.umask(0o022)
    try:
        (tmp_path / "plain").write_text("x")
        save_masks(tmp_path / "m.safetensors", {"x": PackedMask.ones((2, 3))})
        os.umask(0o027)
        (tmp_path / "plain2").write_text("x")
        save_masks(tmp_path / "m2.safetensors", {"x": PackedMask.ones((2, 3))})
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("m.safetensors") == mode("plain") == 0o644
    assert mode("m2.safetensors") == mode("plain2") == 0o640
