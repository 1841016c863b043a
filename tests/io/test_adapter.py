"""LoraAdapter against PEFT itself: module order, factors, scales, fan_in_fan_out, writing, and the checks."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nlsr_fast.io import (
    CheckpointReader,
    LoraAdapter,
    check_adapter_matches_base,
    check_compatible,
    get_pattern_key,
    write_adapter,
)
from nlsr_fast.io.adapter import MODULE_ORDER
from nlsr_fast.testing import make_lora_adapter

from ._helpers import load_peft

ST = "adapter_model.safetensors"
CFG = "adapter_config.json"


def _clone(
    src: Path,
    dst: Path,
    *,
    config: dict | None = None,
    drop: Callable[[str], bool] = lambda k: False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] = lambda k, t: t,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    dst.mkdir(parents=True)
    tensors = {k: transform(k, t).contiguous() for k, t in load_file(os.fspath(src / ST)).items() if not drop(k)}
    save_file({**tensors, **(extra or {})}, os.fspath(dst / ST))
    cfg = json.loads((src / CFG).read_text())
    cfg.update(config or {})
    (dst / CFG).write_text(json.dumps(cfg))
    return dst


def _expected_order(layers: int) -> list[str]:
    block = {p: ("mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn") for p in MODULE_ORDER}
    return [f"model.layers.{i}.{block[p]}.{p}" for i in range(layers) for p in MODULE_ORDER]


def test_module_order_matches_peft(tiny_base: Path, adapter_plain: Path) -> None:
    ad = LoraAdapter.load(adapter_plain)
    assert ad.modules == _expected_order(2)
    assert ad.modules == list(load_peft(tiny_base, adapter_plain))
    assert [ad.layer_of(m) for m in ad.modules] == [0] * 7 + [1] * 7
    assert ad.key_a("model.layers.1.mlp.up_proj") == "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    assert ad.key_b("model.layers.1.mlp.up_proj") == "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    assert ad.extra_keys == []
    assert set(ad.target_modules) == set(MODULE_ORDER)
    assert ad.files == [adapter_plain / CFG, adapter_plain / ST]
    assert ad.nbytes == sum(t.numel() * t.element_size() for t in load_file(os.fspath(adapter_plain / ST)).values())


@pytest.mark.parametrize("which", ["adapter_plain", "adapter_rslora", "adapter_patterns", "adapter_continued"])
def test_factors_and_scales_equal_peft(request: pytest.FixtureRequest, tiny_base: Path, which: str) -> None:
    folder = request.getfixturevalue(which)
    ad = LoraAdapter.load(folder)
    ref = load_peft(tiny_base, folder)
    assert ad.modules == list(ref)
    for name, (a_ref, b_ref, scaling) in ref.items():
        a, b = ad.factors(name)
        assert a.shape == (ad.rank(name), a.shape[1]) and b.shape == (b.shape[0], ad.rank(name))
        assert torch.equal(a, a_ref), name
        assert torch.equal(b, b_ref), name
        assert ad.scale(name) == pytest.approx(scaling, rel=1e-12), name


def test_scale_values(adapter_plain: Path, adapter_rslora: Path, adapter_patterns: Path) -> None:
    plain, rs, pat = (LoraAdapter.load(p) for p in (adapter_plain, adapter_rslora, adapter_patterns))
    assert {plain.scale(m) for m in plain.modules} == {2.0}
    assert {rs.scale(m) for m in rs.modules} == {6.0 / math.sqrt(4)}
    expected_rank = {
        m: 2 if m.endswith("q_proj") else 8 if m == "model.layers.1.mlp.down_proj" else 4 for m in pat.modules
    }
    assert {m: pat.rank(m) for m in pat.modules} == expected_rank
    assert pat.scale("model.layers.0.self_attn.q_proj") == 4.0
    assert pat.scale("model.layers.1.self_attn.v_proj") == 0.75
    assert pat.scale("model.layers.0.self_attn.o_proj") == 1.25
    assert pat.scale("model.layers.1.self_attn.o_proj") == 2.0
    assert pat.scale("model.layers.1.mlp.down_proj") == 1.0
    assert pat.scale("model.layers.0.mlp.down_proj") == 2.0


def test_get_pattern_key_matches_peft() -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    patterns = ["q_proj", r"layers\.1\.mlp\..*", "model.layers.0.self_attn.k_proj", "proj", "^model.*v_proj"]
    names = _expected_order(2) + ["lm_head", "model.layers.10.self_attn.q_proj", "model.layers.0.mlp.xq_proj"]
    for name in names:
        assert get_pattern_key(patterns, name) == peft_get_pattern_key(patterns, name), name
        assert get_pattern_key(patterns[::-1], name) == peft_get_pattern_key(patterns[::-1], name), name


def test_adapter_name_segment_and_no_prefix(adapter_plain: Path, tmp_path: Path) -> None:
    def rename(k: str) -> str:
        return re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k).removeprefix("base_model.model.")

    src = load_file(os.fspath(adapter_plain / ST))
    folder = tmp_path / "ad"
    folder.mkdir()
    save_file({rename(k): t for k, t in src.items()}, os.fspath(folder / ST))
    (folder / CFG).write_text((adapter_plain / CFG).read_text())
    ad, ref = LoraAdapter.load(folder), LoraAdapter.load(adapter_plain)
    assert ad.modules == ref.modules
    assert ad.key_a(ad.modules[0]) == "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    for m in ad.modules:
        assert all(torch.equal(x, y) for x, y in zip(ad.factors(m), ref.factors(m), strict=True))


def test_fan_in_fan_out_peft_conv1d(tiny_gpt2: Path, adapter_gpt2: Path) -> None:
    ad = LoraAdapter.load(adapter_gpt2)
    assert ad.fan_in_fan_out is True
    assert ad.modules == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    ref = load_peft(tiny_gpt2, adapter_gpt2)
    base = CheckpointReader(tiny_gpt2)
    for name, (a_ref, b_ref, scaling) in ref.items():
        a, b = ad.factors(name)
        assert torch.equal(a, a_ref) and torch.equal(b, b_ref) and ad.scale(name) == scaling
        # Conv1D stores (d_in, d_out): the update (B @ A)^T has the base weight's shape.
        assert (b @ a).t().shape == base.shape(f"{name}.weight")
        assert not ad.module(name).transposed
    check_adapter_matches_base(ad, base)


def test_fan_in_fan_out_transposed_file_roundtrip(adapter_gpt2: Path, tmp_path: Path) -> None:
    """A hand-made file storing A as (d_in, r) and B as (r, d_out): factors come back canonical, writes go back."""
    folder = _clone(adapter_gpt2, tmp_path / "t", transform=lambda k, t: t.t())
    ad, ref = LoraAdapter.load(folder), LoraAdapter.load(adapter_gpt2)
    assert ad.modules == ref.modules
    out: dict[str, torch.Tensor] = {}
    for m in ad.modules:
        a, b = ad.factors(m)
        a_ref, b_ref = ref.factors(m)
        assert ad.module(m).transposed and a.shape == (4, 16) and b.shape[1] == 4
        assert torch.equal(a, a_ref) and torch.equal(b, b_ref)
        raw = ad.to_raw(m, a * 2, b)
        assert raw[ad.key_a(m)].shape == ad.raw_shape(ad.key_a(m)) == (16, 4)
        assert raw[ad.key_a(m)].is_contiguous()
        out.update(raw)
    (tmp_path / "w").mkdir()
    write_adapter(tmp_path / "w", ad.config, out)
    back = LoraAdapter.load(tmp_path / "w")
    for m in ad.modules:
        assert back.module(m).transposed
        assert torch.equal(back.factors(m)[0], ref.factors(m)[0] * 2)
        assert torch.equal(back.factors(m)[1], ref.factors(m)[1])


def test_to_raw_rejects_wrong_shapes(adapter_plain: Path) -> None:
    ad = LoraAdapter.load(adapter_plain)
    m = ad.modules[0]
    a, b = ad.factors(m)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.*A \[4, 33\].*expected A \[4, 32\]"):
        ad.to_raw(m, torch.zeros(4, 33), b)


def test_write_adapter_roundtrip_with_peft(tiny_base: Path, adapter_plain: Path, tmp_path: Path) -> None:
    extra_key = "base_model.model.model.norm.weight"
    src = _clone(adapter_plain, tmp_path / "src", extra={extra_key: torch.full((32,), 0.5)})
    ad = LoraAdapter.load(src)
    assert ad.extra_keys == [extra_key]
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {k: ad.raw(k) for k in ad.extra_keys}
    expected = {}
    for m in ad.modules:
        a, b = ad.factors(m)
        a2, b2 = a + torch.randn(a.shape, generator=gen), (b * 3).to(torch.bfloat16)
        tensors.update(ad.to_raw(m, a2, b2))
        expected[m] = (a2, b2)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(out, ad.config, tensors, metadata={"nlsr": "test"})
    text = (out / CFG).read_text()
    assert text == json.dumps(ad.config, sort_keys=True, indent=2) + "\n"
    written = load_file(os.fspath(out / ST))
    assert set(written) == set(tensors)
    assert written["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].dtype == torch.bfloat16
    assert torch.equal(written[extra_key], torch.full((32,), 0.5))
    from safetensors import safe_open

    with safe_open(os.fspath(out / ST), "pt") as f:
        assert f.metadata() == {"format": "pt", "nlsr": "test"}
    back = LoraAdapter.load(out)
    for m, (a2, b2) in expected.items():
        assert torch.equal(back.factors(m)[0], a2) and torch.equal(back.factors(m)[1], b2)
    # PEFT itself: the written adapter loads on the base and holds exactly the factors written.
    no_extra = tmp_path / "out_peft"
    no_extra.mkdir()
    write_adapter(no_extra, ad.config, {k: v.float() for k, v in tensors.items() if k != extra_key})
    ref = load_peft(tiny_base, no_extra)
    assert list(ref) == ad.modules
    for m, (a_ref, b_ref, scaling) in ref.items():
        assert torch.equal(a_ref, expected[m][0]) and torch.equal(b_ref, expected[m][1].float())
        assert scaling == ad.scale(m)


def test_write_adapter_needs_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write_adapter(tmp_path / "nope", {}, {})


def test_missing_b_names_key(adapter_plain: Path, tmp_path: Path) -> None:
    folder = _clone(adapter_plain, tmp_path / "ad", drop=lambda k: k.endswith("layers.1.mlp.gate_proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.gate_proj\.lora_A\.weight' has no matching lora_B"):
        LoraAdapter.load(folder)


def test_rank_inconsistent_between_a_and_b(adapter_plain: Path, tmp_path: Path) -> None:
    folder = _clone(
        adapter_plain,
        tmp_path / "ad",
        transform=lambda k, t: t[:, :3] if k.endswith("layers.0.self_attn.k_proj.lora_B.weight") else t,
    )
    with pytest.raises(ValueError, match=r"k_proj'.*rank mismatch.*\[4, 32\].*\[16, 3\].*r = 4"):
        LoraAdapter.load(folder)


def test_rank_inconsistent_with_config(adapter_plain: Path, tmp_path: Path) -> None:
    folder = _clone(adapter_plain, tmp_path / "ad", config={"r": 8})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj'.*rank mismatch.*r = 8"):
        LoraAdapter.load(folder)
    folder = _clone(adapter_plain, tmp_path / "ad2", config={"rank_pattern": {"down_proj": 2}})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj'.*rank mismatch.*r = 2"):
        LoraAdapter.load(folder)


@pytest.mark.parametrize(
    "update, exc, match",
    [
        ({"peft_type": "IA3"}, ValueError, "peft_type is 'IA3'"),
        ({"use_dora": True}, NotImplementedError, "DoRA"),
        ({"use_qalora": True}, NotImplementedError, "use_qalora"),
        ({"r": 0}, ValueError, "r must be a positive number"),
    ],
)
def test_unsupported_configs(adapter_plain: Path, tmp_path: Path, update: dict, exc: type, match: str) -> None:
    folder = _clone(adapter_plain, tmp_path / "ad", config=update)
    with pytest.raises(exc, match=match):
        LoraAdapter.load(folder)


def test_dora_magnitude_tensor_refused(adapter_plain: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    folder = _clone(adapter_plain, tmp_path / "ad", extra={key: torch.ones(32)})
    with pytest.raises(NotImplementedError, match="lora_magnitude_vector"):
        LoraAdapter.load(folder)


def test_pickle_adapter_refused_unless_allowed(adapter_plain: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    folder.mkdir()
    tensors = load_file(os.fspath(adapter_plain / ST))
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / CFG).write_text((adapter_plain / CFG).read_text())
    with pytest.raises(ValueError, match="allow_pickle=True"):
        LoraAdapter.load(folder)
    ad, ref = LoraAdapter.load(folder, allow_pickle=True), LoraAdapter.load(adapter_plain)
    assert ad.modules == ref.modules and ad.files[-1] == folder / "adapter_model.bin"
    for m in ad.modules:
        assert all(torch.equal(x, y) for x, y in zip(ad.factors(m), ref.factors(m), strict=True))


def test_not_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no adapter_config.json"):
        LoraAdapter.load(tmp_path)
    (tmp_path / CFG).write_text("{broken")
    with pytest.raises(ValueError, match="adapter_config.json: malformed JSON"):
        LoraAdapter.load(tmp_path)
    (tmp_path / CFG).write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        LoraAdapter.load(tmp_path)


def test_check_compatible_accepts_continued(adapter_plain: Path, adapter_continued: Path) -> None:
    ft, ref = LoraAdapter.load(adapter_continued), LoraAdapter.load(adapter_plain)
    check_compatible(ft, ref)
    check_compatible(ref, ref)
    a_ft, _ = ft.factors(ft.modules[0])
    assert not torch.equal(a_ft, ref.factors(ref.modules[0])[0])


def test_check_compatible_missing_module(adapter_plain: Path, tmp_path: Path) -> None:
    full = LoraAdapter.load(adapter_plain)
    short = LoraAdapter.load(_clone(adapter_plain, tmp_path / "ad", drop=lambda k: ".layers.1.self_attn.v_proj." in k))
    with pytest.raises(
        ValueError, match=r"module sets differ.*'model\.layers\.1\.self_attn\.v_proj' is missing in the fine"
    ):
        check_compatible(short, full)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.v_proj' is missing in the reference"):
        check_compatible(full, short)


def test_check_compatible_rank(tiny_base: Path, adapter_plain: Path, tmp_path: Path) -> None:
    r2 = LoraAdapter.load(make_lora_adapter(tmp_path / "r2", tiny_base, r=2, alpha=4.0))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj': rank differs: 2 \(fine-tuned\) vs 4"):
        check_compatible(r2, LoraAdapter.load(adapter_plain))


def test_check_compatible_shape(adapter_plain: Path, adapter_other_base: Path) -> None:
    with pytest.raises(ValueError, match=r"q_proj': lora_A shape differs: \[4, 48\].*vs \[4, 32\]"):
        check_compatible(LoraAdapter.load(adapter_other_base), LoraAdapter.load(adapter_plain))


def test_check_compatible_targets(adapter_plain: Path, tmp_path: Path) -> None:
    regex = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    other = LoraAdapter.load(_clone(adapter_plain, tmp_path / "ad", config={"target_modules": regex}))
    with pytest.raises(ValueError, match="target_modules differ"):
        check_compatible(other, LoraAdapter.load(adapter_plain))
    # Same targets in another order are the same targets.
    shuffled = sorted(LoraAdapter.load(adapter_plain).target_modules)
    same = LoraAdapter.load(_clone(adapter_plain, tmp_path / "ad2", config={"target_modules": shuffled}))
    check_compatible(same, LoraAdapter.load(adapter_plain))


def test_check_compatible_scale(adapter_plain: Path, tmp_path: Path) -> None:
    other = LoraAdapter.load(_clone(adapter_plain, tmp_path / "ad", config={"lora_alpha": 16}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj': scale differs: 4\.0 .* 2\.0"):
        check_compatible(other, LoraAdapter.load(adapter_plain))
    rs = LoraAdapter.load(_clone(adapter_plain, tmp_path / "ad2", config={"use_rslora": True}))
    with pytest.raises(ValueError, match="scale differs"):
        check_compatible(rs, LoraAdapter.load(adapter_plain))


def test_check_adapter_matches_base(tiny_base: Path, other_base: Path, adapter_plain: Path, adapter_gpt2: Path) -> None:
    ad = LoraAdapter.load(adapter_plain)
    check_adapter_matches_base(ad, CheckpointReader(tiny_base))
    other = CheckpointReader(other_base)
    with pytest.raises(ValueError) as e:
        check_adapter_matches_base(ad, other)
    msg = str(e.value)
    assert "'model.layers.0.self_attn.q_proj'" in msg and "[32, 32]" in msg and "[48, 48]" in msg
    assert str(ad.weights_file) in msg and str(other.file_of("model.layers.0.self_attn.q_proj.weight")) in msg
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn'.*no tensor 'transformer\.h\.0\.attn"):
        check_adapter_matches_base(LoraAdapter.load(adapter_gpt2), CheckpointReader(tiny_base))
