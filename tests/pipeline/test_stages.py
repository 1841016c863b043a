"""Unit tests of the pipeline stages on synthetic factors (no model): config, amplify, select, similarity, restore,
score from statistics, report."""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import pytest
import torch

from nlsr_fast import PRESETS, RealignConfig, amplify, restore, select, similarity
from nlsr_fast.ops import PackedMask, keep_count, random_row_mask_reference, random_stream, row_topk_mask
from nlsr_fast.pipeline import adaptive_probabilities, changed_entries, masks_from_statistics, rank_positions
from nlsr_fast.report import ModuleRecord, Report


def _factors(n: int = 3, r: int = 4, d_in: int = 12, d_out: int = 10, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.q_proj": (
            torch.randn(r, d_in, generator=g).to(dtype),
            torch.randn(d_out, r, generator=g).to(dtype),
        )
        for i in range(n)
    }


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    as_int = torch.int16 if x.element_size() == 2 else torch.int32
    return torch.equal(x.contiguous().view(as_int), y.contiguous().view(as_int))


# -- config ---------------------------------------------------------------------------------------------------------


def test_config_defaults_match_spec() -> None:
    c = RealignConfig()
    assert (c.preset, c.method, c.sparsity, c.alpha, c.selection) == ("paper", "low_rank", 0.8, 0.9, "adaptive")
    assert (c.prune_rate, c.epsilon, c.seed, c.nsamples, c.max_response_tokens) == (0.5, 0.2, 42, 2000, 256)
    assert c.sequential is True and c.template == "alpaca"
    assert c.keep == pytest.approx(0.2)
    assert RealignConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"prune_rate": 2.0}, "prune_rate"),
        ({"epsilon": -0.2}, "epsilon"),
        ({"alpha": -1.0}, "alpha"),
        ({"method": "gradient"}, "method"),
        ({"mode": "lora", "method": "magnitude"}, "magnitude"),
        ({"mode": "dense", "method": "low_rank"}, "low_rank"),
        ({"selection": "top"}, "selection"),
        ({"preset": "mine"}, "preset"),
        ({"selection": "threshold"}, "tau"),
        ({"selection": "fraction"}, "fraction"),
        ({"selection": "fraction", "fraction": 1.2}, "fraction"),
        ({"tau": 0.5}, "tau"),
        ({"nsamples": 0}, "nsamples"),
        ({"max_response_tokens": 0}, "max_response_tokens"),
        ({"micro_batch": 0}, "micro_batch"),
        ({"calib_dtype": "int8"}, "calib_dtype"),
        ({"backend": "cuda"}, "backend"),
        ({"template": "vicuna"}, "template"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        RealignConfig(**kwargs)


def test_config_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="sparsityy"):
        RealignConfig.from_dict({"sparsityy": 0.5})


def test_presets_differ_exactly_where_spec_says() -> None:
    paper, official = PRESETS["paper"], PRESETS["official"]
    assert paper.amplification_factor(0.9) == math.sqrt(1.9)
    assert official.amplification_factor(0.9) == 1.8
    assert (paper.adaptive_direction, official.adaptive_direction) == ("dissimilar", "similar")
    assert (paper.snip_accumulate, official.snip_accumulate) == ("per_sample", "running")
    assert (paper.pref_chosen, official.pref_chosen) == ("safer", "better")
    assert (paper.low_rank_count_offset, official.low_rank_count_offset) == (0, 1)
    assert (paper.response_tokens, official.response_tokens) == ("plain", "drop_first")


# -- amplify --------------------------------------------------------------------------------------------------------


def test_amplify_paper_scales_delta_by_one_plus_alpha() -> None:
    f = _factors()
    e = amplify(f, 0.9, "paper")
    for name, (a, b) in f.items():
        ae, be = e[name]
        assert ae.dtype == torch.float32 and ae.shape == a.shape and be.shape == b.shape
        assert torch.equal(ae, a * math.sqrt(1.9))
        torch.testing.assert_close(be @ ae, 1.9 * (b @ a), rtol=1e-5, atol=1e-6)


def test_amplify_official_is_two_alpha_and_identity_at_half() -> None:
    f = _factors()
    e = amplify(f, 0.9, "official")
    for name, (a, b) in f.items():
        assert torch.equal(e[name][0], a * 1.8) and torch.equal(e[name][1], b * 1.8)
    # docs/algorithm.md §9.4: official alpha = 0.5 makes e equal to a, bit for bit.
    e = amplify(f, 0.5, PRESETS["official"])
    for name, (a, b) in f.items():
        assert torch.equal(e[name][0], a) and torch.equal(e[name][1], b)
        assert e[name][0] is not a


def test_amplify_does_not_modify_inputs_and_upcasts_bf16() -> None:
    f = _factors(dtype=torch.bfloat16)
    before = {k: (a.clone(), b.clone()) for k, (a, b) in f.items()}
    e = amplify(f, 0.9)
    for k in f:
        assert torch.equal(f[k][0], before[k][0]) and torch.equal(f[k][1], before[k][1])
        assert e[k][0].dtype == torch.float32
        assert torch.equal(e[k][0], before[k][0].float() * math.sqrt(1.9))


def test_amplify_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="preset"):
        amplify(_factors(), 0.9, "nope")
    with pytest.raises(ValueError, match="alpha"):
        amplify(_factors(), -0.1)


# -- select ---------------------------------------------------------------------------------------------------------


def test_rank_positions_stable_descending() -> None:
    assert rank_positions([0.5, 0.9, 0.5, 0.1]) == [1, 0, 2, 3]
    assert rank_positions([0.3, 0.3, 0.3]) == [0, 1, 2]


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_epsilon_zero_gives_rho_everywhere(preset: str) -> None:
    sims = torch.rand(37).tolist()
    sel = select(sims, prune_rate=0.37, epsilon=0.0, preset=preset)
    assert sel.probabilities == [float(torch.tensor(0.37, dtype=torch.float32))] * 37


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_adaptive_probabilities_range_and_direction(preset: str) -> None:
    sims = torch.rand(23, generator=torch.Generator().manual_seed(3)).tolist()
    p = adaptive_probabilities(sims, 0.5, 0.2, PRESETS[preset])
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    assert float(p.min()) == pytest.approx(0.3) and float(p.max()) == pytest.approx(0.7)
    order = sorted(range(23), key=lambda i: -sims[i])  # most similar first
    along = [float(p[i]) for i in order]
    if preset == "paper":  # dissimilar modules restored more often: p grows as S falls
        assert along == sorted(along)
    else:
        assert along == sorted(along, reverse=True)
    # the mean is rho (N odd: the middle one is exactly rho)
    assert float(p.double().mean()) == pytest.approx(0.5, abs=1e-6)


def test_adaptive_formula_exact() -> None:
    sims = [0.9, 0.1, 0.5, 0.7, 0.3]  # positions 0, 4, 2, 1, 3
    n = len(sims)
    pos = rank_positions(sims)
    for preset in ("paper", "official"):
        p = adaptive_probabilities(sims, 0.5, 0.2, PRESETS[preset])
        for m in range(n):
            u = (n - 1 - pos[m]) / (n - 1)
            w = 1 - u if preset == "paper" else u
            assert float(p[m]) == float(torch.tensor(min(1.0, max(0.0, 0.5 - 0.2 + 0.4 * w)), dtype=torch.float32))


def test_adaptive_draw_is_seeded_bernoulli_in_model_order() -> None:
    sims = torch.rand(50, generator=torch.Generator().manual_seed(1)).tolist()
    for seed in (0, 42, 7):
        sel = select(sims, seed=seed)
        p = torch.tensor(sel.probabilities, dtype=torch.float32)
        want = torch.bernoulli(p, generator=torch.Generator("cpu").manual_seed(seed))
        assert sel.draws == [int(v) for v in want.tolist()]
        assert sel.restored == [d == 1 for d in sel.draws]
    assert select(sims, seed=1).draws != select(sims, seed=2).draws


def test_adaptive_single_module_and_clipping() -> None:
    sel = select([0.4], prune_rate=0.5, epsilon=0.2, preset="paper")
    assert sel.probabilities == [pytest.approx(0.3)]  # N = 1: u = 1, paper uses 1 - u = 0
    sel = select([0.4], prune_rate=0.5, epsilon=0.2, preset="official")
    assert sel.probabilities == [pytest.approx(0.7)]
    sel = select([0.1, 0.9], prune_rate=0.9, epsilon=0.5)
    assert sel.probabilities == [1.0, pytest.approx(0.4)]
    assert select([], prune_rate=0.5).restored == []


def test_threshold_rule() -> None:
    sel = select([0.2, 0.5, 0.49, 0.9], selection="threshold", tau=0.5)
    assert sel.restored == [True, False, True, False] and sel.probabilities is None and sel.draws is None
    with pytest.raises(ValueError, match="tau"):
        select([0.1], selection="threshold")


def test_fraction_rule_counts_and_ties() -> None:
    sims = [0.9, 0.1, 0.5, 0.7, 0.3, 0.6, 0.2, 0.8, 0.4, 0.05]
    sel = select(sims, selection="fraction", fraction=0.3)  # 0.3 * 10 = 3.0000000000000004 -> 3, not 4
    assert sum(sel.restored) == 3
    assert [i for i, r in enumerate(sel.restored) if r] == [1, 6, 9]
    assert sum(select(sims, selection="fraction", fraction=0.25).restored) == 3  # ceil(2.5)
    assert sum(select(sims, selection="fraction", fraction=0.0).restored) == 0
    assert all(select(sims, selection="fraction", fraction=1.0).restored)
    # ties: the stable order puts later modules at later positions, so they count as less similar
    assert select([0.5, 0.5, 0.5], selection="fraction", fraction=0.34).restored == [False, True, True]


def test_select_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="selection"):
        select([0.1], selection="best")
    with pytest.raises(ValueError, match="NaN"):
        select([0.1, float("nan")])


# -- similarity -----------------------------------------------------------------------------------------------------


def _random_masks(factors, keep=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        k: (PackedMask.from_bool(torch.rand(a.shape, generator=g) < keep),
            PackedMask.from_bool(torch.rand(b.shape, generator=g) < keep))
        for k, (a, b) in factors.items()
    }


def test_similarity_matches_dense_cosine() -> None:
    ft, ref = _factors(seed=1), _factors(seed=2)
    masks = _random_masks(ft)
    s = similarity(ft, ref, masks)
    assert list(s) == list(ft)
    for k in ft:
        ma, mb = (m.to_bool().double() for m in masks[k])
        wt = (ft[k][1].double() * mb) @ (ft[k][0].double() * ma)
        we = (ref[k][1].double() * mb) @ (ref[k][0].double() * ma)
        want = float((wt * we).sum() / (wt.norm() * we.norm()))
        assert isinstance(s[k], float)
        assert s[k] == pytest.approx(want, abs=1e-6)


def test_similarity_scale_invariant_and_self_is_one() -> None:
    ft, ref = _factors(seed=1), _factors(seed=2)
    masks = _random_masks(ft)
    s = similarity(ft, ref, masks)
    for c in (0.01, 3.7, 250.0):
        scaled = {k: (a * c, b * c) for k, (a, b) in ref.items()}
        sc = similarity(ft, scaled, masks)
        for k in s:
            assert sc[k] == pytest.approx(s[k], abs=1e-6)
    self_s = similarity(ft, ft, masks)
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in self_s.values())


def test_similarity_zero_norm_is_zero_with_warning_naming_module() -> None:
    ft, ref = _factors(n=2, seed=1), _factors(n=2, seed=2)
    masks = _random_masks(ft)
    name = next(iter(ft))
    a, b = masks[name]
    masks[name] = (PackedMask.zeros(a.shape), b)
    with pytest.warns(RuntimeWarning, match=name.replace(".", r"\.")):
        s = similarity(ft, ref, masks)
    assert s[name] == 0.0 and not math.isnan(s[name])


def test_similarity_mixed_dtypes() -> None:
    ft = _factors(seed=1, dtype=torch.bfloat16)
    ref = _factors(seed=2)
    masks = _random_masks(ft)
    s = similarity(ft, ref, masks)
    s32 = similarity({k: (a.float(), b.float()) for k, (a, b) in ft.items()}, ref, masks)
    assert s == s32


# -- restore --------------------------------------------------------------------------------------------------------


def test_restore_follows_spec_entrywise() -> None:
    ft, ref = _factors(seed=1, dtype=torch.bfloat16), _factors(seed=2)
    masks = _random_masks(ft)
    names = list(ft)
    out = restore(ft, ref, masks, [names[1]])
    assert list(out) == names
    for k in (names[0], names[2]):
        assert out[k][0] is ft[k][0] and out[k][1] is ft[k][1]
    for i in range(2):
        m = masks[names[1]][i].to_bool()
        got, t, e = out[names[1]][i], ft[names[1]][i], ref[names[1]][i]
        assert got.dtype == torch.bfloat16
        assert _bits_equal(got[m], e.to(torch.bfloat16)[m])
        assert _bits_equal(got[~m], t[~m])
        assert changed_entries(t, got) == int((t != got).sum())


def test_restore_invariant_3() -> None:
    ft, ref = _factors(seed=1), _factors(seed=2)
    names = list(ft)
    zeros = {k: (PackedMask.zeros(a.shape), PackedMask.zeros(b.shape)) for k, (a, b) in ft.items()}
    ones = {k: (PackedMask.ones(a.shape), PackedMask.ones(b.shape)) for k, (a, b) in ft.items()}
    none = {n: False for n in names}
    outs = (restore(ft, ref, zeros, names), restore(ft, ref, ones, []), restore(ft, ref, ones, none))
    for out in outs:
        for k in names:
            assert _bits_equal(out[k][0], ft[k][0]) and _bits_equal(out[k][1], ft[k][1])
    out = restore(ft, ref, ones, names)
    for k in names:
        assert _bits_equal(out[k][0], ref[k][0]) and _bits_equal(out[k][1], ref[k][1])


def test_restore_does_not_modify_inputs_and_rejects_unknown() -> None:
    ft, ref = _factors(seed=1), _factors(seed=2)
    before = {k: (a.clone(), b.clone()) for k, (a, b) in ft.items()}
    ones = {k: (PackedMask.ones(a.shape), PackedMask.ones(b.shape)) for k, (a, b) in ft.items()}
    restore(ft, ref, ones, list(ft))
    for k in ft:
        assert torch.equal(ft[k][0], before[k][0]) and torch.equal(ft[k][1], before[k][1])
    with pytest.raises(ValueError, match="not modules"):
        restore(ft, ref, ones, ["model.layers.9.mlp.up_proj"])


# -- score from statistics (invariant 1) ----------------------------------------------------------------------------


def _stats(a: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, a.shape[1], generator=g, dtype=torch.float64)
    z = x @ a.double().T
    return SimpleNamespace(gram=z.T @ z, x_sq=(x * x).sum(0), z_sq=(z * z).sum(0), n_tokens=200, n_samples=7)


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_low_rank_mask_counts_incl_160(preset: str) -> None:
    # A (5, 32) has n = 160 entries: s = 0.8 keeps 160 - 128 = 32 (paper) or 31 (official), never 33.
    g = torch.Generator().manual_seed(0)
    f = {"m": (torch.randn(5, 32, generator=g), torch.randn(40, 5, generator=g))}
    masks = masks_from_statistics("low_rank", f, sparsity=0.8, preset=preset, stats={"m": _stats(f["m"][0])})
    ma, mb = masks["m"]
    off = PRESETS[preset].low_rank_count_offset
    assert ma.count() == 32 - off
    assert mb.count() == 200 - 160 - off


@pytest.mark.parametrize("method", ["wanda", "snip", "random"])
def test_row_mask_counts_incl_160(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    f = {"m": (torch.randn(4, 160, generator=g), torch.randn(160, 4, generator=g))}
    stats = {"m": _stats(f["m"][0])}
    grads = {"m": (torch.rand(4, 160, generator=g), torch.rand(160, 4, generator=g))}
    masks = masks_from_statistics(method, f, sparsity=0.8, stats=stats, grads=grads, seed=3)
    ma, mb = masks["m"]
    assert ma.row_counts().tolist() == [32] * 4
    assert mb.row_counts().tolist() == [4 - math.floor(0.8 * 4)] * 160  # 4 - 3 = 1 per row


def test_wanda_and_snip_masks_use_the_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
    st = _stats(a)
    m = masks_from_statistics("wanda", {"m": (a, b)}, sparsity=0.5, stats={"m": st})["m"]
    want_a = row_topk_mask(a, 0.5, col_scale=(st.x_sq / 7).sqrt().float())
    want_b = row_topk_mask(b, 0.5, col_scale=(st.z_sq / 7).sqrt().float())
    assert m[0].equal(want_a) and m[1].equal(want_b)
    ga, gb = torch.rand(4, 24, generator=g), torch.rand(16, 4, generator=g)
    m = masks_from_statistics("snip", {"m": (a, b)}, sparsity=0.5, grads={"m": (ga, gb)})["m"]
    assert m[0].equal(row_topk_mask(a, 0.5, grad=ga)) and m[1].equal(row_topk_mask(b, 0.5, grad=gb))


def test_random_masks_seeded() -> None:
    f = _factors()
    m1 = masks_from_statistics("random", f, sparsity=0.8, seed=5)
    m2 = masks_from_statistics("random", f, sparsity=0.8, seed=5)
    m3 = masks_from_statistics("random", f, sparsity=0.8, seed=6)
    assert all(m1[k][i].equal(m2[k][i]) for k in f for i in range(2))
    assert not all(m1[k][i].equal(m3[k][i]) for k in f for i in range(2))


def test_random_masks_follow_spec() -> None:
    """Each factor's mask is the reference sampler's, with the stream of (seed, mask key): top 1 - s of each row."""
    f = _factors(d_in=161, d_out=37)
    got = masks_from_statistics("random", f, sparsity=0.8, seed=5)
    for name, (a, b) in f.items():
        for i, (x, key) in enumerate(((a, f"{name}.lora_A"), (b, f"{name}.lora_B"))):
            want = random_row_mask_reference(tuple(x.shape), keep_count(x.shape[1], 0.2), random_stream(5, key))
            assert got[name][i].equal(want), f"{key}: not the reference sampler's mask"


def test_random_masks_do_not_depend_on_other_modules_or_order() -> None:
    f = _factors(n=4)
    every = masks_from_statistics("random", f, sparsity=0.8, seed=9)
    names = list(f)
    alone = {n: masks_from_statistics("random", {n: f[n]}, sparsity=0.8, seed=9)[n] for n in reversed(names)}
    assert all(every[n][i].equal(alone[n][i]) for n in names for i in range(2))


def test_random_masks_under_a_run_wide_triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run asking for triton for every op still gets random masks: the op has no Triton kernel by design, so it
    takes its host backend (argument or NLSR_FAST_BACKEND)."""
    f = _factors(n=2)
    want = masks_from_statistics("random", f, sparsity=0.8, seed=3, backend="reference")
    got = masks_from_statistics("random", f, sparsity=0.8, seed=3, backend="triton")
    monkeypatch.setenv("NLSR_FAST_BACKEND", "triton")
    env = masks_from_statistics("random", f, sparsity=0.8, seed=3)
    assert all(want[n][i].equal(got[n][i]) and want[n][i].equal(env[n][i]) for n in f for i in range(2))


def test_masks_from_statistics_errors() -> None:
    f = _factors(n=1)
    with pytest.raises(ValueError, match="stats"):
        masks_from_statistics("low_rank", f, sparsity=0.8)
    with pytest.raises(ValueError, match="grads"):
        masks_from_statistics("snip", f, sparsity=0.8)
    with pytest.raises(ValueError, match="no calibration statistics"):
        masks_from_statistics("wanda", f, sparsity=0.8, stats={})
    with pytest.raises(ValueError, match="method"):
        masks_from_statistics("obs", f, sparsity=0.8)


# -- report ---------------------------------------------------------------------------------------------------------


def _report() -> Report:
    mods = [
        ModuleRecord(f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'gate'}_proj", i // 2, 1.0 - 0.1 * i,
                     0.3 + 0.1 * i, i % 2, bool(i % 2), 0.2, 0.2, 3 * (i % 2), 2 * (i % 2), [4, 8], [8, 4])
        for i in range(4)
    ]
    return Report(inputs={"base": {"path": "/b", "files": []}}, output="/o", versions={"nlsr_fast": "0"},
                  config=RealignConfig().to_dict(), preset={"name": "paper"}, modules=mods,
                  timings={"score": 1.5}, bytes_read=10, bytes_written=20, counts={"modules": 4, "restored": 2})


def test_report_json_roundtrip_and_table(tmp_path) -> None:
    rep = _report()
    rep.to_json(tmp_path / "r.json")
    back = Report.from_json(tmp_path / "r.json")
    assert back == rep
    table = rep.table()
    assert "model.layers.1.mlp.up_proj" in table and "restored 2 of 4 modules" in table
    assert rep.restored == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="cannot read"):
        Report.from_json(tmp_path / "missing.json")


def test_report_plot_is_png(tmp_path) -> None:
    assert _report().plot(tmp_path / "s.png")
    head = (tmp_path / "s.png").read_bytes()[:8]
    assert head == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">I", (tmp_path / "s.png").read_bytes()[16:20])[0] > 100  # width


# -- score: what it asks of the calibration engine (presets, sequential transform) ----------------------------------


@pytest.mark.parametrize("method, preset, loss, accumulate", [
    ("snip", "paper", "nll", "per_sample"),
    ("snip", "official", "nll", "running"),
    ("pref_snip", "paper", "dpo", "per_sample"),
    ("pref_snip", "official", "dpo", "running"),
])
def test_score_gradient_methods_follow_preset(monkeypatch, method, preset, loss, accumulate) -> None:
    from nlsr_fast.calib import engine
    from nlsr_fast.pipeline import score

    f = _factors(n=2)
    seen = {}

    def fake(base, factors, calib, **kw):
        seen.update(kw, factors=factors)
        return {k: (torch.ones_like(a), torch.ones_like(b)) for k, (a, b, _) in factors.items()}

    monkeypatch.setattr(engine, "lora_gradient_scores", fake)
    masks = score(method, f, sparsity=0.5, preset=preset, base=object(), calib=object(),
                  scales={k: 2.0 for k in f}, micro_batch=3, device="cpu")
    assert seen["loss"] == loss and seen["accumulate"] == accumulate and seen["micro_batch"] == 3
    assert all(s == 2.0 for _, _, s in seen["factors"].values())
    for k, (a, b) in f.items():  # grad = 1 everywhere: the snip mask is the |W| mask
        assert masks[k][0].equal(row_topk_mask(a, 0.5)) and masks[k][1].equal(row_topk_mask(b, 0.5))


@pytest.mark.parametrize("method", ["low_rank", "wanda"])
@pytest.mark.parametrize("sequential", [True, False])
def test_score_statistics_methods_and_sequential_transform(monkeypatch, method, sequential) -> None:
    from nlsr_fast.calib import engine
    from nlsr_fast.calib.lowrank import project_factors
    from nlsr_fast.pipeline import score

    f = _factors(n=2)
    stats = {k: _stats(a, seed=i) for i, (k, (a, _)) in enumerate(f.items())}
    replaced = {}

    def fake(base, factors, calib, *, sequential, transform, **kw):
        assert (transform is not None) == sequential
        if sequential:
            for i, k in enumerate(factors):
                replaced.update(transform(i, {k: stats[k]}))
        return stats

    monkeypatch.setattr(engine, "collect_lora_statistics", fake)
    masks = score(method, f, sparsity=0.75, base=object(), calib=object(), sequential=sequential)
    want = masks_from_statistics(method, f, sparsity=0.75, stats=stats)
    for k in f:
        assert masks[k][0].equal(want[k][0]) and masks[k][1].equal(want[k][1])
    if not sequential:
        assert replaced == {}
        return
    for k, (a, b) in f.items():
        if method == "low_rank":
            wa, wb = project_factors(a, b, stats[k].gram, 0.75)
        else:
            wa, wb = a * want[k][0].to_bool(), b * want[k][1].to_bool()
        assert torch.equal(replaced[k][0], wa) and torch.equal(replaced[k][1], wb)


def test_score_needs_calibration_except_random() -> None:
    from nlsr_fast.pipeline import score

    with pytest.raises(ValueError, match="calibration"):
        score("wanda", _factors(n=1), sparsity=0.8)
    assert len(score("random", _factors(n=2), sparsity=0.8)) == 2


def test_report_plot_without_matplotlib(tmp_path, monkeypatch, caplog) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING", logger="nlsr_fast.report"):
        assert _report().plot(tmp_path / "s.png") is False
    assert not (tmp_path / "s.png").exists()
    assert "matplotlib" in caplog.text
