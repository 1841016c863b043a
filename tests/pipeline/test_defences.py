"""The other defences of the engine (docs/algorithm.md §10-§11), end to end on tiny models, each checked against an
independent fp64 torch computation of its paper's formula: `safelora` (the projection C dW = V V^T dW / ||V||_F, formed
whole here) and `antidote` (wanda scores of the fine-tuned model from Hugging Face forward hooks), in both modes, with
their bad inputs and `nlsr-fast verify`'s checks of their invariants."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import nlsr_fast
from nlsr_fast import cli, testing
from nlsr_fast.io import CheckpointReader, LoraAdapter, write_manifest, write_safetensors
from nlsr_fast.ops import keep_count, load_masks
from nlsr_fast.pipeline.select import rank_positions
from nlsr_fast.verify import verify_summary

from .conftest import World
from .test_dense import DenseWorld, _bits, _read, dw  # noqa: F401  (the dense fixture)


def _chosen(sims: dict[str, float], count: int) -> set[str]:
    """The `count` least similar modules, ties as docs/algorithm.md §5 orders them (later in model order = less)."""
    names = list(sims)
    pos = rank_positions([sims[n] for n in names])
    return {n for n, p in zip(names, pos, strict=True) if p >= len(names) - count}


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return 1.0 if float(y.norm()) == 0.0 else float((x * y).sum() / (x.norm() * y.norm()))


def _safelora_delta(v: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """C dW with C = V V^T / ||V||_F formed whole (fp64), and cos(C dW, dW): the paper's formula, literally."""
    c = v @ v.T / v.norm()
    projected = c @ delta
    return projected, _cos(projected, delta)


# -- safelora ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"count": 3}, {"selection": "threshold", "tau": 0.8}])
def test_safelora_lora_follows_the_paper(world: World, tmp_path: Path, options: dict) -> None:
    out = tmp_path / "out"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="safelora", quiet=True, **options)
    al, ft, got = LoraAdapter.load(world.aligned), LoraAdapter.load(world.finetuned), LoraAdapter.load(out)
    records = {m.name: m for m in rep.modules}
    sims, updates = {}, {}
    for name in ft.modules:
        a_a, b_a = (t.double() for t in al.factors(name))
        a_t, b_t = (t.double() for t in ft.factors(name))
        v = al.scale(name) * b_a @ a_a
        delta = ft.scale(name) * b_t @ a_t - v
        projected, sims[name] = _safelora_delta(v, delta)
        updates[name] = v + projected  # W_a + C dW, as a change from the base
        assert records[name].similarity == pytest.approx(sims[name], abs=1e-9), name
    chosen = ({n for n, s in sims.items() if s < options["tau"]} if "tau" in options
              else _chosen(sims, options.get("count", 10)))
    assert {n for n, r in records.items() if r.restored} == chosen and rep.config["selection"] == options.get(
        "selection", "count")
    assert 0 < len(chosen) < len(sims)
    for name in ft.modules:
        a_o, b_o = got.factors(name)
        if name not in chosen:
            assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip((a_o, b_o), ft.factors(name), strict=True)), name
            continue
        assert torch.equal(_bits(b_o), _bits(al.factors(name)[1])), f"{name}: B is not the aligned B"
        want = updates[name]
        err = (ft.scale(name) * b_o.double() @ a_o.double() - want).abs().max()
        assert float(err) <= 1e-6 * float(want.abs().max()), name
    masks = load_masks(out / "masks.safetensors")
    assert all(m.count() == m.rows * m.cols for m in masks.values())  # a projected module is replaced whole
    problems, checked = verify_summary(out, aligned=world.aligned, finetuned=world.finetuned)
    assert problems == [] and any("W_a + C dW recomputed" in c for c in checked)


def test_safelora_dense_follows_the_paper(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    rep = nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, out, method="safelora", count=5, quiet=True)
    w0, wa, wt, got = _read(dw.base), _read(dw.aligned), _read(dw.finetuned), _read(out)
    records = {m.name: m for m in rep.modules}
    sims, want = {}, {}
    for name in records:
        key = f"{name}.weight"
        v, delta = wa[key].double() - w0[key].double(), wt[key].double() - wa[key].double()
        projected, sims[name] = _safelora_delta(v, delta)
        want[name] = wa[key].double() + projected
        assert records[name].similarity == pytest.approx(sims[name], abs=1e-5), name
    chosen = _chosen(sims, 5)
    assert {n for n, r in records.items() if r.restored} == chosen
    for key, t in wt.items():
        name = key[: -len(".weight")]
        if name not in chosen:  # unchosen targets and every other tensor (norms, embeddings): the fine-tuned bits
            assert torch.equal(_bits(got[key]), _bits(t)), key
            continue
        # fp32 GEMMs rounded once to bf16 against the fp64 formula: one bf16 rounding, plus fp32 round-off
        e = want[name]
        err = (got[key].double() - e).abs()
        assert (err <= 2.0**-8 * e.abs() + 1e-5 * e.abs().max()).all(), name
        assert records[name].changed_a == int((_bits(got[key]) != _bits(t)).sum()) > 0
    problems, checked = verify_summary(out, base=dw.base, aligned=dw.aligned, finetuned=dw.finetuned)
    assert problems == [] and any("W_a + C dW recomputed" in c for c in checked)


# -- antidote ---------------------------------------------------------------------------------------------------------

def _calibration(base: Path, path: Path, nsamples: int):
    from transformers import AutoTokenizer

    from nlsr_fast.calib.data import load_calibration

    return load_calibration(path, AutoTokenizer.from_pretrained(str(base)), nsamples=nsamples)


def _check_pruned(label: str, out_t: torch.Tensor, ft_t: torch.Tensor, score: torch.Tensor, ratio: float) -> None:
    """Each row of the output: the top `ratio` of the fine-tuned entries by `score` are zero, the rest unchanged."""
    k = keep_count(score.shape[1], ratio)
    pruned = (out_t == 0) & (ft_t != 0)
    assert (pruned.sum(1) == k).all(), f"{label}: rows prune {pruned.sum(1).tolist()}, want {k}"
    assert torch.equal(_bits(out_t[~pruned]), _bits(ft_t[~pruned])), f"{label}: an unpruned entry changed"
    lo = torch.where(pruned, score, torch.inf).min(1).values
    hi = torch.where(~pruned, score, -torch.inf).max(1).values
    assert (lo >= hi * (1 - 1e-4)).all(), f"{label}: a pruned entry scores below a kept one"


def check_antidote_lora(out: Path, base: Path, finetuned: Path, calibration: Path, nsamples: int,
                        ratio: float) -> None:
    """out's adapter is the fine-tuned one with the top `ratio` of each factor row by wanda score zeroed, the scores
    from forward hooks on the fine-tuned model (the PEFT model of base + fine-tuned adapter)."""
    from nlsr_fast.calib.hf_reference import hf_peft_model, hook_statistics

    stats = hook_statistics(hf_peft_model(base, finetuned), _calibration(base, calibration, nsamples))
    ft, got = LoraAdapter.load(finetuned), LoraAdapter.load(out)
    for name in ft.modules:
        st = stats[name]
        a_t, b_t = ft.factors(name)
        a_o, b_o = got.factors(name)
        _check_pruned(f"{name} A", a_o, a_t, a_t.double().abs() * (st.x_sq / st.n_samples).sqrt(), ratio)
        _check_pruned(f"{name} B", b_o, b_t, b_t.double().abs() * (st.z_sq / st.n_samples).sqrt(), ratio)


def check_antidote_dense(out: Path, base: Path, finetuned: Path, calibration: Path, nsamples: int,
                         targets: list[str]) -> None:
    """out's checkpoint is the fine-tuned one with the top 0.1 of each target row by wanda score zeroed (scores from
    forward hooks on the fine-tuned checkpoint's own forward: its norms and embeddings moved too), every other tensor
    bit for bit."""
    from nlsr_fast.calib.hf_reference import dense_hook_statistics, hf_dense_model

    stats = dense_hook_statistics(hf_dense_model(finetuned), _calibration(base, calibration, nsamples), targets)
    wt, got = _read(finetuned), _read(out)
    assert set(got) == set(wt)
    for key, t in wt.items():
        name = key[: -len(".weight")]
        if name not in stats:
            assert torch.equal(_bits(got[key]), _bits(t)), key
            continue
        st = stats[name]
        _check_pruned(name, got[key], t, t.double().abs() * (st.x_sq / st.n_samples).sqrt(), 0.1)


@pytest.mark.parametrize("ratio", [None, 0.25])
def test_antidote_lora_follows_the_paper(world: World, tmp_path: Path, ratio: float | None) -> None:
    out = tmp_path / "out"
    extra = {} if ratio is None else {"prune_ratio": ratio}
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="antidote", nsamples=16,
                            calibration=world.calibration, quiet=True, **extra)
    ratio = 0.1 if ratio is None else ratio
    assert rep.config["prune_ratio"] == ratio and rep.config["selection"] == "all"
    assert rep.counts["restored"] == rep.counts["modules"]
    check_antidote_lora(out, world.base, world.finetuned, world.calibration, 16, ratio)
    problems, checked = verify_summary(out, aligned=world.aligned, finetuned=world.finetuned)
    assert problems == [] and "pruned entries are zero" in checked


def test_antidote_dense_follows_the_paper(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    rep = nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, out, method="antidote", calibration=dw.calibration,
                            nsamples=8, calib_dtype="float32", quiet=True)
    check_antidote_dense(out, dw.base, dw.finetuned, dw.calibration, 8, [m.name for m in rep.modules])
    problems, checked = verify_summary(out, base=dw.base, aligned=dw.aligned, finetuned=dw.finetuned)
    assert problems == [] and "pruned entries are zero" in checked


# -- verify finds a forged repair -----------------------------------------------------------------------------------

def _forge(out: Path, key: str, change) -> None:
    """Change one tensor of out's adapter and re-seal the manifest: only the invariant checks can see it."""
    ad = LoraAdapter.load(out)
    tensors = {k: ad.raw(k).clone() for k in ad.raw_keys}
    ad.close()
    change(tensors[key])
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_manifest(out)


def test_verify_finds_a_forged_antidote_or_safelora_output(world: World, tmp_path: Path) -> None:
    inputs = {"aligned": world.aligned, "finetuned": world.finetuned}
    anti = tmp_path / "anti"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, anti, method="antidote", nsamples=8,
                      calibration=world.calibration, quiet=True)
    name = LoraAdapter.load(anti).modules[0]
    key_a = LoraAdapter.load(anti).module(name).key_a
    mask = load_masks(anti / "masks.safetensors")[f"{name}.lora_A"].to_bool()
    row, col = (int(i) for i in mask.nonzero()[0])
    ft_value = LoraAdapter.load(world.finetuned).raw(key_a)[row, col].clone()
    _forge(anti, key_a, lambda t: t.__setitem__((row, col), ft_value))  # one pruned entry put back
    problems, _ = verify_summary(anti, **inputs)
    assert any(f"module {name}: lora_A: 1 masked entries differ" in p for p in problems), problems

    safe = tmp_path / "safe"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, safe, method="safelora", count=3, quiet=True)
    chosen = next(m.name for m in rep.modules if m.restored)
    key_a = LoraAdapter.load(safe).module(chosen).key_a
    _forge(safe, key_a, lambda t: t.mul_(1.01))
    problems, _ = verify_summary(safe, **inputs)
    assert any(f"module {chosen}: lora_A:" in p and "masked entries differ" in p for p in problems), problems
    data = json.loads((safe / "report.json").read_text())
    for m in data["modules"]:  # a fourth module claimed as chosen: not the 3 least similar any more
        m["restored"] = m["restored"] or m["similarity"] == max(x["similarity"] for x in data["modules"])
    data["counts"]["restored"] = sum(m["restored"] for m in data["modules"])
    (safe / "report.json").write_text(json.dumps(data))
    write_manifest(safe)
    problems, _ = verify_summary(safe)
    assert any("selection 'count' 3:" in p for p in problems), problems


# -- bad input: one line naming the option or the module, before anything is written ----------------------------------

@pytest.mark.parametrize(("options", "message"), [
    ({"method": "low_rank", "prune_ratio": 0.2},
     r"prune_ratio=0.2 applies to \['antidote'\], not to method 'low_rank'"),
    ({"method": "antidote", "prune_ratio": 1.5}, r"prune_ratio must be a number in \[0.0, 1.0\], got 1.5"),
    ({"method": "safelora", "selection": "adaptive"}, r"method 'safelora' takes selection 'count' or 'threshold'"),
    ({"method": "antidote", "selection": "count"}, r"method 'antidote' takes selection 'all', got selection='count'"),
    ({"method": "safelora", "count": -1}, r"count must be an integer >= 0, got -1"),
    ({"method": "safelora", "selection": "fraction", "fraction": 0.5, "count": 3},
     r"count=3 is only used with selection='count'"),
])
def test_bad_options_are_refused_naming_them(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nlsr_fast.RealignConfig(**options)


def test_safelora_refuses_a_reference_and_a_zero_aligned_change(world: World, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="a reference .* does not apply"):
        nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "o1", method="safelora",
                          reference=world.aligned, dry_run=True, quiet=True)
    # An aligned adapter whose q_proj of layer 0 has B = 0: V = 0 there. The dry run finds it, by the CLI's rules.
    zero = tmp_path / "zero"
    shutil.copytree(world.aligned, zero)
    ad = LoraAdapter.load(zero)
    tensors = {k: ad.raw(k).clone() for k in ad.raw_keys}
    name = next(n for n in ad.modules if "layers.0.self_attn.q_proj" in n)
    tensors[ad.module(name).key_b].zero_()
    ad.close()
    write_safetensors(zero / "adapter_model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "o2"
    rc = cli.main(["realign", str(world.base), str(zero), str(world.finetuned), str(out), "--method", "safelora",
                   "--dry-run", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"module {name}: the aligned model equals the base there (V = 0)" in err[0]
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_safelora_dense_cost_is_refused_on_a_cpu_above_the_limit(dw: DenseWorld, tmp_path: Path,  # noqa: F811
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from nlsr_fast.methods import safelora

    flops = sum(safelora.dense_flops(*CheckpointReader(dw.finetuned).shape(f"{m}.weight"))
                for m in ["model.layers.0.self_attn.q_proj"])
    assert flops == 4 * 32**3
    monkeypatch.setattr(safelora, "CPU_FLOP_LIMIT", 1e3)
    with pytest.raises(ValueError, match=r"C dW for 14 modules costs 0 TFLOP .* above the 0 TFLOP .*--device cuda"):
        nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / "o", method="safelora", dry_run=True,
                          device="cpu", quiet=True)
    assert not (tmp_path / "o").exists()


def test_safelora_dense_zero_aligned_change_names_the_module(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    aligned = testing.derive_checkpoint(tmp_path / "aligned_q", dw.base, seed=4, move=r"q_proj\.weight$")
    moved = r"model\.layers\.\d\.(mlp|self_attn)\.(k|v|o|gate|up|down)_proj"
    with pytest.raises(ValueError, match=rf"module {moved}: .*\(V = 0\).*--targets"):
        nlsr_fast.realign(dw.base, aligned, dw.finetuned, tmp_path / "o", method="safelora", quiet=True)
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned_q"]  # no OUT.partial left behind
    # An aligned adapter that leaves a target out: found by the dry run, from its header.
    with pytest.raises(ValueError, match=r"module model\.layers\.0\.mlp\.down_proj: .*\(V = 0\)"):
        q_only = testing.make_lora_adapter(tmp_path / "q_only", dw.base, targets=("q_proj",))
        nlsr_fast.realign(dw.base, q_only, dw.finetuned, tmp_path / "o", method="safelora", dry_run=True,
                          targets=r"(q_proj|down_proj)$", quiet=True)
    rep = nlsr_fast.realign(dw.base, aligned, dw.finetuned, tmp_path / "q", method="safelora", targets=r"q_proj$",
                            count=1, quiet=True)
    assert rep.counts == {**rep.counts, "modules": 2, "restored": 1}


# -- resta ------------------------------------------------------------------------------------------------------------

def _check_resta(out: Path, wt: dict, wa: dict, wu: dict, *, beta: float, rate: float | None = None,
                 rel: float = 2.0**-8) -> None:
    """theta = W_t + beta (W_a - W_u), or W_a + M (W_t - W_a) / (1 - p) + beta (W_a - W_u) with M the kept entries
    in masks.safetensors, in fp64, against every target of the output (one rounding to its dtype); the rest is W_t."""
    got, masks = _read(out), load_masks(out / "masks.safetensors")
    for key, t in wt.items():
        name = key[: -len(".weight")]
        if name not in masks:
            assert torch.equal(_bits(got[key]), _bits(t)), key
            continue
        w_t, w_a, w_u = t.double(), wa[key].double(), wu[key].double()
        if rate is None:
            assert masks[name].count() == t.numel()
            want = w_t + beta * (w_a - w_u)
        else:
            keep = masks[name].to_bool().double()
            want = w_a + keep * (w_t - w_a) / (1 - rate) + beta * (w_a - w_u)
        err = (got[key].double() - want).abs()
        assert (err <= rel * want.abs() + 1e-6 * want.abs().max()).all(), name


def test_resta_dense_follows_the_paper(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    rep = nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / "out", method="resta", quiet=True)
    assert rep.config["beta"] == 0.5 and rep.config["selection"] == "all" and rep.counts["restored"] == 14
    assert all(m.similarity is None for m in rep.modules) and "   -  " in rep.table()
    w0, wa, wt = _read(dw.base), _read(dw.aligned), _read(dw.finetuned)
    _check_resta(tmp_path / "out", wt, wa, w0, beta=0.5)
    # with an unaligned model given (an adapter on the base, merged on the fly) and another beta
    nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / "u", method="resta", beta=1.5,
                      unaligned=dw.adapter, quiet=True)
    _check_resta(tmp_path / "u", wt, wa, _read(dw.merged), beta=1.5)
    problems, checked = verify_summary(tmp_path / "u", base=dw.base, aligned=dw.aligned, finetuned=dw.finetuned,
                                       unaligned=dw.adapter)
    assert problems == [] and any(c.startswith("every module equals theta_ft") for c in checked)
    _, checked = verify_summary(tmp_path / "u", base=dw.base, aligned=dw.aligned, finetuned=dw.finetuned)
    assert any("NOT checked: the run was given an unaligned model; pass --unaligned" in c for c in checked)


def test_resta_with_dare_drops_a_seeded_share_of_the_change(dw: DenseWorld, tmp_path: Path) -> None:  # noqa: F811
    reps = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        reps[name] = nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, tmp_path / name, method="resta",
                                       dare_rate=0.3, seed=seed, quiet=True)
    _check_resta(tmp_path / "a", _read(dw.finetuned), _read(dw.aligned), _read(dw.base), beta=0.5, rate=0.3)
    ma, mb, mc = (load_masks(tmp_path / n / "masks.safetensors") for n in "abc")
    assert all(ma[k].equal(mb[k]) for k in ma) and not any(ma[k].equal(mc[k]) for k in ma)  # seeded, per module
    kept = sum(m.count() for m in ma.values())
    total = sum(m.rows * m.cols for m in ma.values())
    sd = (total * 0.3 * 0.7) ** 0.5  # binomial: the kept share is 1 - p within 5 standard deviations
    assert abs(kept - 0.7 * total) < 5 * sd
    assert len({tuple(m.row_counts().tolist()) for m in ma.values()}) > 1  # Bernoulli entries, not a count per row
    problems, _ = verify_summary(tmp_path / "a", base=dw.base, aligned=dw.aligned, finetuned=dw.finetuned)
    assert problems == []
    shutil.copyfile(tmp_path / "c" / "masks.safetensors", tmp_path / "a" / "masks.safetensors")  # another seed's
    write_manifest(tmp_path / "a")
    problems, _ = verify_summary(tmp_path / "a")
    assert any("not DARE's draw at rate 0.3, seed 42" in p for p in problems), problems


def test_resta_on_adapters_writes_a_full_checkpoint(world: World, tmp_path: Path) -> None:
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "out", method="resta", quiet=True)
    assert rep.mode == "dense" and (tmp_path / "out" / "config.json").is_file()
    base = CheckpointReader(world.base)

    def merged(folder: Path) -> dict[str, torch.Tensor]:  # W_0 + s B A in fp64, the adapter's change unrounded
        ad = LoraAdapter.load(folder)
        out = {k: base.get(k).double() for k in base.keys()}
        for name in ad.modules:
            a, b = ad.factors(name)
            out[f"{name}.weight"] += ad.scale(name) * b.double() @ a.double()
        return out

    _check_resta(tmp_path / "out", {k: v.float() for k, v in merged(world.finetuned).items()},
                 merged(world.aligned), {k: base.get(k) for k in base.keys()}, beta=0.5, rel=1e-6)
    with pytest.raises(ValueError, match="method 'resta' is not available in lora mode: the sum of two adapters"):
        nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "l", method="resta", mode="lora",
                          quiet=True)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "resta", "beta": -0.1}, r"beta must be a number in \[0.0, 10.0\], got -0.1"),
    ({"method": "resta", "dare_rate": 1.0}, r"dare_rate must be a number in \[0.0, 0.999\], got 1.0"),
    ({"method": "wanda", "beta": 0.5}, r"beta=0.5 applies to \['resta'\], not to method 'wanda'"),
    ({"method": "safelora", "dare_rate": 0.2}, r"dare_rate=0.2 applies to \['resta'\]"),
])
def test_resta_bad_options_are_refused_naming_them(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nlsr_fast.RealignConfig(**options)


def test_resta_bad_unaligned_model_is_refused_by_the_dry_run(dw: DenseWorld, tmp_path: Path,  # noqa: F811
                                                              capsys) -> None:
    other = testing.make_tiny_llama(tmp_path / "other", layers=2, hidden=16, dtype=torch.bfloat16)
    capsys.readouterr()
    out = tmp_path / "o"
    rc = cli.main(["realign", str(dw.base), str(dw.aligned), str(dw.finetuned), str(out), "--method", "resta",
                   "--unaligned", str(other), "--dry-run", "--quiet"])  # another model: other shapes
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "in the unaligned model" in err[0] and "shape" in err[0], err
    with pytest.raises(ValueError, match=r"an unaligned model \(--unaligned .*\) applies to \['resta'\], not to "
                                         r"method 'magnitude'"):
        nlsr_fast.realign(dw.base, dw.aligned, dw.finetuned, out, method="magnitude", unaligned=dw.aligned,
                          dry_run=True, quiet=True)
    assert not out.exists()


def test_safelora_dense_on_adapters_projects_on_the_rank_r_change_as_lora_mode(world: World, tmp_path: Path) -> None:
    """An aligned adapter makes V = s B_a A_a exactly rank r: dense mode takes the low-rank route (no CPU budget to
    check) and agrees with LoRA mode's output merged on the base, and with its similarities."""
    dense = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "d", method="safelora",
                              mode="dense", count=4, quiet=True)
    lora = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "l", method="safelora",
                             mode="lora", count=4, quiet=True)
    assert [m.restored for m in dense.modules] == [m.restored for m in lora.modules]
    for d, m in zip(dense.modules, lora.modules, strict=True):
        assert d.similarity == pytest.approx(m.similarity, abs=1e-5), d.name
    got, out_ad, base = _read(tmp_path / "d"), LoraAdapter.load(tmp_path / "l"), CheckpointReader(world.base)
    for name in out_ad.modules:
        a, b = out_ad.factors(name)
        want = base.get(f"{name}.weight").double() + out_ad.scale(name) * b.double() @ a.double()
        err = (got[f"{name}.weight"].double() - want).abs().max()
        assert float(err) <= 1e-5 * float(want.abs().max()), name
    problems, _ = verify_summary(tmp_path / "d", base=world.base, aligned=world.aligned, finetuned=world.finetuned)
    assert problems == []


def test_safelora_dense_on_an_aligned_adapter_follows_the_paper(dw: DenseWorld, tmp_path: Path,  # noqa: F811
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 inputs, the aligned model an adapter merged on the fly (the low-rank route: pass 2 writes W_0 + left @ Q
    with Q stashed by pass 1), against the paper's formula in fp64 with C formed whole from V = s B A; a run whose
    pass 1 stashed no Q (resumed from an older journal) writes the same bytes; verify finds a forged weight."""
    from safetensors.torch import load_file, save_file

    from nlsr_fast.dense import DenseSpace

    out = tmp_path / "out"
    rep = nlsr_fast.realign(dw.base, dw.adapter, dw.finetuned, out, mode="dense", method="safelora", count=5,
                            quiet=True)
    w0, wt, got, ad = _read(dw.base), _read(dw.finetuned), _read(out), LoraAdapter.load(dw.adapter)
    wa = _read(testing.merge_adapter(tmp_path / "merged", dw.base, dw.adapter))  # the bf16 W_a that dW is taken from
    records = {m.name: m for m in rep.modules}
    sims, want = {}, {}
    for name in records:
        key = f"{name}.weight"
        a, b = (t.double() for t in ad.factors(name))
        v = ad.scale(name) * b @ a  # exactly rank r (the merge's rounding is not part of V)
        projected, sims[name] = _safelora_delta(v, wt[key].double() - wa[key].double())
        want[name] = w0[key].double() + v + projected  # W_a + C dW, W_a = W_0 + V
        assert records[name].similarity == pytest.approx(sims[name], abs=1e-5), name
    chosen = _chosen(sims, 5)
    assert {n for n, r in records.items() if r.restored} == chosen
    for key, t in wt.items():
        name = key[: -len(".weight")]
        if name not in chosen:
            assert torch.equal(_bits(got[key]), _bits(t)), key
            continue
        e = want[name]  # one bf16 rounding of the fp32 result, plus fp32 round-off
        assert ((got[key].double() - e).abs() <= 2.0**-8 * e.abs() + 1e-5 * e.abs().max()).all(), name
        assert records[name].changed_a == int((_bits(got[key]) != _bits(t)).sum()) > 0
    inputs = {"base": dw.base, "aligned": dw.adapter, "finetuned": dw.finetuned}
    problems, checked = verify_summary(out, **inputs)
    assert problems == [] and any("W_a + C dW recomputed" in c for c in checked)

    monkeypatch.setattr(DenseSpace, "restore_values", lambda self, *args: {})  # no Q stashed: computed in pass 2
    again = tmp_path / "again"
    nlsr_fast.realign(dw.base, dw.adapter, dw.finetuned, again, mode="dense", method="safelora", count=5, quiet=True)
    assert {p.name: p.read_bytes() for p in again.glob("model*.safetensors")} == {
        p.name: p.read_bytes() for p in out.glob("model*.safetensors")}

    name = sorted(chosen)[0]
    shard = next(p for p in out.glob("model*.safetensors") if f"{name}.weight" in load_file(p))
    tensors = load_file(shard)
    tensors[f"{name}.weight"] = tensors[f"{name}.weight"] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    write_manifest(out)
    problems, _ = verify_summary(out, **inputs)
    assert any(f"module {name}:" in p and "masked entries differ" in p for p in problems), problems
