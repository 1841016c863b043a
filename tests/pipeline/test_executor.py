"""The streaming executor in LoRA mode against an in-memory composition of the stage functions, bit for bit; the
reader thread of `prefetch`; a ready reference adapter against amplification."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nlsr_fast
from nlsr_fast.config import resolve_preset
from nlsr_fast.executor import prefetch
from nlsr_fast.io import CheckpointReader, LoraAdapter
from nlsr_fast.io.adapter import write_adapter
from nlsr_fast.ops import load_masks
from nlsr_fast.pipeline import amplify, restore, score, select, similarity

from .conftest import World

METHODS = ("low_rank", "wanda", "snip", "pref_snip", "random")
NSAMPLES = 16


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture(scope="module")
def shared(world: World) -> dict:
    """What every composition reads once: the adapters, the base reader and the tokenizer."""
    from transformers import AutoTokenizer

    ft, al = LoraAdapter.load(world.finetuned), LoraAdapter.load(world.aligned)
    return {"ft": ft, "al": al, "base": CheckpointReader(world.base),
            "tokenizer": AutoTokenizer.from_pretrained(str(world.base)),
            "ft_factors": {n: tuple(t.clone() for t in ft.factors(n)) for n in ft.modules},
            "al_factors": {n: tuple(t.clone() for t in al.factors(n)) for n in al.modules}}


def _compose(world: World, shared: dict, method: str, preset: str) -> dict:
    """docs/algorithm.md §2-§6 in memory, with the dict-based stage functions, as an embedding user would write it."""
    from nlsr_fast.calib.data import load_calibration

    ft, al, base = shared["ft"], shared["al"], shared["base"]
    spec = resolve_preset(preset)
    ref = amplify(shared["al_factors"], 0.9, spec)
    calib = None
    if method != "random":
        calib = load_calibration(world.pairs if method == "pref_snip" else world.calibration, shared["tokenizer"],
                                 nsamples=NSAMPLES, preset=spec, pairs=method == "pref_snip",
                                 max_context=base.config.get("max_position_embeddings"))
    masks = score(method, ref, sparsity=0.8, preset=spec, seed=42, base=base if calib is not None else None,
                  calib=calib, scales={n: al.scale(n) for n in al.modules}, device="cpu")
    sims = similarity(shared["ft_factors"], ref, masks)
    chosen = select(list(sims.values()), preset=spec)
    restored = [n for n, flag in zip(sims, chosen.restored, strict=True) if flag]
    new = restore(shared["ft_factors"], ref, masks, restored)
    tensors = {key: ft.raw(key).clone() for key in ft.raw_keys}
    for name in restored:
        tensors.update(ft.to_raw(name, *new[name]))
    return {"masks": masks, "sims": sims, "restored": restored, "tensors": tensors}


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("method", METHODS)
def test_lora_executor_equals_in_memory_stages(world: World, shared: dict, tmp_path: Path, method: str,
                                               preset: str) -> None:
    cal = None if method == "random" else (world.pairs if method == "pref_snip" else world.calibration)
    out = tmp_path / "out"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method=method, preset=preset,
                            calibration=cal, nsamples=NSAMPLES, quiet=True, device="cpu")
    want = _compose(world, shared, method, preset)
    ft = shared["ft"]
    assert rep.mode == "lora"
    # similarities, exactly, and the restored set
    assert [m.name for m in rep.modules] == ft.modules
    assert {m.name: m.similarity for m in rep.modules} == want["sims"]
    assert [m.name for m in rep.modules if m.restored] == want["restored"]
    assert 0 < len(want["restored"]) < len(ft.modules)
    # masks, content
    saved = load_masks(out / "masks.safetensors")
    assert set(saved) == {f"{n}.lora_{w}" for n in ft.modules for w in "AB"}
    for name, (ma, mb) in want["masks"].items():
        assert saved[f"{name}.lora_A"].equal(ma), f"{name} mask A"
        assert saved[f"{name}.lora_B"].equal(mb), f"{name} mask B"
    # the adapter: every tensor bit for bit, then the file byte for byte (same tensors, order and metadata
    # through the project's plain writer)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(want["tensors"])
    changed = 0
    for key, t in want["tensors"].items():
        assert got[key].dtype == t.dtype and got[key].shape == t.shape, key
        assert torch.equal(_bits(got[key]), _bits(t)), f"{key} differs from the in-memory stages"
        changed += int((_bits(t) != _bits(ft.raw(key))).sum())
    assert changed == sum(m.changed_a + m.changed_b for m in rep.modules) > 0
    ref_dir = tmp_path / "composed"
    ref_dir.mkdir()
    write_adapter(ref_dir, ft.config, want["tensors"], metadata={"nlsr_fast": nlsr_fast.__version__})
    assert (out / "adapter_model.safetensors").read_bytes() == (ref_dir / "adapter_model.safetensors").read_bytes()


# -- prefetch -----------------------------------------------------------------------------------------------------


def _reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "nlsr-fast-reader" and t.is_alive()]


def test_prefetch_yields_in_order_loading_in_another_thread() -> None:
    main = threading.get_ident()
    seen: list[int] = []

    def load(i: int) -> tuple[int, int]:
        seen.append(threading.get_ident())
        return i * i, threading.get_ident()

    got = list(prefetch(range(20), load, depth=3))
    assert [item for item, _ in got] == list(range(20))
    assert [value for _, (value, _) in got] == [i * i for i in range(20)]
    assert len(seen) == 20 and main not in seen and len(set(seen)) == 1
    assert not _reader_threads()
    assert list(prefetch([], load)) == []


def test_prefetch_raises_the_loader_error_at_the_failing_item() -> None:
    def load(i: int) -> int:
        if i == 5:
            raise ValueError("bad tensor at item 5")
        return i

    got = []
    with pytest.raises(ValueError, match="bad tensor at item 5"):
        for _item, value in prefetch(range(10), load, depth=2):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
    assert not _reader_threads()


def test_prefetch_early_exit_stops_the_reader() -> None:
    loaded: list[int] = []

    def load(i: int) -> int:
        loaded.append(i)
        return i

    for item, _ in prefetch(range(1000), load, depth=2):
        if item == 3:
            break
    assert not _reader_threads()
    # the reader stopped: at most the items in flight when the consumer left were loaded, not the 1000
    assert 4 <= len(loaded) <= 4 + 3, loaded
    assert loaded == list(range(len(loaded)))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_prefetch_holds_at_most_depth_plus_one_items(depth: int) -> None:
    lock = threading.Lock()
    live = [0]
    peak = [0]

    def load(i: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return i

    for item, value in prefetch(range(30), load, depth=depth):
        # a slow consumer: the reader gets every chance to run ahead
        for _ in range(50):
            if live[0] >= depth + 2:
                break
            threading.Event().wait(0.001)
        assert value == item
        with lock:
            live[0] -= 1
    assert peak[0] == depth + 1, (peak[0], depth)
    assert live[0] == 0
    assert not _reader_threads()


# -- a ready reference adapter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, preset", [("random", "paper"), ("random", "official"), ("low_rank", "paper")])
def test_reference_adapter_equals_amplification(world: World, shared: dict, tmp_path: Path, method: str,
                                                preset: str) -> None:
    """The amplified aligned adapter written to disk and given as `reference=` gives the same output."""
    al = shared["al"]
    ref = amplify(shared["al_factors"], 0.9, preset)
    tensors = {}
    for name in al.modules:
        tensors.update(al.to_raw(name, *ref[name]))
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    write_adapter(ref_dir, al.config, tensors)
    assert LoraAdapter.load(ref_dir).raw_dtype(al.key_a(al.modules[0])) == torch.float32
    kw = {"method": method, "preset": preset, "quiet": True, "nsamples": NSAMPLES,
          "calibration": None if method == "random" else world.calibration}
    a = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "amplified", **kw)
    b = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "given", reference=ref_dir, **kw)
    assert b.mode == a.mode == "lora" and "reference" in b.inputs
    assert [m.similarity for m in a.modules] == [m.similarity for m in b.modules]
    assert [m.restored for m in a.modules] == [m.restored for m in b.modules]
    assert sum(m.restored for m in a.modules) > 0
    assert [(m.changed_a, m.changed_b) for m in a.modules] == [(m.changed_a, m.changed_b) for m in b.modules]
    for f in ("adapter_model.safetensors", "masks.safetensors"):
        assert (tmp_path / "amplified" / f).read_bytes() == (tmp_path / "given" / f).read_bytes(), f
    assert math.isclose(b.config["alpha"], 0.9)
