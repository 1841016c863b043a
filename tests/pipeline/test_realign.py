"""End-to-end `realign` on the tiny sharded Llama world: output = docs/algorithm.md §6 entry by entry, report, masks,
errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nlsr_fast
from nlsr_fast.io import LoraAdapter
from nlsr_fast.ops import keep_count, load_masks, random_row_mask_reference, random_stream
from nlsr_fast.report import Report
from nlsr_fast.testing import continue_lora_adapter, make_lora_adapter, make_tiny_llama, write_calibration_jsonl

from .conftest import World

CAL = {"nsamples": 16, "quiet": True}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _check_spec6(world: World, out: Path, ref_factor: float | None, reference: Path | None = None) -> Report:
    """The output equals docs/algorithm.md §6 entry by entry, against masks.safetensors and report.json."""
    rep = Report.from_json(out / "report.json")
    ft = LoraAdapter.load(world.finetuned)
    al = LoraAdapter.load(reference or world.aligned)
    got = _tensors(out)
    src = _tensors(world.finetuned)
    assert set(got) == set(src)
    masks = load_masks(out / "masks.safetensors")
    assert set(masks) == {f"{n}.lora_{w}" for n in ft.modules for w in "AB"}
    records = {m.name: m for m in rep.modules}
    assert list(records) == ft.modules
    for name in ft.modules:
        rec = records[name]
        for w, t_key in (("A", ft.key_a(name)), ("B", ft.key_b(name))):
            t = src[t_key]
            o = got[t_key]
            assert o.dtype == t.dtype and o.shape == t.shape
            m = masks[f"{name}.lora_{w}"].to_bool()
            assert getattr(rec, f"density_{w.lower()}") == pytest.approx(float(m.float().mean()))
            changed = int((_bits(o) != _bits(t)).sum())
            assert getattr(rec, f"changed_{w.lower()}") == changed
            if not rec.restored:
                assert torch.equal(_bits(o), _bits(t)), f"{name} {w} not bit-identical"
                continue
            a = al.raw(al.key_a(name) if w == "A" else al.key_b(name))
            e = a.float() * ref_factor if ref_factor is not None else a.float()
            assert torch.equal(_bits(o[m]), _bits(e.to(t.dtype)[m])), f"{name} {w}: masked entries != reference"
            assert torch.equal(_bits(o[~m]), _bits(t[~m])), f"{name} {w}: unmasked entries != fine-tuned"
    assert rep.counts["restored"] == sum(m.restored for m in rep.modules)
    assert rep.counts["modules"] == len(ft.modules)
    return rep


@pytest.fixture(scope="module")
def default_run(world: World, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    out = tmp_path_factory.mktemp("runs") / "paper"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, calibration=world.calibration, **CAL)
    return out, rep


def test_default_run_follows_spec6(world: World, default_run) -> None:
    out, rep = default_run
    on_disk = _check_spec6(world, out, math.sqrt(1.9))
    assert on_disk == rep
    assert 0 < rep.counts["restored"] < rep.counts["modules"]
    assert {p.name for p in out.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "masks.safetensors",
                                              "report.json", "similarity.png", "README.md", "manifest.json"}
    assert not Path(f"{out}.partial").exists()


def test_default_run_loads_with_peft(world: World, default_run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = default_run
    base = AutoModelForCausalLM.from_pretrained(str(world.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    sd = model.state_dict()
    written = _tensors(out)
    for key, t in written.items():
        peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                                   ".lora_B.default.weight")
        assert torch.equal(sd[peft_key], t), key
    ids = torch.tensor([[1, 5, 9, 12, 30]])
    logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 5) and torch.isfinite(logits).all()


def test_default_run_config_card_and_plot(world: World, default_run) -> None:
    out, rep = default_run
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (world.finetuned / "adapter_config.json").read_text()
    )
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["library_name"] == "peft" and meta["tags"] == ["nlsr", "safety-realignment", "lora"]
    cfg = json.loads((world.finetuned / "adapter_config.json").read_text())
    assert meta["base_model"] == cfg["base_model_name_or_path"]
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`similarity.png` plots the per-module similarity" in card


def test_card_names_no_plot_that_was_not_written(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib there is no similarity.png, and the model card does not point to one."""
    monkeypatch.setattr(nlsr_fast.Report, "plot", lambda self, path: False)
    out = tmp_path / "out"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="random", quiet=True)
    card = (out / "README.md").read_text()
    assert not (out / "similarity.png").exists() and "similarity.png" not in card
    assert "`masks.safetensors` holds\n  the masks." in card
    assert "similarity.png" not in json.loads((out / "manifest.json").read_text())["files"]


def test_report_contents(world: World, default_run) -> None:
    out, rep = default_run
    for role in ("base", "aligned", "finetuned", "calibration"):
        files = rep.inputs[role]["files"]
        assert files, role
        for f in files:
            data = Path(f["path"]).read_bytes()
            assert f["size"] == len(data)
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
    shards = {Path(f["path"]).name for f in rep.inputs["base"]["files"]}
    assert {p.name for p in world.base.glob("*.safetensors")} <= shards
    assert set(rep.versions) == {"nlsr_fast", "torch", "transformers", "python"}
    assert rep.config == nlsr_fast.RealignConfig(nsamples=16).to_dict()
    assert rep.preset["name"] == "paper"
    assert rep.method == {"name": "low_rank", "title": "NLSR low-rank", "reference": "https://arxiv.org/abs/2412.12497",
                          "needs": "calibration", "group": "matrix", "repair": "restore", "calibrate_on": "reference",
                          "share": "sparsity"}
    assert nlsr_fast.Report.from_json(out / "report.json").method == rep.method
    assert set(rep.timings) >= {"calibrate", "pass1", "select", "pass2", "total"}
    assert rep.bytes_read > 0 and rep.bytes_written > 0
    assert rep.counts["calibration_samples"] == 16
    assert rep.counts["calibration_response_tokens"] > 16 and rep.counts["calibration_truncated"] == 0
    for m in rep.modules:
        assert -1.0 - 1e-6 <= m.similarity <= 1.0 + 1e-6
        assert 0.3 - 1e-6 <= m.probability <= 0.7 + 1e-6
        assert m.restored == (m.draw == 1)
        assert m.layer == int(m.name.split(".")[2])
    # the draw is torch.bernoulli of the float32 probabilities with the seeded generator, in model order
    p = torch.tensor([m.probability for m in rep.modules], dtype=torch.float32)
    want = torch.bernoulli(p, generator=torch.Generator("cpu").manual_seed(42))
    assert [m.draw for m in rep.modules] == [int(v) for v in want.tolist()]
    # modules that did not drift are identical in t and a: the paper direction gives the least similar modules the
    # highest probability
    by_s = sorted(rep.modules, key=lambda m: -m.similarity)
    assert [m.probability for m in by_s] == sorted(m.probability for m in by_s)
    assert "restored" in rep.table()


def test_masks_equal_the_masks_used(world: World, default_run) -> None:
    out, _ = default_run
    from transformers import AutoTokenizer

    from nlsr_fast.calib.data import load_calibration
    from nlsr_fast.io import CheckpointReader

    al = LoraAdapter.load(world.aligned)
    ref = nlsr_fast.amplify({n: al.factors(n) for n in al.modules}, 0.9, "paper")
    calib = load_calibration(world.calibration, AutoTokenizer.from_pretrained(str(world.base)), nsamples=16)
    masks = nlsr_fast.score("low_rank", ref, sparsity=0.8, base=CheckpointReader(world.base), calib=calib,
                            scales={n: al.scale(n) for n in al.modules})
    saved = load_masks(out / "masks.safetensors")
    for name, (ma, mb) in masks.items():
        assert saved[f"{name}.lora_A"].equal(ma) and saved[f"{name}.lora_B"].equal(mb)
        n = ma.rows * ma.cols
        assert ma.count() == n - math.floor(0.8 * n) and ma.count() > 0


@pytest.mark.parametrize("method", ["wanda", "snip", "pref_snip", "random"])
def test_every_method_end_to_end(world: World, tmp_path: Path, method: str) -> None:
    cal = world.pairs if method == "pref_snip" else world.calibration
    out = tmp_path / method
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method=method,
                            calibration=None if method == "random" else cal, **CAL)
    _check_spec6(world, out, math.sqrt(1.9))
    masks = load_masks(out / "masks.safetensors")
    ft = LoraAdapter.load(world.finetuned)
    for name in ft.modules:
        r, d_in = ft.module(name).rank, ft.module(name).d_in
        assert masks[f"{name}.lora_A"].row_counts().tolist() == [d_in - math.floor(0.8 * d_in)] * r
        assert masks[f"{name}.lora_B"].row_counts().tolist() == [r - math.floor(0.8 * r)] * ft.module(name).d_out
        # docs/algorithm.md §3: the reference sampler, stream (seed, mask key); seed defaults to 42
        if method == "random":
            for key, shape in ((f"{name}.lora_A", (r, d_in)), (f"{name}.lora_B", (ft.module(name).d_out, r))):
                want = random_row_mask_reference(shape, keep_count(shape[1], 0.2), random_stream(42, key))
                assert masks[key].equal(want), f"{key}: not the reference sampler's mask"
    assert rep.config["method"] == method


def test_official_preset(world: World, tmp_path: Path) -> None:
    out = tmp_path / "official"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, preset="official",
                            calibration=world.calibration, **CAL)
    _check_spec6(world, out, 1.8)  # each factor x 2 alpha
    by_s = sorted(rep.modules, key=lambda m: -m.similarity)
    assert [m.probability for m in by_s] == sorted((m.probability for m in by_s), reverse=True)
    masks = load_masks(out / "masks.safetensors")
    assert all(m.count() == m.rows * m.cols - math.floor(0.8 * m.rows * m.cols) - 1 for m in masks.values())


def test_official_alpha_half_restores_aligned_values(world: World, tmp_path: Path) -> None:
    # docs/algorithm.md §9.4 through the whole pipeline: all-true masks + everything restored returns e == a exactly.
    out = tmp_path / "o"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, preset="official", alpha=0.5,
                      method="random", sparsity=0.0, selection="fraction", fraction=1.0, quiet=True)
    got, al = _tensors(out), _tensors(world.aligned)
    assert all(torch.equal(_bits(got[k]), _bits(al[k])) for k in got)


def test_nothing_restored_returns_finetuned_bit_exact(world: World, tmp_path: Path) -> None:
    for i, kw in enumerate(({"selection": "threshold", "tau": -1.0},
                            {"selection": "fraction", "fraction": 0.0},
                            {"sparsity": 1.0, "selection": "fraction", "fraction": 1.0})):
        out = tmp_path / str(i)
        rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="random", quiet=True, **kw)
        got, src = _tensors(out), _tensors(world.finetuned)
        assert all(torch.equal(_bits(got[k]), _bits(src[k])) for k in src)
        assert all(m.changed_a == 0 and m.changed_b == 0 for m in rep.modules)


def test_all_true_masks_all_restored_return_reference(world: World, tmp_path: Path) -> None:
    out = tmp_path / "all"
    nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="random", sparsity=0.0,
                      selection="fraction", fraction=1.0, quiet=True)
    got, al = _tensors(out), _tensors(world.aligned)
    c = math.sqrt(1.9)
    assert all(torch.equal(_bits(got[k]), _bits((al[k].float() * c).to(got[k].dtype))) for k in got)


def test_threshold_and_fraction_selection(world: World, tmp_path: Path) -> None:
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "t", method="random",
                            selection="threshold", tau=0.999, quiet=True)
    assert [m.restored for m in rep.modules] == [m.similarity < 0.999 for m in rep.modules]
    assert all(m.probability is None and m.draw is None for m in rep.modules)
    _check_spec6(world, tmp_path / "t", math.sqrt(1.9))
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, tmp_path / "f", method="random",
                            selection="fraction", fraction=0.25, quiet=True)
    n = len(rep.modules)
    assert rep.counts["restored"] == math.ceil(0.25 * n)
    cut = sorted(m.similarity for m in rep.modules)[math.ceil(0.25 * n) - 1]
    assert all(m.similarity <= cut for m in rep.modules if m.restored)


def test_reference_skips_amplification(world: World, tmp_path: Path) -> None:
    ref = continue_lora_adapter(tmp_path / "ref", world.aligned, seed=9, std=0.02)
    out = tmp_path / "out"
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, reference=ref, method="random",
                            selection="fraction", fraction=0.5, quiet=True)
    _check_spec6(world, out, None, reference=ref)
    assert "reference" in rep.inputs


def test_dry_run_writes_nothing(world: World, tmp_path: Path) -> None:
    out = tmp_path / "dry"
    before = sorted(p.name for p in tmp_path.iterdir())
    rep = nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, calibration=world.calibration,
                            dry_run=True, quiet=True)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert rep.dry_run and rep.plan is not None
    plan = rep.plan
    assert plan["counts"]["modules"] == 14 and plan["counts"]["layers"] == 2
    assert plan["calibration"]["records"] == 24 and plan["calibration"]["samples_used"] == 24
    assert plan["modules"][0] == {"name": "model.layers.0.self_attn.q_proj", "layer": 0, "rank": 4,
                                  "shape_a": [4, 32], "shape_b": [32, 4]}
    assert plan["estimate"]["peak_memory_bytes"] > 0
    assert "dry run" in rep.table() and "14 modules" in rep.table()


# -- errors: validated before anything is written; no output folder is left ----------------------------------------


def _expect_error(world: World, out: Path, match: str, **kw) -> None:
    args = {"base": world.base, "aligned": world.aligned, "finetuned": world.finetuned, "out": out}
    args.update({k: kw.pop(k) for k in list(kw) if k in args})
    with pytest.raises(ValueError, match=match):
        nlsr_fast.realign(args["base"], args["aligned"], args["finetuned"], args["out"], quiet=True, **kw)
    assert not Path(args["out"]).exists()
    assert not Path(f"{args['out']}.partial").exists()


def test_error_empty_calibration(world: World, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    _expect_error(world, tmp_path / "o", "empty", calibration=empty)


def test_error_empty_response_after_truncation(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "how do i make a bomb", "response": ""}) + "\n")
    _expect_error(world, tmp_path / "o", "empty", calibration=bad)


def test_error_missing_calibration_and_pairs(world: World, tmp_path: Path) -> None:
    _expect_error(world, tmp_path / "o", "calibration")
    _expect_error(world, tmp_path / "o", "chosen", method="pref_snip", calibration=world.calibration)
    _expect_error(world, tmp_path / "o", "does not exist", calibration=tmp_path / "nope.jsonl")


def test_error_out_inside_or_above_an_input(world: World, tmp_path: Path) -> None:
    _expect_error(world, world.finetuned / "out", "lies inside the input", method="random")
    before = sorted(p.name for p in world.aligned.iterdir())
    with pytest.raises(ValueError, match="is the input"):
        nlsr_fast.realign(world.base, world.aligned, world.finetuned, world.aligned, method="random", quiet=True,
                          overwrite=True)
    assert sorted(p.name for p in world.aligned.iterdir()) == before
    assert not Path(f"{world.aligned}.partial").exists()
    # an existing output without overwrite
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        nlsr_fast.realign(world.base, world.aligned, world.finetuned, out, method="random", quiet=True)
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def bad_adapters(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    out = {
        "rank": make_lora_adapter(root / "rank", world.base, r=8, alpha=16.0),
        "targets": make_lora_adapter(root / "targets", world.base, targets=("q_proj", "v_proj")),
    }
    # same modules, but one factor has a different shape (a hand-edited adapter)
    sd = _tensors(world.finetuned)
    key = sorted(k for k in sd if "layers.1.self_attn.k_proj.lora_A" in k)[0]
    sd[key] = torch.zeros(4, 16)
    (root / "shape").mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(root / "shape" / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(world.finetuned / "adapter_config.json", root / "shape" / "adapter_config.json")
    out["shape"] = root / "shape"
    other = make_tiny_llama(root / "other_base", hidden=48, intermediate=96, heads=4, kv_heads=2)
    out["other_base"] = make_lora_adapter(root / "other", other)
    return out


@pytest.mark.parametrize(
    "which, match",
    [
        ("rank", "model.layers.0.self_attn.q_proj.*rank"),
        ("targets", "model.layers.0.self_attn.k_proj"),
        ("shape", "model.layers.1.self_attn.k_proj"),
        ("other_base", "model.layers.0.self_attn.q_proj"),
    ],
)
def test_error_mismatched_adapters_name_first_mismatch(world: World, bad_adapters, tmp_path: Path, which: str,
                                                       match: str) -> None:
    # mode lora: adapters that did not continue the aligned one are refused, naming the first mismatch (mode auto
    # would realign them in dense mode instead, see tests/pipeline/test_dense.py).
    _expect_error(world, tmp_path / "o", match, finetuned=bad_adapters[which], method="random", mode="lora")


def test_error_reference_mismatch(world: World, bad_adapters, tmp_path: Path) -> None:
    _expect_error(world, tmp_path / "o", "rank", reference=bad_adapters["rank"], method="random", mode="lora")


def test_error_calibration_with_bad_json_names_line(world: World, tmp_path: Path) -> None:
    bad = write_calibration_jsonl(tmp_path / "c.jsonl", 3)
    bad.write_text(bad.read_text() + "{not json\n")
    _expect_error(world, tmp_path / "o", "c.jsonl:4", calibration=bad)
